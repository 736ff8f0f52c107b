"""The embedded dataset on disk: MVTec AD layout, one seed per image, a versioned cache.

The benchmark and the test suite must run on a machine with no data and no network, so
:func:`ensure_embedded_dataset` renders a small procedural dataset (the categories and
defects of :mod:`adbench.datamodules.embedded_render`) once, under a minute on two cores,
into a cache folder and then reuses it. Every image comes from its own generator, seeded
with ``[category index, split index, image index]``, so a run gives the same bytes every
time, whatever the order or parallelism of generation, and on every CPU.

A finished dataset holds a marker file naming :data:`DATASET_VERSION` and the image size;
a folder without a matching marker (half-written, outdated, or someone else's) is never
used, and concurrent processes each render into a temporary folder and rename it into
place, so they cannot see or leave a partial copy.
"""

import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from adbench.datamodules.embedded_render import (
    EMBEDDED_CATEGORIES,
    EMBEDDED_DEFECTS,
    MIN_IMAGE_SIZE,
    render_sample,
)

__all__ = [
    "DATASET_VERSION",
    "ENV_VAR",
    "NUM_PER_DEFECT",
    "NUM_TEST_GOOD",
    "NUM_TRAIN_GOOD",
    "default_root",
    "ensure_embedded_dataset",
]

#: Bump whenever the rendered bytes change, so cached copies of older versions are not used.
DATASET_VERSION = 2
#: Environment variable naming the dataset root (overrides the cache folder).
ENV_VAR = "ADBENCH_EMBEDDED_ROOT"
#: File written last into a finished dataset; a folder without it is never used.
MARKER_NAME = ".complete"

NUM_TRAIN_GOOD = 60
NUM_TEST_GOOD = 15
NUM_PER_DEFECT = 8

#: Split indices used in the per-image seed ``[category, split, image]``.
_SPLIT_TRAIN_GOOD = 0
_SPLIT_TEST_GOOD = 1
_SPLIT_FIRST_DEFECT = 2


def _save_png(array: np.ndarray, path: Path) -> None:
    # PIL writes no timestamp into PNGs, so equal arrays give equal bytes. Level 1 is
    # several times faster than the default and the noisy images barely compress anyway.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _dataset_plan() -> list[tuple[int, str, int, str, int]]:
    """Every image to write, as ``(category index, category, split index, folder, index)``."""
    plan = []
    for c, category in enumerate(EMBEDDED_CATEGORIES):
        folders = [
            (_SPLIT_TRAIN_GOOD, "good", NUM_TRAIN_GOOD),
            (_SPLIT_TEST_GOOD, "good", NUM_TEST_GOOD),
        ]
        folders += [
            (_SPLIT_FIRST_DEFECT + k, defect, NUM_PER_DEFECT)
            for k, defect in enumerate(EMBEDDED_DEFECTS[category])
        ]
        for split, name, count in folders:
            plan += [(c, category, split, name, i) for i in range(count)]
    return plan


def _write_one(root: Path, image_size: int, item: tuple[int, str, int, str, int]) -> None:
    c, category, split, name, i = item
    defect = None if name == "good" else name
    _, image, mask = render_sample(category, defect, [c, split, i], image_size)
    stage = "train" if split == _SPLIT_TRAIN_GOOD else "test"
    _save_png(image, root / category / stage / name / f"{i:03d}.png")
    if defect is not None:
        _save_png(
            mask.astype(np.uint8) * 255,
            root / category / "ground_truth" / name / f"{i:03d}_mask.png",
        )


def _write_dataset(root: Path, image_size: int) -> None:
    """Write every category into ``root`` (which must exist) in MVTec AD layout.

    Images are independent (each has its own seed), so a few threads render them in
    parallel: numpy and zlib release the GIL for the heavy work, and the result does not
    depend on scheduling.
    """
    plan = _dataset_plan()
    for _, category, split, name, _ in plan:
        stage = "train" if split == _SPLIT_TRAIN_GOOD else "test"
        (root / category / stage / name).mkdir(parents=True, exist_ok=True)
        if name != "good":
            (root / category / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first exception from any worker.
        list(pool.map(lambda item: _write_one(root, image_size, item), plan))


def _marker_text(image_size: int) -> str:
    return f"adbench embedded dataset v{DATASET_VERSION} image_size={image_size}\n"


def _is_complete(root: Path, image_size: int) -> bool:
    try:
        return (root / MARKER_NAME).read_text() == _marker_text(image_size)
    except OSError:
        return False


def default_root(image_size: int = 256) -> Path:
    """``$ADBENCH_EMBEDDED_ROOT`` if set, else a versioned folder in ``~/.cache/adbench``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adbench" / f"embedded-v{DATASET_VERSION}-{image_size}"


def ensure_embedded_dataset(root: str | Path | None = None, image_size: int = 256) -> Path:
    """Return the embedded dataset's root folder, generating it there first if needed.

    Safe to call from many processes at once (e.g. one per DDP rank or sweep worker):
    each writes into its own temporary folder beside ``root`` and renames it into place
    only when complete; a process that loses the race discards its copy. A folder counts
    as a dataset only when it holds the marker file for this version and image size, so
    a half-written or outdated folder is never used.

    Args:
        root: where the dataset lives; ``None`` means :func:`default_root`.
        image_size: side length of the square images.

    Raises:
        FileExistsError: ``root`` is a non-empty folder that is not this dataset (we never
            delete data we did not write).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    root = default_root(image_size) if root is None else Path(root).expanduser()
    if _is_complete(root, image_size):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{str(root)!r} exists but holds no embedded dataset v{DATASET_VERSION} of size "
            f"{image_size} (no matching {MARKER_NAME}); remove it or choose another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        print(f"adbench: generating embedded dataset in {root}", file=sys.stderr)
        _write_dataset(tmp, image_size)
        (tmp / MARKER_NAME).write_text(_marker_text(image_size))
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a full one
        except OSError:
            if not _is_complete(root, image_size):
                raise
            # Another process finished first; its copy is identical, ours is discarded.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
