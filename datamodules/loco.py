"""MVTec LOCO AD (Bergmann et al., "Beyond Dents and Scratches: Logical Constraints in Unsupervised
Anomaly Detection and Localization", IJCV 130, 947-969, 2022): structural and logical anomalies.

The official layout, one folder per category (``breakfast_box``, ``juice_bottle``, ``pushpins``,
``screw_bag``, ``splicing_connectors``)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/validation/good/*.png                      (official validation: normal images)
    ROOT/CATEGORY/test/<good|logical_anomalies|structural_anomalies>/*.png
    ROOT/CATEGORY/ground_truth/<logical_anomalies|structural_anomalies>/<image stem>/000.png, 001.png, ...
    ROOT/CATEGORY/defects_config.json

A defective image has one mask file per annotated defect (nonzero pixels are the defect).

Choices that are our reading, not the paper's:

* A defective image's mask is the union of its mask files: its ``Sample.mask_path`` is the
  folder ``ground_truth/<type>/<stem>``, which :func:`adbench.datamodules.base.read_mask` reads as the
  union of the images in it, each file binarised by ``read_mask``'s rule (the official masks
  are 0/255).
* ``defects_config.json`` (the per-defect saturation thresholds of the paper's sPRO metric) is
  not read: the suite's pixel metrics are pixel AUROC, PRO and pixel F1-max on the merged
  masks, so the PRO reported here is not the paper's sPRO.
* ``defect_type`` is the test folder's name (``good``, ``logical_anomalies``,
  ``structural_anomalies``); test metrics are also reported per type, each against all good
  test images (:attr:`report_per_defect_type`), as the paper tabulates them.
* Validation: by default (``use_official_validation=True``) the official ``validation/good``
  images are the validation split and all of ``train/good`` is trained on; ``val_fraction`` is
  then ignored. As for every dataset, the base gives the validation images fixed synthetic
  anomalies (``validation_anomalies``) so that checkpoint selection has something to rank: the
  official split has no anomalies, and the test set is never looked at. With
  ``use_official_validation=False`` the validation split is carved from ``train/good`` as for
  MVTec AD, and ``validation/good`` is not used at all.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from . import download
from .base import AnomalyDataModule, DatasetError, Sample, image_files, select_shots
from .registry import register_dataset

LOCO_CATEGORIES: tuple[str, ...] = (
    "breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors",
)  # fmt: skip
#: The official archive (as anomalib publishes it); its top-level folders are the categories.
LOCO_URL = (
    "https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/"
    "download/430647091-1646842701/mvtec_loco_anomaly_detection.tar.xz"
)
LOCO_SHA256 = "9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687"
LOCO_ARCHIVE = "mvtec_loco_anomaly_detection.tar.xz"
GOOD = "good"


def _normal_images(folder: Path, what: str, hint: str = "") -> list[Sample]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing {what} folder {str(folder)!r} (expected MVTec LOCO AD layout){hint}")
    files = image_files(folder)
    if not files:
        raise DatasetError(f"no images in {what} folder {str(folder)!r}")
    return [Sample(path, None, 0, GOOD) for path in files]


def list_loco_test_samples(category_dir: Path) -> list[Sample]:
    """The test images of a category folder in LOCO layout; a defective image's ``mask_path`` is
    its folder of mask files (read as their union)."""
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"missing test folder {str(test_dir)!r} (expected MVTec LOCO AD layout)")
    samples = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = type_dir.name
        for path in image_files(type_dir):
            if defect == GOOD:
                samples.append(Sample(path, None, 0, defect))
                continue
            masks = category_dir / "ground_truth" / defect / path.stem
            if not masks.is_dir() or not image_files(masks):
                raise DatasetError(f"defective test image {str(path)!r} has no mask folder with mask images "
                                   f"at {str(masks)!r}")
            samples.append(Sample(path, masks, 1, defect))
    if not samples:
        raise DatasetError(f"no images in test folder {str(test_dir)!r}")
    return samples


@register_dataset("loco")
class MVTecLOCODataModule(AnomalyDataModule):
    """MVTec LOCO AD: one category (or several, or ``"all"``) under ``root`` in the official layout;
    see the module docstring for the layout and our choices, :class:`AnomalyDataModule` for the
    shared arguments. ``download=True`` fetches the official archive (SHA-256 verified).

    Args:
        use_official_validation: validate on the official ``validation/good`` images (with the
            base's synthetic anomalies) and train on all of ``train/good``; ``val_fraction`` is
            then ignored. ``False``: carve the validation split from ``train/good`` instead.
    """

    categories = LOCO_CATEGORIES
    report_per_defect_type = True

    def __init__(self, *args: Any, use_official_validation: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_official_validation = use_official_validation

    def category_folder(self, category: str) -> Path:
        """``category``'s folder, or an error that says what is there instead."""
        root = self.dataset_root
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a folder")
        folder = root / category
        if not folder.is_dir():
            present = self.find_categories()
            raise FileNotFoundError(
                f"category {category!r} not found under {str(root)!r}: MVTec LOCO AD categories there: "
                f"{', '.join(present) or 'none'} (official: {', '.join(LOCO_CATEGORIES)})"
            )
        return folder

    def _looks_like_category(self, folder: Path) -> bool:
        return (folder / "train" / GOOD).is_dir() and (folder / "test").is_dir()

    def train_samples(self, category: str) -> list[Sample]:
        return _normal_images(self.category_folder(category) / "train" / GOOD, "training")

    def validation_samples(self, category: str) -> list[Sample]:
        """The official validation images of ``category`` (all normal)."""
        return _normal_images(self.category_folder(category) / "validation" / GOOD, "validation",
                              "; use_official_validation=False carves validation from train/good")

    def test_samples(self, category: str) -> list[Sample]:
        return list_loco_test_samples(self.category_folder(category))

    def _split(self, category: str) -> tuple[list[Sample], list[Sample]]:
        if not self.use_official_validation:
            return super()._split(category)
        train = [replace(s, category=category) for s in self.train_samples(category)]
        val = [replace(s, category=category) for s in self.validation_samples(category)]
        if self.train_shots is not None:  # the few-shot draw, as the base does after its split
            train = select_shots(train, self.train_shots, self.split_seed)
        return train, val

    def category_missing(self, category: str) -> bool:
        return download.needs_extraction(self.dataset_root / category, LOCO_ARCHIVE)

    def download_category(self, category: str) -> None:
        # The module's constants are read at call time, so a mirror (or a test) can set them.
        download.download_category(self.dataset_root, category, LOCO_URL, LOCO_SHA256, LOCO_ARCHIVE)
