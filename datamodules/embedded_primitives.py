"""Building blocks of the embedded renderer: coordinates, noise fields, shapes, strokes, colour.

Everything here is deterministic given its generator, with transcendental functions from
:mod:`adbench.datamodules.numerics` so that results do not depend on the CPU's SIMD kernels (see :mod:`adbench.datamodules.embedded_render`). Shapes
come as a signed distance (positive inside) or a coverage in ``[0, 1]`` that is zero
exactly where the shape does not reach, so a defect rendered through them has an exact mask.
"""

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from adbench.datamodules.numerics import arctan2, cos, hypot, sin

__all__ = [
    "Rng",
    "blob_distance",
    "fractal_noise",
    "grid",
    "lighting",
    "polyline_coverage",
    "random_walk",
    "rgb",
    "rgb_jitter",
    "smooth_noise",
    "soft_weight",
]

Rng = np.random.Generator


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``; cached because every renderer needs them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


@lru_cache(maxsize=64)
def _spline_taps(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps mapping a ``cells + 4`` lattice onto ``size`` pixels.

    Returns the four lattice indices and weights of every pixel. Lattice noise smoothed
    this way is C2-continuous and costs a few gathers, far cheaper than large Gaussian
    filters (and, unlike a matrix product, it does not depend on BLAS threading).
    """
    t = (np.arange(size) + 0.5) / size * cells + 2.0
    index = np.floor(t).astype(np.intp)[:, None] + np.arange(-1, 3)[None, :]
    dist = np.abs(t[:, None] - index)
    near = (2.0 / 3.0) - dist**2 + 0.5 * dist**3
    far = (2.0 - dist) ** 3 / 6.0
    weights = np.where(dist < 1.0, near, np.where(dist < 2.0, far, 0.0)).astype(np.float32)
    index.setflags(write=False)
    weights.setflags(write=False)
    return index, weights


def smooth_noise(rng: Rng, size: int, cells: int) -> np.ndarray:
    """Smooth random field with about ``cells`` bumps across the image."""
    lattice = rng.standard_normal((cells + 4, cells + 4), dtype=np.float32)
    index, weights = _spline_taps(size, cells)
    rows = sum(lattice[:, index[:, k]] * weights[:, k] for k in range(4))
    return sum(rows[index[:, k], :] * weights[:, k, None] for k in range(4))


def fractal_noise(
    rng: Rng, size: int, cells: int, octaves: int, persistence: float = 0.5
) -> np.ndarray:
    """Sum of smooth noise octaves, normalised to zero mean and unit variance."""
    total = np.zeros((size, size), np.float32)
    for octave in range(octaves):
        total += persistence**octave * smooth_noise(rng, size, cells * 2**octave)
    total -= total.mean()
    return total / (total.std() + 1e-8)


def blob_distance(
    rng: Rng, size: int, center: Sequence[float], radius: float, roughness: float
) -> np.ndarray:
    """Approximate signed distance in pixels (positive inside) to an irregular blob.

    The boundary is a circle whose radius is modulated by a few random harmonics, which
    gives the lumpy, star-shaped outlines of real holes, stains and chips.
    """
    harmonics = np.arange(2, 9)
    amplitude = rng.uniform(0.0, roughness, harmonics.size) / harmonics**1.2
    phase = rng.uniform(0.0, 2 * np.pi, harmonics.size)
    # Only a window around the blob is evaluated; everything else is far outside.
    distance = np.full((size, size), -float(size), np.float32)
    reach = radius * (1.0 + amplitude.sum()) + 2.0
    x0, y0 = (max(int(c - reach), 0) for c in center)
    x1, y1 = (min(int(c + reach) + 2, size) for c in center)
    if x1 <= x0 or y1 <= y0:
        return distance
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - np.float32(center[0]), yy - np.float32(center[1])
    theta = arctan2(dy, dx)
    wobble = (amplitude * cos(theta[..., None] * harmonics + phase)).sum(-1)
    distance[y0:y1, x0:x1] = radius * (1.0 + wobble) - hypot(dx, dy)
    return distance


def random_walk(
    rng: Rng,
    start: Sequence[float],
    heading: float,
    steps: int,
    step_length: float,
    turn_sigma: float,
    curvature: float = 0.0,
    jitter: float = 0.0,
) -> np.ndarray:
    """Polyline of ``steps + 1`` points.

    ``turn_sigma`` and ``curvature`` bend the path gradually (scratches, threads);
    ``jitter`` adds independent per-step kinks around that path (cracks zig-zag but keep
    their overall direction).
    """
    headings = heading + np.cumsum(curvature + rng.normal(0.0, turn_sigma, steps))
    headings = headings + rng.normal(0.0, jitter, steps)
    moves = step_length * np.stack([cos(headings), sin(headings)], axis=1)
    return np.vstack([np.asarray(start, float)[None], np.asarray(start, float) + moves.cumsum(0)])


def polyline_coverage(points: np.ndarray, half_width: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in ``[0, 1]`` of a polyline stroked with ``half_width``.

    Computed from the exact distance to the segments, so coverage is zero exactly where
    the stroke does not reach: the stroke *is* the mask.
    """
    coverage = np.zeros((size, size), np.float32)
    margin = half_width + 2.0
    x0, y0 = np.maximum(np.floor(points.min(0) - margin), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(points.max(0) + margin) + 1, size).astype(int)
    if x1 <= x0 or y1 <= y0:
        return coverage
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    pixels = np.stack([xx.ravel(), yy.ravel()], axis=1)
    a, b = points[:-1].astype(np.float32), points[1:].astype(np.float32)
    ab = b - a
    length2 = np.maximum((ab**2).sum(1), 1e-6)
    best = np.full(pixels.shape[0], np.inf, np.float32)
    for start, seg, seg_len2 in zip(a, ab, length2, strict=True):
        rel = pixels - start
        # Written out, not `rel @ seg`: BLAS picks its kernel (and rounding) by the CPU.
        t = np.clip((rel[:, 0] * seg[0] + rel[:, 1] * seg[1]) / seg_len2, 0.0, 1.0)
        best = np.minimum(best, ((rel - t[:, None] * seg) ** 2).sum(1))
    local = np.clip(half_width + 0.5 - np.sqrt(best), 0.0, 1.0)
    coverage[y0:y1, x0:x1] = local.reshape(yy.shape)
    return coverage


def lighting(rng: Rng, size: int, strength: float) -> np.ndarray:
    """Linear illumination gradient in a random direction, mean one."""
    yy, xx = grid(size)
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = ((xx - size / 2) * float(cos(angle)) + (yy - size / 2) * float(sin(angle))) / size
    return 1.0 + rng.uniform(0.0, strength) * ramp


def rgb(red: float, green: float, blue: float) -> np.ndarray:
    return np.array([red, green, blue], np.float32)


def rgb_jitter(rng: Rng, sigma: float) -> np.ndarray:
    """Small random per-channel colour offset."""
    return (sigma * rng.standard_normal(3)).astype(np.float32)


def soft_weight(distance: np.ndarray, feather: float) -> np.ndarray:
    """Weight rising from 0 at a shape's edge to 1 at ``feather`` pixels inside it."""
    return np.clip((distance + 0.5) / feather, 0.0, 1.0)
