"""Reading image and mask files: decoding rules, the cheap header check, the on-disk cache.

Every dataset reads its files through :func:`read_image` and :func:`read_mask`, so one set of
rules (grayscale, 16-bit, palette and RGBA conversion; mask binarisation; size checks) holds
for every dataset, for the preloaded and the lazily decoded path alike
(:class:`adbench.datamodules.base.AnomalyDataset`).

:class:`DecodeCache` keeps resized images and masks as ``.npy`` files keyed by the source
files' paths, sizes on disk and modification times and by the target size, so a changed file is
decoded again. It is written only when a cache folder is given; each entry is written to a
temporary file and renamed into place, so DataLoader workers (or two runs) can fill one folder
at once and a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: The file suffixes read as images (any case), by every dataset.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Part of every cache key: bump it when :func:`read_image` or :func:`read_mask` change what they return.
CACHE_VERSION = 1


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used as it is; the message names it."""


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _open(path: Path, decode: bool = True) -> Image.Image:
    """``path`` opened (and decoded unless ``decode`` is false: the header only), or a
    :class:`DatasetError` naming it."""
    try:
        image = Image.open(path)
        if decode:
            image.load()
    except Image.DecompressionBombError as error:  # not an OSError: PIL's message names no file
        raise DatasetError(f"image {str(path)!r} is too large to decode safely ({error}); if it is "
                           "trusted, raise PIL.Image.MAX_IMAGE_PIXELS") from error
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {str(path)!r}: {error}") from error
    return image


def read_image(path: Path, size: int) -> np.ndarray:
    """Decode to uint8 RGB (H, W, 3) at ``size`` x ``size``; grayscale, 16-bit, palette, RGBA converted."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("RGB") clips 16-bit values instead of rescaling them.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array * (255.0 / max(array.max(), 1.0))).astype(np.uint8))
    image = image.convert("RGB")  # alpha is dropped, gray replicated
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _mask_files(path: Path, image_path: Path) -> list[Path]:
    """The files of a mask: ``path`` itself, or the images in it when it is a folder."""
    if not path.is_dir():
        return [path]
    files = image_files(path)
    if not files:
        raise DatasetError(f"mask folder {str(path)!r} of image {str(image_path)!r} holds no mask image")
    return files


def _check_mask_size(path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]) -> None:
    if mask_size != image_size:
        raise DatasetError(
            f"mask {str(path)!r} is {mask_size[0]}x{mask_size[1]} but its image "
            f"{str(image_path)!r} is {image_size[0]}x{image_size[1]}"
        )


def read_mask(path: Path, size: int, image_path: Path) -> np.ndarray:
    """Binary uint8 (H, W) mask at ``size``; must match its image's size on disk.

    ``path`` may be a folder: the mask is then the union of the image files directly in it,
    for datasets that annotate each defect of an image in a file of its own (MVTec LOCO AD's
    ``ground_truth/<type>/<stem>/000.png, 001.png, ...``). Each file is binarised as below.
    """
    if path.is_dir():
        return np.bitwise_or.reduce([read_mask(file, size, image_path) for file in _mask_files(path, image_path)])
    mask = _open(path)
    with Image.open(image_path) as image:
        _check_mask_size(path, mask.size, image_path, image.size)
    if mask.mode != "P":  # a palette mask's values are its labels; the palette only colours them
        mask = mask.convert("L")
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    array = np.asarray(mask)
    # Label masks (0/1, or VisA's instance ids 1, 2, 3...) mark every nonzero pixel; a mask drawn
    # in 0..255 (MVTec's 0/255) is cut at mid-grey so that faint compression noise is no defect.
    return (array > (127 if array.max() > 127 else 0)).astype(np.uint8)


def check_headers(pairs: Sequence[tuple[Path, Path | None]]) -> None:
    """Open every image's header, and its mask's (``(image, mask or None)`` pairs), without decoding:
    an unreadable file or a mask whose size differs from its image's fails here, naming the file,
    before training starts, instead of in a DataLoader worker hours later."""

    def check(pair: tuple[Path, Path | None]) -> None:
        image_path, mask_path = pair
        with _open(image_path, decode=False) as image:
            image_size = image.size
        if mask_path is not None:
            for file in _mask_files(mask_path, image_path):
                with _open(file, decode=False) as mask:
                    _check_mask_size(file, mask.size, image_path, image_size)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(check, pairs))


class DecodeCache:
    """Decoded, resized arrays as ``.npy`` files under ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()

    def entry(self, kind: str, size: int, sources: Sequence[Path]) -> Path:
        """The cache file of ``kind`` (``image``, ``mask``) at ``size`` read from ``sources``."""
        parts = [f"v{CACHE_VERSION}", kind, str(size)]
        for source in sources:
            stat = os.stat(source)
            parts += [os.path.realpath(source), str(stat.st_size), str(stat.st_mtime_ns)]
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npy"

    def get(self, kind: str, size: int, sources: Sequence[Path], decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array, or ``decode()``'s, stored for next time."""
        entry = self.entry(kind, size, sources)
        try:
            return np.load(entry)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError):  # damaged from outside: decode and replace it
            pass
        array = decode()
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(handle, "wb") as file:
                np.save(file, array)
            os.replace(temporary, entry)  # atomic: concurrent writers of one entry write the same bytes
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return array


def load_image(path: Path, size: int, cache: DecodeCache | None = None) -> np.ndarray:
    """:func:`read_image`, through ``cache`` when one is given."""
    if cache is None:
        return read_image(path, size)
    return cache.get("image", size, [path], lambda: read_image(path, size))


def load_mask(path: Path | None, size: int, image_path: Path, cache: DecodeCache | None = None) -> np.ndarray:
    """:func:`read_mask` (all zeros for ``path`` None), through ``cache`` when one is given; the
    key holds the image file too, whose size the mask is checked against."""
    if path is None:
        return np.zeros((size, size), dtype=np.uint8)
    if cache is None:
        return read_mask(path, size, image_path)
    sources = [*_mask_files(path, image_path), image_path]
    return cache.get("mask", size, sources, lambda: read_mask(path, size, image_path))


class DecodedOnAccess(Sequence):
    """A split's images (``kind="image"``) or masks (``"mask"``), indexable like the preloaded
    ``(N, ...)`` array but read from disk (or ``cache``) on each access, so nothing is held in
    memory. ``samples``: :class:`adbench.datamodules.base.Sample` objects (image and mask paths)."""

    def __init__(self, samples: Sequence, kind: str, size: int, cache: DecodeCache | None = None) -> None:
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
        self.samples, self.kind, self.size, self.cache = samples, kind, size, cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.read(index % len(self))

    def read(self, index: int) -> np.ndarray:
        """Item ``index``, decoded (or from the cache)."""
        sample = self.samples[index]
        if self.kind == "image":
            return load_image(sample.image_path, self.size, self.cache)
        return load_mask(sample.mask_path, self.size, sample.image_path, self.cache)


def default_workers() -> int:
    """DataLoader workers for lazily decoded data: the CPUs this process may use, less one for the
    training loop itself, between 1 and 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))
