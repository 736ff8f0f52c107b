"""The embedded dataset's renderer: textures, an object and their defects, drawn procedurally.

The data should exercise the same code paths and the same difficulties as MVTec AD:
textures whose normal variation a detector has to learn, an object whose pose changes a
little, and defects that are small, varied and only a few percent of the image.
:func:`render_sample` draws one image from a seed; :mod:`adbench.datamodules.embedded`
writes the dataset to disk. A sample depends only on its arguments, and is the same on
every CPU: transcendental functions go through :mod:`adbench.datamodules.numerics`, because
numpy's float32 SIMD kernels differ in the last bit between AVX2 and AVX-512 machines,
which moved pixels (version 1 did). Any change here that changes a rendered byte must
bump :data:`adbench.datamodules.embedded.DATASET_VERSION`.

Categories (see :data:`EMBEDDED_CATEGORIES` and :data:`EMBEDDED_DEFECTS`):

``weave`` -- regular texture, like MVTec's carpet/grid.
    Plain-weave canvas seen close up: warp and weft yarns crossing over and under, each
    yarn with a rounded cross-section, a twist striation and its own slight shade, under
    a soft lighting gradient. Between images the weave period, angle, phase, colour and
    lighting jitter a little, so a detector must learn the pattern, not one picture.
    Defects: ``hole`` (a frayed dark opening where yarns are torn away), ``thread`` (a
    loose yarn lying across the weave, with its own shadow, in a light, dark or dyed
    colour) and ``color`` (a dye stain that tints the yarns but leaves their texture).

``marble`` -- stochastic texture, like MVTec's tile/wood.
    Polished stone: light mottled ground with turbulent grey veins (fractal noise bending
    sinusoidal bands), finer secondary veins, crystal grain and a broad soft sheen. Vein
    direction, density and layout are random, so no two images share a layout and only
    local statistics are "normal".
    Defects: ``crack`` (a thin dark jagged line, sometimes branching), ``pit`` (a small
    crater, shaded dark on the side away from the light and bright on the other) and
    ``stain`` (a rust, oil or yellow blotch with a soft, irregular edge).

``disc`` -- object, like MVTec's metal_nut/bottle.
    A turned steel washer on a dark matte background: knurled outer bevel, concentric
    turning marks on the face with the bow-tie highlight such marks produce, a step to a
    matte inner boss, a chamfered centre hole and three bolt holes. It sits near the
    centre with a small random shift and rotation (the bolt holes show the rotation) and
    casts a soft shadow; the light is fixed, as in an inspection cell.
    Defects: ``scratch`` (a thin bright or dark curved line on the metal), ``chip`` (a
    jagged piece missing from the rim, the background showing through, with a dark
    fracture edge) and ``rust`` (an orange-brown mottled spot).

Every defect is first generated as a shape (a signed distance or a line coverage) and then
rendered through it: the defective image is ``clean + w * (effect - clean)`` with a weight
``w`` that is zero outside the shape, so soft edges never leak out and the ground-truth
mask (``w > 0``) covers exactly the pixels the defect touched. Defect areas are kept
between :data:`MIN_DEFECT_FRACTION` and :data:`MAX_DEFECT_FRACTION` of the image, which is
the range of most MVTec AD defects. Sensor noise is added last, identically to the clean
and the defective rendering, so pixels outside the mask are bit-identical.
"""

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from adbench.datamodules.embedded_primitives import (
    Rng,
    blob_distance,
    fractal_noise,
    grid,
    lighting,
    polyline_coverage,
    random_walk,
    rgb,
    rgb_jitter,
    smooth_noise,
    soft_weight,
)
from adbench.datamodules.numerics import arctan2, cos, exp, hypot, sin

__all__ = [
    "EMBEDDED_CATEGORIES",
    "EMBEDDED_DEFECTS",
    "MAX_DEFECT_FRACTION",
    "MIN_DEFECT_FRACTION",
    "MIN_IMAGE_SIZE",
    "render_sample",
]

EMBEDDED_CATEGORIES: tuple[str, ...] = ("weave", "marble", "disc")
EMBEDDED_DEFECTS: dict[str, tuple[str, ...]] = {
    "weave": ("hole", "thread", "color"),
    "marble": ("crack", "pit", "stain"),
    "disc": ("scratch", "chip", "rust"),
}

