r"""A user's own data in any layout, described by arguments only (``--data folder``).

No paper: this is the way in for data that is not an official benchmark. Three folders or glob
patterns list the images, and a pattern with placeholders says where a defective image's mask
is. For example, MVTec AD's ``bottle`` in its original layout::

    --data folder --data.root /data/mvtec_ad/bottle --data.category bottle-folder
    --data.normal train/good --data.test_normal test/good
    --data.test_abnormal 'test/[!g]*/*.png' --data.mask 'ground_truth/{defect}/{stem}_mask.png'

and masks beside their images (``defects/crack/001.jpg`` with ``defects/crack/001.png``)::

    --data.test_abnormal 'defects/*/*.jpg' --data.mask '{parent}/{stem}.png'

The Magnetic Tile Defect dataset (Huang et al., The Visual Computer 2020; one folder ``MT_<type>/Imgs``
per type, each ``exp1_num_xxx.jpg`` with its mask ``exp1_num_xxx.png`` in the same folder; no
test split of normal images is published), a fifth of the normal images carved out for testing::

    --data.root MTD --data.normal MT_Free/Imgs --data.normal_test_split 0.2
    --data.test_abnormal 'MT_[!F]*/Imgs' --data.masks_beside .png --data.defect 'MT_(\w+)/Imgs'

Choices that are our reading of "any layout":

* A pattern is relative to ``root`` (default: the current folder) or absolute, and is expanded by
  :func:`glob.glob` (``*``, ``?``, ``[...]``, ``[!...]``, and ``**`` for any depth). A match that
  is a folder contributes the images directly in it (so a plain folder name works); a file
  counts if its suffix is in :data:`adbench.datamodules.base.IMAGE_SUFFIXES`. Hidden files are skipped
  (glob's rule). Each list is sorted by path.
* ``defect_type`` of a defective image is the name of its folder, unless ``defect`` says otherwise:
  a path part by index or a regex with one group, applied to the image's path relative to ``root``;
  normal test images are ``good``. A defective image in a folder named ``good`` (or whose rule gives
  ``good``) is refused (almost always a pattern such as ``test/*/*.png`` that also caught the normal
  images).
* ``masks_beside`` (a suffix, ``.png``): a file with that suffix that has a same-stem image with
  another suffix in its folder is that image's mask, never an image (so a pattern or folder may
  catch both); without a ``mask`` pattern it is a defective image's mask.
* ``normal_test_split``: a fraction of the ``normal`` images is carved out (seeded by
  ``split_seed``, the same files every run) and tested as normal images, for datasets that publish
  no normal test images; the carved files are listed by :attr:`FolderDataModule.normal_test_files`
  (and written to ``normal_test_list`` when given), and are never trained or validated on.
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
import re
from pathlib import Path
from typing import Any

import numpy as np

from .base import GOOD, IMAGE_SUFFIXES, AnomalyDataModule, DatasetError, Sample, image_files
from .registry import register_dataset

#: The placeholders of the ``mask`` pattern.
MASK_PLACEHOLDERS = ("stem", "defect", "parent", "root")
DEFAULT_CATEGORY = "custom"


def masks_beside_images(files: set[Path], suffix: str) -> set[Path]:
    """The files of ``files`` that are masks beside their images: ``suffix`` files (any case) whose
    folder holds an image of the same stem with another suffix."""
    suffix = suffix.lower()
    stems: dict[Path, set[str]] = {}  # folder -> stems of its images of another suffix

    def image_stems(folder: Path) -> set[str]:
        if folder not in stems:
            stems[folder] = {p.stem for p in image_files(folder) if p.suffix.lower() != suffix}
        return stems[folder]

    return {path for path in files if path.suffix.lower() == suffix and path.stem in image_stems(path.parent)}


def match_images(root: Path, pattern: str, argument: str, masks_beside: str | None = None) -> list[Path]:
    """The images ``pattern`` (relative to ``root``, or absolute) matches: files with an image suffix,
    and the images directly in each matched folder; sorted, without repeats. ``argument`` names the
    pattern in errors. With ``masks_beside`` (a suffix) the masks beside images are left out
    (:func:`masks_beside_images`)."""
    matches = glob.glob(str(Path(pattern).expanduser()), root_dir=root, recursive=True)
    files: set[Path] = set()
    for match in matches:
        path = root / match  # an absolute match stays as it is
        if path.is_dir():
            files.update(image_files(path))
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.add(path)
    masks = masks_beside_images(files, masks_beside) if masks_beside else set()
    files -= masks
    if not files:
        found = "it matches nothing"
        if masks:
            found = f"it matches only masks beside their images ({len(masks)}, masks_beside={masks_beside!r})"
        elif matches:
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


def check_defect_rule(defect: int | str | None) -> re.Pattern[str] | int | None:
    """The ``defect`` rule, checked: ``None``, a path-part index, or a regex compiled (one group)."""
    if defect is None or isinstance(defect, int):
        return defect
    try:
        pattern = re.compile(defect)
    except re.error as error:
        raise ValueError(f"defect regex {defect!r} does not compile: {error}") from None
    if pattern.groups != 1:
        raise ValueError(f"defect regex {defect!r} must have exactly one group (the defect type), "
                         f"it has {pattern.groups}")
    return pattern


def split_normal_test(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """``files`` split into (train, test), ``fraction`` of them (at least one) in test, drawn by
    ``seed`` from the sorted list; both sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"normal_test_split must be in [0, 1), got {fraction}")
    ordered = sorted(files)
    n_test = max(1, int(round(len(ordered) * fraction)))
    if n_test >= len(ordered):
        raise DatasetError(f"normal_test_split={fraction} of {len(ordered)} normal image(s) leaves none to train on")
    order = np.random.default_rng([seed, 7]).permutation(len(ordered))  # a stream of its own, not the val split's
    return [ordered[i] for i in sorted(order[n_test:])], [ordered[i] for i in sorted(order[:n_test])]


