"""Perlin (gradient) noise and the thresholded Perlin masks of DRAEM.

DRAEM (Zavrtanik et al., ICCV 2021) shapes its pseudo-anomalies with a binary
mask made from Perlin noise: the noise scale is ``2**k`` cells per axis with
``k`` drawn uniformly from ``{min_exp, ..., max_exp}`` independently for the two
axes, the noise field is rotated by an angle drawn uniformly from [-90, 90]
degrees, and the mask is ``noise > threshold``.

Conventions (the recipe leaves them open; they are fixed here and tested):

* ``res = (ry, rx)`` means ``ry`` lattice cells span the image height and ``rx``
  the width. Pixel ``i`` of an axis with ``n`` pixels sits at lattice coordinate
  ``i * r / n``. For ``n`` divisible by ``r`` this is exactly DRAEM's grid (cells
  of ``n / r`` pixels); otherwise cells are simply a non-integer number of pixels
  wide, so no generate-larger-and-crop step is needed and the image still holds
  exactly ``r`` cells.
* Gradients are unit vectors with angles ``rng.uniform(0, 2*pi)``, one per lattice
  corner, ``(ry + 1) x (rx + 1)`` of them, drawn in row-major order; component 0
  pairs with the row offset. The quintic fade ``6t^5 - 15t^4 + 10t^3`` blends the
  four corner contributions and the result is scaled by ``sqrt(2)`` as in DRAEM,
  so values lie in [-1, 1] (the threshold 0.5 refers to this scale).
* Rotation is about the image centre, keeps the image size, uses bilinear
  interpolation and fills everything that comes from outside the image with 0
  (imgaug's ``Affine`` defaults, which DRAEM used). With a threshold >= 0 those
  corners therefore never belong to the mask. OpenCV quantises sub-pixel
  positions to 1/32 pixel, which is immaterial for a thresholded mask.
* Draw order from ``rng`` in :func:`perlin_mask`: the two exponents, the
  gradient angles, then the rotation angle.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "perlin_mask",
    "perlin_noise",
    "perlin_noise_from_gradients",
    "rotate_about_centre",
    "sample_perlin_scale",
]

_SQRT2 = np.float32(math.sqrt(2.0))


def _fade(t: np.ndarray) -> np.ndarray:
    """Quintic smoothstep: zero first and second derivative at cell borders."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _lattice_coordinates(n_pixels: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index and fractional position inside the cell of every pixel of one axis."""
    position = np.arange(n_pixels, dtype=np.float64) * (n_cells / n_pixels)
    cell = np.minimum(np.floor(position).astype(np.intp), n_cells - 1)
    return cell, (position - cell).astype(np.float32)


def perlin_noise_from_gradients(shape: tuple[int, int], gradients: np.ndarray) -> np.ndarray:
    """Perlin noise of ``shape`` from given corner gradients.

    ``gradients`` has shape ``(ry + 1, rx + 1, 2)`` (unit vectors, component 0
    along rows). Kept separate from :func:`perlin_noise` so the interpolation can
    be checked against a reference formula with known gradients.
    """
    height, width = shape
    n_rows, n_cols = gradients.shape[0] - 1, gradients.shape[1] - 1
    if n_rows < 1 or n_cols < 1 or gradients.shape[2] != 2:
        raise ValueError(f"gradients must have shape (ry+1, rx+1, 2), got {gradients.shape}")
    cell_y, frac_y = _lattice_coordinates(height, n_rows)
    cell_x, frac_x = _lattice_coordinates(width, n_cols)
    grad_y = gradients[..., 0].astype(np.float32)
    grad_x = gradients[..., 1].astype(np.float32)
    fy, fx = frac_y[:, None], frac_x[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of each pixel's offset to corner (dy, dx) with that corner's gradient."""
        rows, cols = cell_y + dy, cell_x + dx
        return grad_y[rows][:, cols] * (fy - dy) + grad_x[rows][:, cols] * (fx - dx)

    u, v = _fade(fx), _fade(fy)
    top = corner(0, 0)
    top += u * (corner(0, 1) - top)
    bottom = corner(1, 0)
    bottom += u * (corner(1, 1) - bottom)
    top += v * (bottom - top)
    top *= _SQRT2
    return top


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D Perlin noise, float32 of ``shape``, values in [-1, 1], ``res`` cells per axis.

    Works for any ``shape``; see the module docstring for how non-divisible
    shapes and the gradient draw are handled.
    """
    n_rows, n_cols = int(res[0]), int(res[1])
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"res must be positive, got {res}")
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(n_rows + 1, n_cols + 1))
    # float64 cos/sin whose last bit may depend on the CPU's SIMD kernels; the gradients are
    # rounded to float32 before use, which removes that bit (the rule of datamodules/numerics.py).
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return perlin_noise_from_gradients(shape, gradients)


def sample_perlin_scale(
    rng: np.random.Generator, min_exp: int = 0, max_exp: int = 5
) -> tuple[int, int]:
    """``(2**ky, 2**kx)`` with ky, kx independent and uniform on {min_exp..max_exp}."""
    if not 0 <= min_exp <= max_exp:
        raise ValueError(f"need 0 <= min_exp <= max_exp, got {min_exp}, {max_exp}")
    exp_y, exp_x = rng.integers(min_exp, max_exp + 1, size=2)
    return 2 ** int(exp_y), 2 ** int(exp_x)


def rotate_about_centre(field: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate a 2-D float field about its centre; same size, bilinear, zero outside."""
    height, width = field.shape
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, float(angle_deg), 1.0)
    return cv2.warpAffine(
        np.ascontiguousarray(field, dtype=np.float32),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    min_exp: int = 0,
    max_exp: int = 5,
    threshold: float = 0.5,
    rotate: bool = True,
) -> np.ndarray:
    """DRAEM's anomaly mask: float32 ``shape`` array in {0, 1}.

    Scale ``2**k`` per axis (k uniform in {min_exp..max_exp}, independent per
    axis), noise rotated by U(-90, 90) degrees when ``rotate``, then
    ``noise > threshold``. The mask may be empty; deciding what that means is
    the caller's business.
    """
    res = sample_perlin_scale(rng, min_exp, max_exp)
    noise = perlin_noise(shape, res, rng)
    if rotate:
        noise = rotate_about_centre(noise, rng.uniform(-90.0, 90.0))
    return (noise > threshold).astype(np.float32)