#: Bounds on a defect's mask area, as a fraction of the image area.
MIN_DEFECT_FRACTION = 0.002
MAX_DEFECT_FRACTION = 0.05

#: Smallest image side the shapes and strokes are drawn for.
MIN_IMAGE_SIZE = 32
#: Blend weights below this are dropped, so every masked pixel is really changed.
_MIN_WEIGHT = 0.02
_SENSOR_NOISE = 1.5 / 255.0

#: Per-image facts a category's defects need (colours, geometry, layers of the render).
Context = dict[str, object]


# --------------------------------------------------------------------------------------
# Category: weave (regular texture)
# --------------------------------------------------------------------------------------


def _render_weave(rng: Rng, size: int) -> tuple[np.ndarray, Context]:
    """Plain-weave canvas: each crossing shows the yarn that lies on top there."""
    scale = size / 256
    yy, xx = grid(size)
    period = 12.5 * scale * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.uniform(-2.5, 2.5))
    cos_a, sin_a = float(cos(angle)), float(sin(angle))
    u = (xx * cos_a + yy * sin_a) / period + rng.uniform(0.0, 2.0)
    v = (yy * cos_a - xx * sin_a) / period + rng.uniform(0.0, 2.0)
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    # At each crossing only the yarn on top is visible: the warp (running along v) where
    # iu + iv is even, the weft (running along u) elsewhere. Express everything in the
    # visible yarn's own coordinates so each term is evaluated once.
    warp_on_top = (iu + iv) % 2 == 0
    across = np.where(warp_on_top, u - iu, v - iv)
    along = np.where(warp_on_top, v - iv, u - iu)
    along_total = np.where(warp_on_top, v, u)
    yarn = np.where(warp_on_top, iu, iv + 17) % 64

    yarn_shade = 1.0 + rng.normal(0.0, 0.035, 64).astype(np.float32)
    crossing_shade = 1.0 + rng.normal(0.0, 0.02, (64, 64)).astype(np.float32)
    # Rounded yarn cross-section, clipped so a thin dark gap separates neighbours.
    section = np.sqrt(np.clip(sin(np.float32(np.pi) * across) * 1.3, 0.0, 1.0))
    arch = (
        0.74 + 0.26 * sin(np.float32(np.pi) * along) + 0.07 * cos(np.float32(np.pi) * along)
    )
    twist = 0.92 + 0.08 * sin(np.float32(2 * np.pi) * (3.0 * across + 1.3 * along_total))
    fuzz = 1.0 + 0.035 * fractal_noise(rng, size, max(4, size // 16), 2)
    shade = section * arch * twist * yarn_shade[yarn] * crossing_shade[iu % 64, iv % 64] * fuzz

    base = rgb(0.70, 0.61, 0.47) * rng.uniform(0.93, 1.07) + rgb_jitter(rng, 0.008)
    warp_color = base * np.float32(rng.uniform(0.98, 1.04))
    weft_color = base * np.float32(rng.uniform(0.86, 0.93))
    gap = rgb(0.10, 0.08, 0.06)
    light = lighting(rng, size, 0.15) * rng.uniform(0.95, 1.05)
    color = (weft_color - gap) + warp_on_top[..., None] * (warp_color - weft_color)
    image = (gap + color * shade[..., None]) * light[..., None]
    return image.astype(np.float32), {"weft_color": weft_color, "warp_color": warp_color}


def _weave_hole(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """Torn-out yarns: a dark opening whose edge is frayed by noise (inside the shape)."""
    size = clean.shape[0]
    center = rng.uniform(0.12, 0.88, 2) * size
    radius = rng.uniform(0.028, 0.055) * size
    distance = blob_distance(rng, size, center, radius, 0.35)
    fray = smooth_noise(rng, size, max(8, size // 6))
    inside = distance > -0.5
    weight = np.clip((distance + 0.5 + 1.5 * fray) / (2.5 * size / 256), 0.15, 1.0) * inside
    # Torn yarn ends stay dimly visible near the rim; the opening is darkest in the middle.
    depth = np.clip(distance / (0.6 * radius), 0.0, 1.0)
    effect = clean * (0.4 - 0.3 * depth)[..., None] + np.float32(0.02)
    return effect, weight


def _weave_thread(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A loose yarn lying on the fabric, casting a shadow down-right of itself."""
    size = clean.shape[0]
    scale = size / 256
    start = rng.uniform(0.15, 0.85, 2) * size
    points = random_walk(
        rng,
        start,
        rng.uniform(0, 2 * np.pi),
        24,
        rng.uniform(3.0, 5.0) * scale,
        turn_sigma=0.12,
        curvature=rng.normal(0.0, 0.05),
    )
    half_width = max(0.8, rng.uniform(1.1, 1.6) * scale)
    yarn = polyline_coverage(points, half_width, size)
    shadow = polyline_coverage(points + 1.5 * scale, half_width + 0.5, size)
    choice = rng.integers(3)
    if choice == 0:  # same yarn, pulled out and catching the light
        color = np.asarray(ctx["warp_color"]) * np.float32(1.3)
    elif choice == 1:  # dark foreign fibre
        color = rgb(0.18, 0.16, 0.15)
    else:  # dyed fibre
        color = rgb(0.25, 0.32, 0.62)
    yy, xx = grid(size)
    twist = 0.88 + 0.12 * sin(2 * np.pi * (xx + yy) / (3.5 * scale))
    shadowed = clean * (1.0 - 0.45 * shadow)[..., None]
    thread = (color * twist[..., None]).astype(np.float32)
    effect = shadowed + yarn[..., None] * (thread - shadowed)
    weight = ((yarn > 0) | (shadow > 0)).astype(np.float32)
    return effect, weight


def _weave_color(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A dye stain: tints the yarns but leaves their structure visible."""
    size = clean.shape[0]
    center = rng.uniform(0.12, 0.88, 2) * size
    distance = blob_distance(rng, size, center, rng.uniform(0.045, 0.08) * size, 0.5)
    tints = [rgb(1.25, 0.55, 0.45), rgb(0.55, 0.65, 1.25), rgb(0.6, 0.95, 0.5)]
    tint = tints[rng.integers(len(tints))]
    effect = clean * tint
    weight = soft_weight(distance, 4.0 * size / 256) * 0.9
    return effect, weight


# --------------------------------------------------------------------------------------
# Category: marble (stochastic texture)
# --------------------------------------------------------------------------------------


def _render_marble(rng: Rng, size: int) -> tuple[np.ndarray, Context]:
    """Polished stone: turbulence-bent sine bands make veins, noise makes the ground."""
    yy, xx = grid(size)
    turbulence = fractal_noise(rng, size, 3, 5, 0.55)
    detail = fractal_noise(rng, size, 5, 4, 0.55)
    angle = rng.uniform(0.0, np.pi)
    cos_a, sin_a = float(cos(angle)), float(sin(angle))
    along = (xx * cos_a + yy * sin_a) / size
    across = (yy * cos_a - xx * sin_a) / size
    phase = rng.uniform(0.0, 2 * np.pi)
    bands = sin(2 * np.pi * rng.uniform(1.0, 1.8) * along + 1.6 * turbulence + phase)
    width = np.clip(0.12 + 0.08 * fractal_noise(rng, size, 3, 3), 0.03, 0.3)
    fade = np.clip(0.65 + 0.45 * fractal_noise(rng, size, 2, 3), 0.0, 1.0)
    veins = (exp(-((bands / width) ** 2)) + 0.25 * exp(-((bands / 0.45) ** 2))) * fade
    fine_bands = sin(2 * np.pi * rng.uniform(2.5, 4.0) * (along + 0.7 * across) + 2.5 * detail)
    fine = exp(-((fine_bands / 0.06) ** 2)) * np.clip(turbulence, 0.0, 1.0)
    vein_strength = np.clip(0.8 * veins + 0.2 * fine, 0.0, 1.0)

    ground = rgb(0.87, 0.86, 0.83) + rgb_jitter(rng, 0.006)
    vein_color = rgb(0.40, 0.42, 0.45) + rgb_jitter(rng, 0.012)
    mottle = 1.0 + 0.04 * fractal_noise(rng, size, 4, 4)
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 0.7)
    image = ground * mottle[..., None]
    image = image + vein_strength[..., None] * (vein_color - image)
    image = image + 0.035 * grain[..., None]
    sx, sy = (float(c) for c in rng.uniform(0.0, 1.0, 2) * size)
    sheen = exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (0.3 * size**2))
    image = image * (lighting(rng, size, 0.08) + 0.05 * sheen)[..., None]
    return image.astype(np.float32), {}


def _marble_crack(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A thin, jagged dark fracture line, branching in half the cases."""
    size = clean.shape[0]
    scale = size / 256
    start = rng.uniform(0.15, 0.85, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    points = random_walk(rng, start, heading, 32, 2.5 * scale, turn_sigma=0.08, jitter=0.45)
    half_width = max(0.5, rng.uniform(0.6, 1.0) * scale)
    coverage = polyline_coverage(points, half_width, size)
    if rng.random() < 0.5:
        fork = points[rng.integers(8, 24)]
        branch = random_walk(
            rng,
            fork,
            heading + rng.choice([-1, 1]) * 0.8,
            12,
            2.5 * scale,
            turn_sigma=0.08,
            jitter=0.45,
        )
        coverage = np.maximum(coverage, polyline_coverage(branch, 0.8 * half_width, size))
    effect = clean * 0.25
    return effect, coverage


def _marble_pit(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A small crater lit from the top left: dark upper-left wall, bright lower-right."""
    size = clean.shape[0]
    center = rng.uniform(0.1, 0.9, 2) * size
    radius = rng.uniform(0.028, 0.05) * size
    distance = blob_distance(rng, size, center, radius, 0.25)
    yy, xx = grid(size)
    facing = ((xx - float(center[0])) + (yy - float(center[1]))) / float(np.sqrt(2) * radius)
    depth = np.clip(distance / radius, 0.0, 1.0)
    shade = np.clip(0.5 + 0.45 * facing * (1.0 - 0.5 * depth) - 0.15 * depth, 0.15, 1.1)
    effect = clean * shade[..., None]
    return effect, soft_weight(distance, 1.5 * size / 256)


def _marble_stain(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """Rust, oil or yellowing soaked into the stone: soft, blotchy, irregular."""
    size = clean.shape[0]
    center = rng.uniform(0.12, 0.88, 2) * size
    distance = blob_distance(rng, size, center, rng.uniform(0.045, 0.085) * size, 0.6)
    tints = [rgb(0.85, 0.52, 0.30), rgb(0.55, 0.52, 0.48), rgb(0.95, 0.80, 0.45)]
    tint = tints[rng.integers(len(tints))]
    blotch = np.clip(0.75 + 0.35 * smooth_noise(rng, size, max(8, size // 12)), 0.3, 1.0)
    effect = clean * tint
    weight = soft_weight(distance, 5.0 * size / 256) * blotch * 0.9
    return effect, weight


# --------------------------------------------------------------------------------------
# Category: disc (object)
# --------------------------------------------------------------------------------------


def _edge(signed: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-indicator from a signed distance in pixels."""
    return np.clip(signed + 0.5, 0.0, 1.0)


def _render_disc(rng: Rng, size: int) -> tuple[np.ndarray, Context]:
    """A turned steel washer under a fixed top-left light, slightly shifted and rotated."""
    scale = size / 256
    yy, xx = grid(size)
    cx, cy = (float(c) for c in size / 2 + rng.uniform(-0.02, 0.02, 2) * size)
    rotation = float(np.deg2rad(rng.uniform(-15.0, 15.0)))
    outer = 0.40 * size * rng.uniform(0.99, 1.01)
    dx, dy = xx - cx, yy - cy
    r = hypot(dx, dy)
    rho = r / outer
    light_x = light_y = -float(np.sqrt(0.5))  # image y points down: light from the top left
    # cos(angle between the outward radial direction and the light), without trigonometry.
    facing = (dx * light_x + dy * light_y) / np.maximum(r, 1e-3)

    # Background: dark matte plate with a soft shadow down-right of the part.
    background = rgb(0.19, 0.20, 0.22) * rng.uniform(0.95, 1.05) + rgb_jitter(rng, 0.003)
    plate = 1.0 + 0.05 * fractal_noise(rng, size, 4, 3)
    shadow_r = hypot(xx - cx - 4 * scale, yy - cy - 5 * scale)
    shadow = 0.45 * np.clip((outer + 6 * scale - shadow_r) / (12 * scale), 0.0, 1.0)
    bg = background * (plate * (1.0 - shadow) * lighting(rng, size, 0.1))[..., None]

    # Metal coverage: outer edge minus centre hole minus three bolt holes.
    hole_r, bolt_r, bolt_at = 0.16 * outer, 0.075 * outer, 0.68 * outer
    alpha = _edge(outer - r) * _edge(r - hole_r)
    bolt_ring = np.zeros_like(r, dtype=bool)
    bolt_facing = np.zeros_like(r)
    ring_r = bolt_r + 2.5 * scale
    for k in range(3):
        phi = rotation + k * 2 * np.pi / 3 + np.pi / 2
        bx, by = cx + bolt_at * float(cos(phi)), cy + bolt_at * float(sin(phi))
        win = np.s_[
            max(int(by - ring_r - 2), 0) : int(by + ring_r + 3),
            max(int(bx - ring_r - 2), 0) : int(bx + ring_r + 3),
        ]
        hx, hy = xx[win] - bx, yy[win] - by
        d = hypot(hx, hy)
        alpha[win] *= _edge(d - bolt_r)
        ring = d < ring_r
        bolt_ring[win] |= ring
        bolt_facing[win] += ring * (hx * light_x + hy * light_y) / np.maximum(d, 1e-3)

    # Shading by zone: turned face with a bow-tie highlight, matte boss, knurled bevel.
    radii = np.arange(0, size, 1.5, dtype=np.float32)
    turning = np.interp(r, radii, rng.standard_normal(radii.size)).astype(np.float32)
    face = (
        0.60
        - 0.13 * (2 * facing**2 - 1)
        + 0.025 * sin(r * np.float32(2 * np.pi / (2.2 * scale)))
        + 0.02 * turning
    )
    boss = 0.70 + 0.03 * fractal_noise(rng, size, max(8, size // 4), 2) - 0.05 * facing
    shade = np.where(rho < 0.5, boss, face)
    step = np.abs(rho - 0.5) * outer < 1.2 * scale
    shade = np.where(step, 0.35 - 0.2 * facing, shade)
    bevel = rho > 0.91
    knurl = 0.08 * cos(96 * (arctan2(dy, dx) - rotation))
    shade = np.where(bevel, 0.55 + 0.28 * facing + knurl, shade)
    chamfer = rho < 0.24
    shade = np.where(chamfer, 0.55 - 0.25 * facing, shade)
    shade = np.where(bolt_ring, 0.5 - 0.25 * bolt_facing, shade)

    steel = rgb(0.78, 0.79, 0.81) * rng.uniform(0.95, 1.05) + rgb_jitter(rng, 0.01)
    metal = steel * shade[..., None]
    image = bg + alpha[..., None] * (metal - bg)
    ctx: Context = {
        "center": (cx, cy),
        "outer": outer,
        "alpha": alpha,
        "bg": bg.astype(np.float32),
        "metal": metal.astype(np.float32),
    }
    return image.astype(np.float32), ctx


def _point_on_face(rng: Rng, ctx: Context, low: float, high: float) -> np.ndarray:
    """A random point on the metal face, between ``low`` and ``high`` times the radius."""
    cx, cy = ctx["center"]  # type: ignore[misc]
    outer = float(ctx["outer"])  # type: ignore[arg-type]
    angle = rng.uniform(0, 2 * np.pi)
    radius = outer * np.sqrt(rng.uniform(low**2, high**2))
    return np.array([cx + radius * cos(angle), cy + radius * sin(angle)])


def _disc_scratch(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved scratch on the metal, bright (catching light) or dark (deep)."""
    size = clean.shape[0]
    scale = size / 256
    start = _point_on_face(rng, ctx, 0.3, 0.85)
    points = random_walk(
        rng,
        start,
        rng.uniform(0, 2 * np.pi),
        24,
        rng.uniform(2.5, 4.0) * scale,
        turn_sigma=0.04,
        curvature=rng.normal(0.0, 0.06),
    )
    half_width = max(0.5, rng.uniform(0.7, 1.1) * scale)
    alpha = np.asarray(ctx["alpha"])
    coverage = polyline_coverage(points, half_width, size) * (alpha > 0.99)
    level = 0.97 if rng.random() < 0.5 else 0.22
    effect = np.full_like(clean, level)
    return effect, coverage * 0.9


def _disc_chip(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A piece broken off the rim: background shows through, the fracture edge is dark."""
    size = clean.shape[0]
    scale = size / 256
    cx, cy = ctx["center"]  # type: ignore[misc]
    outer = float(ctx["outer"])  # type: ignore[arg-type]
    angle = rng.uniform(0, 2 * np.pi)
    at = outer * rng.uniform(0.99, 1.04)
    center = (cx + at * cos(angle), cy + at * sin(angle))
    distance = blob_distance(rng, size, center, rng.uniform(0.045, 0.075) * size, 0.7)
    band = 2.5 * scale
    removed = _edge(distance)
    fracture = np.clip((distance + band + 0.5) / band, 0.0, 1.0) * (1.0 - removed)
    alpha = np.asarray(ctx["alpha"])
    bg, metal = np.asarray(ctx["bg"]), np.asarray(ctx["metal"])
    new_alpha = alpha * (1.0 - removed)
    broken = metal * (1.0 - 0.55 * fracture)[..., None]
    effect = bg + new_alpha[..., None] * (broken - bg)
    weight = ((distance > -band - 0.5) & (alpha > 0)).astype(np.float32)
    return effect, weight


def _disc_rust(rng: Rng, clean: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """A corrosion spot: orange-brown, mottled, with a soft, ragged edge."""
    size = clean.shape[0]
    center = _point_on_face(rng, ctx, 0.3, 0.85)
    distance = blob_distance(rng, size, center, rng.uniform(0.025, 0.05) * size, 0.6)
    mottle = smooth_noise(rng, size, max(8, size // 8))
    rust = rgb(0.55, 0.30, 0.14) * (0.8 + 0.35 * np.clip(mottle, -1, 1))[..., None]
    alpha = np.asarray(ctx["alpha"])
    weight = soft_weight(distance, 3.0 * size / 256) * np.clip(0.75 + 0.3 * mottle, 0.4, 1.0) * alpha
    return rust, weight


# --------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------

Renderer = Callable[[Rng, int], tuple[np.ndarray, Context]]
DefectRenderer = Callable[[Rng, np.ndarray, Context], tuple[np.ndarray, np.ndarray]]

_RENDERERS: dict[str, Renderer] = {
    "weave": _render_weave,
    "marble": _render_marble,
    "disc": _render_disc,
}
_DEFECT_RENDERERS: dict[str, dict[str, DefectRenderer]] = {
    "weave": {"hole": _weave_hole, "thread": _weave_thread, "color": _weave_color},
    "marble": {"crack": _marble_crack, "pit": _marble_pit, "stain": _marble_stain},
    "disc": {"scratch": _disc_scratch, "chip": _disc_chip, "rust": _disc_rust},
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def render_sample(
    category: str, defect: str | None, seed: int | Sequence[int], image_size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample as ``(clean, defective, mask)``.

    ``clean`` and ``defective`` are ``(H, W, 3)`` uint8 images that differ only inside
    ``mask`` (``(H, W)`` bool); for ``defect=None`` they are equal and the mask is empty.
    Exposed so tests and tools can compare a defect with its clean twin, which the files
    on disk cannot show. Shapes are redrawn (from the same generator, so still
    deterministic) until the mask area lies within the documented bounds.
    """
    if category not in _RENDERERS:
        raise ValueError(
            f"unknown embedded category {category!r}; choose from {EMBEDDED_CATEGORIES}"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    rng = np.random.default_rng(seed)
    clean, ctx = _RENDERERS[category](rng, image_size)
    defective = clean
    mask = np.zeros((image_size, image_size), bool)
    if defect is not None:
        try:
            render_defect = _DEFECT_RENDERERS[category][defect]
        except KeyError:
            raise ValueError(
                f"unknown defect {defect!r} for {category!r}; choose from {EMBEDDED_DEFECTS[category]}"
            ) from None
        for _ in range(100):
            effect, weight = render_defect(rng, clean, ctx)
            weight = np.where(weight >= _MIN_WEIGHT, weight, 0.0).astype(np.float32)
            mask = weight > 0
            if MIN_DEFECT_FRACTION <= mask.mean() <= MAX_DEFECT_FRACTION:
                break
        else:  # pragma: no cover - the shape parameters make this practically impossible
            raise RuntimeError(f"could not draw a {category}/{defect} defect of valid size")
        defective = clean + weight[..., None] * (effect - clean)
    noise = _SENSOR_NOISE * rng.standard_normal(clean.shape, dtype=np.float32)
    return _to_uint8(clean + noise), _to_uint8(defective + noise), mask
