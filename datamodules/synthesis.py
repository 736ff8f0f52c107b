"""DRAEM pseudo-anomaly synthesis (Zavrtanik et al., "DRAEM - A discriminatively
trained reconstruction embedding for surface anomaly detection", ICCV 2021).

The recipe, as implemented by :class:`PseudoAnomalySynthesizer`:

1. With probability ``1 - anomaly_probability`` (0.5) the image is returned
   unchanged with an all-zero mask (``has_anomaly=False``, ``beta=nan``).
2. Otherwise a mask ``M`` is drawn by :func:`adbench.datamodules.perlin.perlin_mask`:
   Perlin noise with ``2**k`` cells per axis, ``k`` uniform in {0..5} and
   independent per axis, rotated by U(-90, 90) degrees, thresholded ``> 0.5``.
3. An anomaly source texture is drawn from a texture source (DTD images in the
   paper), resized to the image size and augmented by 3 of the 10 operations
   below, chosen uniformly without replacement and applied in random order.
4. ``beta ~ U(0, 0.8)`` and ``out = I*(1-M) + (1-beta)*A*M + beta*I*M``
   (:func:`blend`), with ``I`` the image and ``A`` the augmented texture / 255.
5. If ``M`` is empty the output equals the input and the sample is labelled
   normal (``has_anomaly=False``); ``beta`` then keeps its drawn value, so
   ``beta`` is nan exactly when step 1 chose a clean sample.

Choices the recipe leaves open, fixed here:

* Texture resize: ``cv2.resize`` with bilinear interpolation straight to the
  image size, aspect ratio not preserved (what DRAEM's code does).
* Mask: see :mod:`adbench.datamodules.perlin` (rotation about the centre, bilinear,
  zero outside the rotated field, so rotated-in corners are never anomalous).
* Augmentations: DRAEM used imgaug; these are the albumentations 2.0.8
  equivalents with DRAEM's ranges where albumentations can express them:
  gamma in [0.5, 2] (one gamma for all channels, imgaug drew one per channel);
  brightness x[0.8, 1.2] + [-30, 30] (on RGB rather than on HSV value);
  sharpen ``alpha`` in [0, 1] (PIL's factor < 1 also blurred; albumentations
  cannot); hue +-35 OpenCV units (+-70 deg, imgaug's +-50 of 255) and saturation
  +-50; solarize with threshold in [32, 128] applied with probability 0.5 as in
  DRAEM (``iaa.Solarize(0.5, ...)``), so it sometimes uses up one of the 3
  slots doing nothing; posterize to 1..8 bits; invert; PIL-style autocontrast
  (cutoff fixed at 0, albumentations has no range); PIL-style equalize;
  rotation by U(-45, 45) degrees with black fill. ``A.RandomOrder`` is used
  rather than ``A.SomeOf``: both pick ``n`` transforms uniformly without
  replacement, but ``SomeOf`` always applies them in list order while DRAEM
  applied them in random order.
* Randomness: every draw comes from the ``rng`` passed to ``__call__``, in the
  order coin, mask (exponents, gradients, angle), texture (source draw,
  augmentation seed), beta. For albumentations an integer seed is drawn from
  ``rng`` and fresh shared generators built from it are installed with
  ``Compose.set_random_state`` before each call. ``Compose.set_random_seed`` is
  deliberately not used: it seeds every child transform with the *same* seed,
  so the chosen transforms would all draw their parameters from the same
  uniform numbers (e.g. a large gamma always paired with a large brightness).
* Texture sources beyond DTD: :class:`ProceduralTextures` (no files at all)
  and :class:`SelfTextures` (the training images themselves, shuffled) are
  extensions, not part of DRAEM.

Recipes (:data:`SYNTHESIS_RECIPES`, an extension): ``draem`` is the recipe above,
what training uses; ``validation`` draws what training never draws, so that
validation anomalies rank how a model generalises from its synthesis rather than
how well it recalls it: filled, rotated ellipses (``mask_shape="ellipses"``,
:func:`ellipse_mask`) instead of Perlin blobs, smaller (1-3 of them, each 0.05-1 % of
the image, where DRAEM's Perlin masks cover a median 4 %), and weaker blends
(``beta ~ U(0.6, 0.9)``: at least 60 % of the original image inside the mask). Chosen
on validation data only (results/README.md, 2026-12-06): of the candidates tried, the
one that left a trained STPM's validation image and pixel AUROC below 1 on bottle. The
datamodule also draws them from texture classes training never sees
(:meth:`FolderTextures.split`).
"""

