"""A user's own data in any layout, described by arguments only (``--data folder``).

No paper: this is the way in for data that is not an official benchmark. Three folders or glob
patterns list the images, and a pattern with placeholders says where a defective image's mask
is. For example, MVTec AD's ``bottle`` in its original layout::

    --data folder --data.root /data/mvtec_ad/bottle --data.category bottle-folder
    --data.normal train/good --data.test_normal test/good
    --data.test_abnormal 'test/[!g]*/*.png' --data.mask 'ground_truth/{defect}/{stem}_mask.png'

and masks beside their images (``defects/crack/001.jpg`` with ``defects/crack/001.png``)::

    --data.test_abnormal 'defects/*/*.jpg' --data.mask '{parent}/{stem}.png'

Choices that are our reading of "any layout":

* A pattern is relative to ``root`` (default: the current folder) or absolute, and is expanded by
  :func:`glob.glob` (``*``, ``?``, ``[...]``, ``[!...]``, and ``**`` for any depth). A match that
  is a folder contributes the images directly in it (so a plain folder name works); a file
  counts if its suffix is in :data:`adbench.datamodules.base.IMAGE_SUFFIXES`. Hidden files are skipped
  (glob's rule). Each list is sorted by path.
* ``defect_type`` of a defective image is the name of its folder; normal test images are
  ``good``. A defective image in a folder named ``good`` is refused (almost always a pattern
  such as ``test/*/*.png`` that also caught the normal images).
* ``category`` is only the name of the data (run folders, leaderboards): one name, default
  ``custom``; the unified setting (several categories, ``all``) does not apply.
* With ``mask=None`` there are no pixel annotations: every mask is empty, so the pixel metrics
  (pixel AUROC, PRO, pixel F1-max) have no anomalous pixel to rank and are ``nan`` (reported as
  undefined, never as a number); image metrics are unaffected. Validation keeps its synthetic
  anomalies, whose masks are known, so checkpoint selection still uses both levels.
* A mask pattern may name a folder: its images are read as one mask, their union (as for MVTec
  LOCO AD's one file per defect).
* Refused as mistakes: a pattern that matches no image; a defective image without its mask; a
  file in two of the lists (an image both normal and defective, or a training image in the test
  set); a mask that is also listed as an image (a pattern that caught masks beside images).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from .base import GOOD, IMAGE_SUFFIXES, AnomalyDataModule, DatasetError, Sample, image_files
from .registry import register_dataset

#: The placeholders of the ``mask`` pattern.
MASK_PLACEHOLDERS = ("stem", "defect", "parent", "root")
DEFAULT_CATEGORY = "custom"


def match_images(root: Path, pattern: str, argument: str) -> list[Path]:
    """The images ``pattern`` (relative to ``root``, or absolute) matches: files with an image suffix,
    and the images directly in each matched folder; sorted, without repeats. ``argument`` names the
    pattern in errors."""
    matches = glob.glob(str(Path(pattern).expanduser()), root_dir=root, recursive=True)
    files: set[Path] = set()
    for match in matches:
        path = root / match  # an absolute match stays as it is
        if path.is_dir():
            files.update(image_files(path))
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.add(path)
    if not files:
        found = "it matches nothing"
        if matches:
            found = (f"it matches {len(matches)} path(s), none an image ({', '.join(IMAGE_SUFFIXES)}) "
                     "or a folder holding images")
        raise DatasetError(f"{argument} pattern {pattern!r}, resolved against {str(root)!r}: {found}")
    return sorted(files)


def check_mask_pattern(mask: str) -> None:
    """Refuse a ``mask`` pattern with a placeholder other than :data:`MASK_PLACEHOLDERS`."""
    try:
        mask.format(**dict.fromkeys(MASK_PLACEHOLDERS, "x"))
    except (KeyError, IndexError, ValueError) as error:
        allowed = ", ".join(f"{{{name}}}" for name in MASK_PLACEHOLDERS)
        raise ValueError(f"mask pattern {mask!r} is not usable ({type(error).__name__}: {error}); "
                         f"its placeholders are {allowed}") from None


@register_dataset("folder")
class FolderDataModule(AnomalyDataModule):
    """Images listed by folders or glob patterns (see the module docstring for the rules); the
    shared arguments are :class:`AnomalyDataModule`'s.

    Args:
        normal: folder or glob pattern of the normal training images (the validation split is
            carved from them, as for MVTec AD).
        test_normal: folder or glob pattern of the normal test images (``defect_type`` ``good``).
        test_abnormal: folder or glob pattern of the defective test images, possibly in several
            defect folders (``"defects/*/*.png"``); ``defect_type`` is the image's folder name.
        mask: where a defective image's mask is: a path pattern with the placeholders ``{stem}``
            (the image's file name without suffix), ``{defect}`` (its folder's name),
            ``{parent}`` (its folder) and ``{root}`` (the dataset root). A relative result is
            relative to ``root``: ``"{parent}/{stem}.png"`` is beside the image,
            ``"ground_truth/{defect}/{stem}_mask.png"`` MVTec AD's. A result that is a folder
            is read as the union of its images. ``None``: no masks (image-level only; pixel
            metrics ``nan``).

    ``root`` is the folder patterns are relative to (default: the current folder); ``category``
    names the data (default ``custom``).
    """

    def __init__(
        self,
        *args: Any,
        normal: str | None = None,
        test_normal: str | None = None,
        test_abnormal: str | None = None,
        mask: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not normal:
            raise ValueError("the folder dataset needs normal: the folder or glob pattern of the normal "
                             "training images (relative to root, or absolute)")
        names = [self.category] if isinstance(self.category, str) else list(self.category)
        if len(names) != 1 or "," in names[0] or names[0] == "all":
            raise ValueError(f"category {self.category!r}: for the folder dataset the category is only the "
                             "name of the data (one name: no commas, not 'all')")
        self.category = names[0]
        if mask is not None:
            check_mask_pattern(mask)
        self.normal = normal
        self.test_normal = test_normal
        self.test_abnormal = test_abnormal
        self.mask = mask

    def default_category(self) -> str | None:
        return DEFAULT_CATEGORY

    @property
    def dataset_root(self) -> Path:
        # Absolute (not resolved: the paths keep the prefix given), so that {parent} and {root}
        # are absolute and a relative mask pattern is relative to root alone.
        return Path(self.root or ".").expanduser().absolute()

    def find_categories(self) -> list[str]:
        return [self.category]

    def category_missing(self, category: str) -> bool:
        return False  # the user's own files: nothing to download

    def mask_of(self, image: Path) -> Path:
        """Where ``image``'s mask is, by the ``mask`` pattern (which must be set)."""
        assert self.mask is not None
        text = self.mask.format(stem=image.stem, defect=image.parent.name, parent=image.parent,
                                root=self.dataset_root)
        return self.dataset_root / Path(text).expanduser()

    def _lists(self) -> dict[str, list[Path]]:
        """Every given pattern's images, checked for files listed twice."""
        root = self.existing_root(self.dataset_root)
        patterns = {"normal": self.normal, "test_normal": self.test_normal, "test_abnormal": self.test_abnormal}
        lists = {name: match_images(root, pattern, name) for name, pattern in patterns.items() if pattern}
        seen: dict[Path, str] = {}
        for name, files in lists.items():
            for path in files:
                first = seen.setdefault(path.resolve(), name)
                if first != name:
                    raise DatasetError(f"image {str(path)!r} is listed by both {first} ({patterns[first]!r}) "
                                       f"and {name} ({patterns[name]!r}): the lists must not overlap")
        return lists

    def train_samples(self, category: str) -> list[Sample]:
        return [Sample(path, None, 0, GOOD) for path in self._lists()["normal"]]

    def test_samples(self, category: str) -> list[Sample]:
        lists = self._lists()
        if "test_normal" not in lists and "test_abnormal" not in lists:
            raise DatasetError("the folder dataset has no test images: give test_normal and/or test_abnormal")
        samples = [Sample(path, None, 0, GOOD) for path in lists.get("test_normal", [])]
        images = {path.resolve(): name for name, files in lists.items() for path in files}
        for path in lists.get("test_abnormal", []):
            if path.parent.name == GOOD:
                raise DatasetError(f"defective image {str(path)!r} is in a folder named 'good': narrow "
                                   f"test_abnormal ({self.test_abnormal!r}), e.g. 'test/[!g]*/*.png'")
            mask = None
            if self.mask is not None:
                mask = self.mask_of(path)
                if not mask.exists():
                    raise DatasetError(f"defective image {str(path)!r} has no mask at {str(mask)!r} "
                                       f"(mask pattern {self.mask!r})")
                if mask.resolve() in images:
                    raise DatasetError(f"{str(mask)!r} is the mask of {str(path)!r} but is also listed as an "
                                       f"image by {images[mask.resolve()]}: narrow that pattern (e.g. '*/*.jpg')")
            samples.append(Sample(path, mask, 1, path.parent.name))
        return samples