@register_dataset("folder")
class FolderDataModule(AnomalyDataModule):
    r"""Images listed by folders or glob patterns (see the module docstring for the rules); the
    shared arguments are :class:`AnomalyDataModule`'s.

    Args:
        normal: folder or glob pattern of the normal training images (the validation split is
            carved from them, as for MVTec AD).
        test_normal: folder or glob pattern of the normal test images (``defect_type`` ``good``).
        test_abnormal: folder or glob pattern of the defective test images, possibly in several
            defect folders (``"defects/*/*.png"``); ``defect_type`` is given by ``defect``.
        mask: where a defective image's mask is: a path pattern with the placeholders ``{stem}``
            (the image's file name without suffix), ``{defect}`` (its defect type, by ``defect``),
            ``{parent}`` (its folder) and ``{root}`` (the dataset root). A relative result is
            relative to ``root``: ``"{parent}/{stem}.png"`` is beside the image,
            ``"ground_truth/{defect}/{stem}_mask.png"`` MVTec AD's. A result that is a folder
            is read as the union of its images. ``None``: no masks (image-level only; pixel
            metrics ``nan``), unless ``masks_beside`` is set.
        defect: where a defective image's ``defect_type`` comes from: ``None``, its folder's name;
            an integer, that part of its path relative to ``root`` (``0`` the first folder, ``-2``
            its folder); a string, a regex with one group searched in that path (``/`` separated),
            the group being the type (Magnetic Tile Defect: ``"MT_(\w+)/Imgs"``).
        masks_beside: a suffix (``".png"``): files with it that have a same-stem image with another
            suffix in their folder are masks, never images; with ``mask=None`` they are the
            defective images' masks (``"{parent}/{stem}.png"``).
        normal_test_split: the fraction of the ``normal`` images carved out (seeded by
            ``split_seed``) as normal test images; ``0``: none. They are listed by
            :attr:`normal_test_files`.
        normal_test_list: a file to write :attr:`normal_test_files` into (one path a line,
            relative to ``root`` where possible) at setup; ``None``: not written.

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
        defect: int | str | None = None,
        masks_beside: str | None = None,
        normal_test_split: float = 0.0,
        normal_test_list: str | None = None,
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
        if masks_beside is not None and (not masks_beside.startswith(".") or masks_beside.lower() not in IMAGE_SUFFIXES):
            raise ValueError(f"masks_beside must be an image suffix such as '.png' ({', '.join(IMAGE_SUFFIXES)}), "
                             f"got {masks_beside!r}")
        if not 0.0 <= normal_test_split < 1.0:
            raise ValueError(f"normal_test_split must be in [0, 1), got {normal_test_split}")
        self.normal = normal
        self.test_normal = test_normal
        self.test_abnormal = test_abnormal
        self.mask = mask
        self.defect = defect
        self._defect_rule = check_defect_rule(defect)
        self.masks_beside = masks_beside
        self.normal_test_split = normal_test_split
        self.normal_test_list = normal_test_list
        #: The normal images carved out for testing (``normal_test_split``), sorted.
        self.normal_test_files: list[str] = []

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

    def defect_of(self, image: Path) -> str:
        """``image``'s defect type by the ``defect`` rule (its folder's name by default)."""
        rule = self._defect_rule
        if rule is None:
            return image.parent.name
        try:
            relative = image.relative_to(self.dataset_root)
        except ValueError:
            relative = image
        if isinstance(rule, int):
            parts = relative.parts
            if not -len(parts) <= rule < len(parts):
                raise DatasetError(f"defect={rule}: image {str(image)!r} has no path part {rule} "
                                   f"(its path relative to root, {relative.as_posix()!r}, has {len(parts)})")
            return parts[rule]
        found = rule.search(relative.as_posix())
        if not found or not found.group(1):
            raise DatasetError(f"defect regex {rule.pattern!r} does not match image {str(image)!r} "
                               f"(searched in {relative.as_posix()!r})")
        return found.group(1)

    def mask_of(self, image: Path) -> Path:
        """Where ``image``'s mask is, by the ``mask`` pattern, or beside it (``masks_beside``)."""
        if self.mask is None:
            assert self.masks_beside is not None
            beside = [p for p in image_files(image.parent)
                      if p.stem == image.stem and p.suffix.lower() == self.masks_beside.lower()]
            return beside[0] if beside else image.with_suffix(self.masks_beside)
        text = self.mask.format(stem=image.stem, defect=self.defect_of(image), parent=image.parent,
                                root=self.dataset_root)
        return self.dataset_root / Path(text).expanduser()

    def _lists(self) -> dict[str, list[Path]]:
        """Every given pattern's images, checked for files listed twice; ``normal_test_split``'s
        carved-out images as ``normal_carved`` (and out of ``normal``)."""
        root = self.existing_root(self.dataset_root)
        patterns = {"normal": self.normal, "test_normal": self.test_normal, "test_abnormal": self.test_abnormal}
        lists = {name: match_images(root, pattern, name, self.masks_beside)
                 for name, pattern in patterns.items() if pattern}
        seen: dict[Path, str] = {}
        for name, files in lists.items():
            for path in files:
                first = seen.setdefault(path.resolve(), name)
                if first != name:
                    raise DatasetError(f"image {str(path)!r} is listed by both {first} ({patterns[first]!r}) "
                                       f"and {name} ({patterns[name]!r}): the lists must not overlap")
        if self.normal_test_split > 0:
            lists["normal"], lists["normal_carved"] = split_normal_test(lists["normal"], self.normal_test_split,
                                                                        self.split_seed)
            self.normal_test_files = [str(p) for p in lists["normal_carved"]]
        return lists

    def train_samples(self, category: str) -> list[Sample]:
        return [Sample(path, None, 0, GOOD) for path in self._lists()["normal"]]

    def test_samples(self, category: str) -> list[Sample]:
        lists = self._lists()
        if not {"test_normal", "test_abnormal", "normal_carved"} & set(lists):
            raise DatasetError("the folder dataset has no test images: give test_normal and/or test_abnormal "
                               "(or normal_test_split)")
        samples = [Sample(path, None, 0, GOOD) for path in lists.get("test_normal", []) + lists.get("normal_carved", [])]
        images = {path.resolve(): name for name, files in lists.items() for path in files}
        for path in lists.get("test_abnormal", []):
            defect = self.defect_of(path)
            if path.parent.name == GOOD or defect == GOOD:
                raise DatasetError(f"defective image {str(path)!r} is in a folder named 'good' (or its defect "
                                   f"type is 'good'): narrow test_abnormal ({self.test_abnormal!r}), "
                                   "e.g. 'test/[!g]*/*.png'")
            mask = None
            if self.mask is not None or self.masks_beside is not None:
                mask = self.mask_of(path)
                if not mask.exists():
                    rule = f"mask pattern {self.mask!r}" if self.mask is not None else f"masks_beside {self.masks_beside!r}"
                    raise DatasetError(f"defective image {str(path)!r} has no mask at {str(mask)!r} ({rule})")
                if mask.resolve() in images:
                    raise DatasetError(f"{str(mask)!r} is the mask of {str(path)!r} but is also listed as an "
                                       f"image by {images[mask.resolve()]}: narrow that pattern (e.g. '*/*.jpg')")
            samples.append(Sample(path, mask, 1, defect))
        return samples

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.normal_test_list and self.normal_test_files:
            root = self.dataset_root
            lines = [Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else p
                     for p in self.normal_test_files]
            target = Path(self.normal_test_list).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(f"{line}\n" for line in lines))