from __future__ import annotations

import math
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from adbench.datamodules.numerics import sin
from adbench.datamodules.perlin import perlin_mask, perlin_noise

__all__ = [
    "AnomalyDraw",
    "FolderTextures",
    "ProceduralTextures",
    "PseudoAnomalySynthesizer",
    "SelfTextures",
    "SYNTHESIS_RECIPES",
    "SynthesisResult",
    "TextureSource",
    "blend",
    "build_texture_augmentation",
    "ellipse_mask",
    "make_texture_source",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

#: A scalar pattern generator: (rng, (height, width)) -> float32 field in [0, 1].
Pattern = Callable[[np.random.Generator, tuple[int, int]], np.ndarray]


# --------------------------------------------------------------------------- textures


@runtime_checkable
class TextureSource(Protocol):
    """Anything that yields anomaly source textures."""

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A uint8 ``(height, width, 3)`` RGB texture, ``size = (height, width)``."""
        ...


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``(height, width)``, ignoring aspect ratio as DRAEM does."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


class FolderTextures:
    """Textures read from a folder tree, e.g. DTD's ``images/<class>/*.jpg``.

    Every ``.jpg``/``.jpeg``/``.png`` (any case) below ``root`` is a candidate; the
    list is sorted so a seed picks the same file on every machine. Images are
    decoded lazily with Pillow, converted to RGB (grayscale is replicated, alpha
    is dropped as ``cv2.imread`` would), resized to the requested size and kept
    in an LRU cache keyed by (file, size): DTD has thousands of JPEGs, decoding
    one costs several ms, and at 256x256 a cached texture is only 192 KiB.
    Each DataLoader worker holds its own cache; pickling drops it.
    """

    def __init__(self, root: str | os.PathLike[str], cache_size: int = 512) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"texture folder {str(self.root)!r} does not exist")
        self.paths = sorted(
            path
            for path in self.root.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not self.paths:
            raise ValueError(
                f"texture folder {str(self.root)!r} contains no .jpg/.jpeg/.png images"
            )
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, tuple[int, int]], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def split(self, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[FolderTextures, FolderTextures]:
        """Two disjoint sources: (kept, held out). Whole texture classes (sub-folders, e.g. DTD's
        ``banded``) are held out when there are at least two, so the held-out textures are of
        kinds the kept ones never show; otherwise files are split. Seeded, reproducible."""
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        groups: dict[Path, list[Path]] = {}
        for path in self.paths:
            groups.setdefault(path.parent, []).append(path)
        units = [groups[k] for k in sorted(groups)] if len(groups) >= 2 else [[p] for p in self.paths]
        if len(units) < 2:
            raise ValueError(f"texture folder {str(self.root)!r} has a single texture: nothing to hold out")
        n_held = min(len(units) - 1, max(1, int(round(len(units) * held_out_fraction))))
        order = np.random.default_rng(seed).permutation(len(units))
        held = {int(i) for i in order[:n_held]}
        parts = ([p for i, u in enumerate(units) if i not in held for p in u],
                 [p for i, u in enumerate(units) if i in held for p in u])  # fmt: skip
        return tuple(self._with_paths(sorted(paths)) for paths in parts)  # type: ignore[return-value]

    def _with_paths(self, paths: list[Path]) -> FolderTextures:
        source = FolderTextures.__new__(FolderTextures)
        source.root, source.paths, source.cache_size = self.root, paths, self.cache_size
        source._cache = OrderedDict()
        return source

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def load(self, index: int, size: tuple[int, int]) -> np.ndarray:
        """Image ``index`` as uint8 RGB of ``size``; a fresh copy, safe to modify."""
        key = (index, (int(size[0]), int(size[1])))
        cached = self._cache.get(key)
        if cached is None:
            cached = _resize(self._decode(self.paths[index]), key[1])
            self._cache[key] = cached
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return cached.copy()

    @staticmethod
    def _decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
        except OSError as error:
            raise ValueError(f"cannot decode texture image {str(path)!r}: {error}") from error

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        return self.load(int(rng.integers(len(self.paths))), size)


class ProceduralTextures:
    """Random colourful textures generated on the fly, so synthesis needs no download.

    Each texture is 1 to ``max_layers`` layers, each a scalar pattern mapped
    through a random 2-4 colour palette: multi-octave Perlin noise (plain or
    "turbulent" veins), stripes (sine, square or sawtooth, optionally warped),
    rotated checkers, or random soft discs. Later layers are mixed in through a
    smooth Perlin alpha map. This only imitates the variety of DTD (colour,
    frequency, orientation, edges); expect results to differ from DTD textures.
    """

    def __init__(self, max_layers: int = 2) -> None:
        if max_layers < 1:
            raise ValueError(f"max_layers must be >= 1, got {max_layers}")
        self.max_layers = max_layers
        self._patterns: tuple[Pattern, ...] = (
            self._fractal,
            self._stripes,
            self._checkers,
            self._blobs,
        )

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        texture = self._layer(rng, size)
        for _ in range(int(rng.integers(1, self.max_layers + 1)) - 1):
            alpha = _normalise(perlin_noise(size, (2, 2), rng))[..., None]
            texture = texture * (1.0 - alpha) + self._layer(rng, size) * alpha
        return np.clip(texture + 0.5, 0, 255).astype(np.uint8)

    def _layer(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """One coloured pattern, float32 (H, W, 3) in [0, 255]."""
        pattern = self._patterns[int(rng.integers(len(self._patterns)))]
        field = np.clip(pattern(rng, size), 0.0, 1.0)
        n_colours = int(rng.integers(2, 5))
        colours = rng.uniform(0.0, 255.0, size=(n_colours, 3))
        knots = np.linspace(0.0, 1.0, n_colours)
        levels = np.linspace(0.0, 1.0, 256)
        lut = np.stack([np.interp(levels, knots, colours[:, c]) for c in range(3)], axis=-1)
        return lut.astype(np.float32)[np.rint(field * 255.0).astype(np.uint8)]

    @staticmethod
    def _coordinates(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """Pixel coordinate along a random direction, (H, W) float32."""
        theta = rng.uniform(0.0, math.pi)
        rows = np.arange(size[0], dtype=np.float32)[:, None]
        cols = np.arange(size[1], dtype=np.float32)[None, :]
        return np.float32(math.cos(theta)) * cols + np.float32(math.sin(theta)) * rows

    @staticmethod
    def _fractal(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        base = (2 ** int(rng.integers(0, 4)), 2 ** int(rng.integers(0, 4)))
        persistence = rng.uniform(0.35, 0.7)
        total = np.zeros(size, dtype=np.float32)
        for octave in range(int(rng.integers(2, 5))):
            res = (min(base[0] * 2**octave, size[0]), min(base[1] * 2**octave, size[1]))
            total += np.float32(persistence**octave) * perlin_noise(size, res, rng)
        if rng.random() < 0.3:  # turbulence: sharp veins along the zero crossings
            total = 1.0 - np.abs(total)
        return _normalise(total)

    @classmethod
    def _stripes(cls, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        period = math.exp(rng.uniform(math.log(4.0), math.log(max(size) / 2.0)))
        phase = cls._coordinates(rng, size) / np.float32(period)
        if rng.random() < 0.5:  # wavy stripes
            phase += np.float32(rng.uniform(0.5, 3.0)) * perlin_noise(size, (2, 2), rng)
        profile = int(rng.integers(3))
        if profile == 0:
            return 0.5 + 0.5 * sin(np.float32(2.0 * math.pi) * phase)
        if profile == 1:
            return (phase % 1.0 < rng.uniform(0.2, 0.8)).astype(np.float32)
        return phase % 1.0

    @classmethod
    def _checkers(cls, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        cell = np.float32(rng.uniform(4.0, max(size) / 4.0))
        u = np.floor(cls._coordinates(rng, size) / cell)
        v = np.floor(cls._coordinates(rng, size) / cell)
        return ((u + v) % 2.0).astype(np.float32)

    @staticmethod
    def _blobs(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        height, width = size
        canvas = np.full(size, rng.uniform(0.0, 1.0), dtype=np.float32)
        max_radius = max(2, min(size) // 6)
        for _ in range(int(rng.integers(5, 60))):
            centre = (int(rng.integers(width)), int(rng.integers(height)))
            radius = int(rng.integers(2, max_radius + 1))
            cv2.circle(canvas, centre, radius, float(rng.uniform(0.0, 1.0)), -1, cv2.LINE_AA)
        if rng.random() < 0.5:
            canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(1.0, 4.0))
        return canvas


def _normalise(field: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (constant fields become 0)."""
    low, high = float(field.min()), float(field.max())
    return (field - np.float32(low)) / np.float32(max(high - low, 1e-6))


class SelfTextures:
    """Textures cut from the training images themselves (an extension to DRAEM).

    ``images`` is anything with ``len`` and integer indexing whose items are uint8
    ``(H, W, 3)`` RGB arrays (``(H, W)`` grayscale is replicated): a list of
    arrays, a stacked ``(N, H, W, 3)`` array, or a lazily loading wrapper with
    ``__getitem__`` that decodes on demand (so nothing need be held in memory).
    The images are never modified. A sampled texture is a random image, rotated
    by a multiple of 90 degrees, maybe mirrored, resized to ``size`` and cut into
    a ``g x g`` grid (``g`` in {1, 2, 4, 8}) whose tiles are shuffled, so the
    texture keeps the object's own colours and materials but not its layout.
    """

    def __init__(self, images: Sequence[np.ndarray] | np.ndarray) -> None:
        if len(images) == 0:
            raise ValueError("SelfTextures needs at least one image")
        self.images = images

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        image = np.asarray(self.images[int(rng.integers(len(self.images)))])
        if image.dtype != np.uint8:
            raise TypeError(f"SelfTextures expects uint8 images, got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        image = np.rot90(image, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        texture = _resize(np.ascontiguousarray(image[..., :3]), size).copy()
        grid = 2 ** int(rng.integers(0, 4))
        tile_h, tile_w = size[0] // grid, size[1] // grid
        if grid > 1 and tile_h > 0 and tile_w > 0:
            region = texture[: grid * tile_h, : grid * tile_w]
            tiles = region.reshape(grid, tile_h, grid, tile_w, 3).swapaxes(1, 2)
            tiles = tiles.reshape(grid * grid, tile_h, tile_w, 3)[rng.permutation(grid * grid)]
            region[...] = (
                tiles.reshape(grid, grid, tile_h, tile_w, 3)
                .swapaxes(1, 2)
                .reshape(grid * tile_h, grid * tile_w, 3)
            )
        return texture


def make_texture_source(
    spec: str | os.PathLike[str] | None,
    images: Sequence[np.ndarray] | np.ndarray | None = None,
) -> TextureSource:
    """Texture source from a config string.

    ``None`` or ``"procedural"`` -> :class:`ProceduralTextures` (works offline);
    ``"self"`` -> :class:`SelfTextures` over ``images`` (required then); anything
    else is a folder path -> :class:`FolderTextures` (name a folder literally
    called ``self`` as ``./self``).
    """
    if spec is None or spec == "procedural":
        return ProceduralTextures()
    if spec == "self":
        if images is None:
            raise ValueError("texture source 'self' needs the training images (images=...)")
        return SelfTextures(images)
    return FolderTextures(spec)


# --------------------------------------------------------------------------- synthesis

#: ``mask_shape`` values of :class:`PseudoAnomalySynthesizer`.
MASK_SHAPES = ("perlin", "ellipses")
#: Named recipes: keyword arguments of :class:`PseudoAnomalySynthesizer` (see the module docstring).
SYNTHESIS_RECIPES: dict[str, dict[str, Any]] = {
    "draem": {},
    "validation": {"mask_shape": "ellipses", "ellipse_area": (0.0005, 0.01), "ellipse_count": (1, 3),
                   "beta_range": (0.6, 0.9)},
}


def ellipse_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    area: tuple[float, float] = (0.0005, 0.01),
    count: tuple[int, int] = (1, 3),
) -> np.ndarray:
    """Filled, rotated ellipses: float32 ``shape`` array in {0, 1}, never empty.

    ``n ~ U{count}`` ellipses, each of area ``a * H * W`` with ``a`` log-uniform in ``area``,
    aspect ratio U(1, 4), centre uniform over the image, angle U(0, 180) degrees; drawn in
    that order from ``rng``. Parts outside the image are cut off; a centre pixel is always set.
    """
    if not 0.0 < area[0] <= area[1] < 1.0:
        raise ValueError(f"ellipse area must satisfy 0 < low <= high < 1 (fractions of the image), got {area}")
    if not 1 <= count[0] <= count[1]:
        raise ValueError(f"ellipse count must satisfy 1 <= low <= high, got {count}")
    height, width = shape
    canvas = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        pixels = math.exp(rng.uniform(math.log(area[0]), math.log(area[1]))) * height * width
        aspect = rng.uniform(1.0, 4.0)
        major = math.sqrt(pixels * aspect / math.pi)
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        angle = float(rng.uniform(0.0, 180.0))
        axes = (max(1, round(major)), max(1, round(major / aspect)))
        cv2.ellipse(canvas, centre, axes, angle, 0.0, 360.0, 1, thickness=-1)
        canvas[centre[1], centre[0]] = 1
    return canvas.astype(np.float32)



def build_texture_augmentation(n_augmentations: int = 3) -> A.Compose:
    """DRAEM's texture augmentation: ``n`` of 10 ops, distinct, in random order.

    See the module docstring for how each imgaug op of the paper maps to
    albumentations. Every op has ``p=1`` except solarize (0.5, as in DRAEM).
    """
    ops = [
        A.RandomGamma(gamma_limit=(50, 200), p=1.0),
        A.RandomBrightnessContrast(
            brightness_limit=(-30 / 255, 30 / 255), contrast_limit=(-0.2, 0.2), p=1.0
        ),
        A.Sharpen(alpha=(0.0, 1.0), lightness=(1.0, 1.0), p=1.0),
        A.HueSaturationValue(
            hue_shift_limit=(-35, 35), sat_shift_limit=(-50, 50), val_shift_limit=(0, 0), p=1.0
        ),
        A.Solarize(threshold_range=(32 / 255, 128 / 255), p=0.5),
        A.Posterize(num_bits=(1, 8), p=1.0),
        A.InvertImg(p=1.0),
        A.AutoContrast(method="pil", p=1.0),
        A.Equalize(mode="pil", p=1.0),
        A.Affine(rotate=(-45, 45), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
    ]
    if not 0 <= n_augmentations <= len(ops):
        raise ValueError(f"n_augmentations must be in [0, {len(ops)}], got {n_augmentations}")
    return A.Compose([A.RandomOrder(ops, n=n_augmentations, replace=False, p=1.0)], p=1.0)


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """DRAEM's blend ``I*(1-M) + (1-beta)*A*M + beta*I*M`` (float32 HxWx3).

    Written literally so it can be checked against the paper; for a binary mask
    it gives exactly ``I`` outside and exactly ``(1-beta)*A + beta*I`` inside (the
    extra terms are multiplications by 1 and additions of 0). A convex
    combination, so it stays in [0, 1] when ``I`` and ``A`` do.
    """
    m = mask[..., None]
    return image * (1.0 - m) + (1.0 - beta) * texture * m + beta * image * m


class SynthesisResult(NamedTuple):
    """One training sample after synthesis."""

    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    mask: np.ndarray  # float32 (H, W) in {0, 1}
    has_anomaly: bool  # False for clean samples and for empty masks
    beta: float  # blend weight of the original image; nan when left clean


class AnomalyDraw(NamedTuple):
    """The random ingredients of one anomalous sample (see ``draw``)."""

    mask: np.ndarray  # float32 (H, W) in {0, 1}, possibly empty
    texture: np.ndarray  # augmented texture A, float32 (H, W, 3) in [0, 1]
    beta: float


class PseudoAnomalySynthesizer:
    """Turns a normal image into a DRAEM pseudo-anomaly (see the module docstring).

    Stateless between calls apart from the reusable augmentation pipeline (and a
    folder source's decode cache), so one instance can serve any number of
    DataLoader worker processes, each passing its own ``rng``; the same ``rng``
    state always gives the same sample. Not for concurrent use from threads: the
    pipeline's random state is installed right before each call.
    """

    def __init__(
        self,
        texture_source: TextureSource,
        anomaly_probability: float = 0.5,
        beta_range: tuple[float, float] = (0.0, 0.8),
        perlin_min_exp: int = 0,
        perlin_max_exp: int = 5,
        threshold: float = 0.5,
        n_augmentations: int = 3,
        mask_shape: str = "perlin",
        ellipse_area: tuple[float, float] = (0.0005, 0.01),
        ellipse_count: tuple[int, int] = (1, 3),
    ) -> None:
        if mask_shape not in MASK_SHAPES:
            raise ValueError(f"mask_shape must be one of {MASK_SHAPES}, got {mask_shape!r}")
        if not 0.0 <= anomaly_probability <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
        if not 0.0 <= beta_range[0] <= beta_range[1] <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= low <= high <= 1, got {beta_range}")
        self.texture_source = texture_source
        self.anomaly_probability = anomaly_probability
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.perlin_min_exp = perlin_min_exp
        self.perlin_max_exp = perlin_max_exp
        self.threshold = threshold
        self.n_augmentations = n_augmentations
        self.mask_shape = mask_shape
        self.ellipse_area = (float(ellipse_area[0]), float(ellipse_area[1]))
        self.ellipse_count = (int(ellipse_count[0]), int(ellipse_count[1]))
        self._augmentation = build_texture_augmentation(n_augmentations)

    @classmethod
    def from_recipe(cls, texture_source: TextureSource, recipe: str) -> PseudoAnomalySynthesizer:
        """A synthesizer of one of :data:`SYNTHESIS_RECIPES` (``draem``: training's; ``validation``)."""
        if recipe not in SYNTHESIS_RECIPES:
            raise ValueError(f"synthesis recipe must be one of {tuple(SYNTHESIS_RECIPES)}, got {recipe!r}")
        return cls(texture_source, **SYNTHESIS_RECIPES[recipe])

    def augment_texture(self, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the random augmentation to a uint8 texture, seeded from ``rng``."""
        if self.n_augmentations == 0:
            return texture
        seed = int(rng.integers(2**63))
        self._augmentation.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self._augmentation(image=texture)["image"]

    def draw(self, rng: np.random.Generator, size: tuple[int, int]) -> AnomalyDraw | None:
        """The random ingredients of one sample, or None when it stays clean.

        ``__call__`` is exactly ``blend(image, *draw(rng, size))``, so tests (and
        visualisations) can inspect the texture and beta that went into a sample.
        """
        if rng.random() >= self.anomaly_probability:
            return None
        if self.mask_shape == "ellipses":
            mask = ellipse_mask(size, rng, self.ellipse_area, self.ellipse_count)
        else:
            mask = perlin_mask(
                size,
                rng,
                min_exp=self.perlin_min_exp,
                max_exp=self.perlin_max_exp,
                threshold=self.threshold,
            )
        texture = self.augment_texture(self.texture_source.sample(rng, size), rng)
        beta = float(rng.uniform(*self.beta_range))
        return AnomalyDraw(mask, texture.astype(np.float32) / np.float32(255.0), beta)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> SynthesisResult:
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        size = (image.shape[0], image.shape[1])
        ingredients = self.draw(rng, size)
        if ingredients is None:
            return SynthesisResult(image.copy(), np.zeros(size, np.float32), False, math.nan)
        mask, texture, beta = ingredients
        return SynthesisResult(blend(image, texture, mask, beta), mask, bool(mask.any()), beta)
