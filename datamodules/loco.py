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
* The pixel metrics of the other datasets (pixel AUROC, PRO, ...) read the merged masks. The
  paper's sPRO (``spro_fpr05``, its headline, and ``spro``) reads each mask file as one defect
  with its saturation area from ``defects_config.json`` (:meth:`MVTecLOCODataModule.saturation_regions`):
  the file's nonzero pixel value names its entry; ``relative_saturation`` entries saturate at that
  fraction of the defect's area, the others at ``saturation_threshold`` pixels of the full-size
  image, scaled by the resize to ``image_size`` (our reading: the paper evaluates at full size),
  and never above the defect's area. A defect the resize shrinks to nothing is left out.
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

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import download
from .base import GOOD, AnomalyDataModule, DatasetError, Sample, image_files, normal_samples
from .mvtec import defect_folder_samples
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
#: Each category's per-defect saturation thresholds (sPRO).
LOCO_DEFECTS_CONFIG = "defects_config.json"
#: Where a defective test image's masks are: a folder of them (the trailing ``/``).
LOCO_MASK = "ground_truth/{defect}/{stem}/"


def list_loco_test_samples(category_dir: Path) -> list[Sample]:
    """The test images of a category folder in LOCO layout; a defective image's ``mask_path`` is
    its folder of mask files (read as their union)."""
    return defect_folder_samples(category_dir, MVTecLOCODataModule.title, LOCO_MASK)


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
    title = "MVTec LOCO AD"
    category_markers = ("train/good", "test")
    official_validation = "validation/good"
    archive_name = LOCO_ARCHIVE

    def __init__(self, *args: Any, use_official_validation: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_official_validation = use_official_validation
        self._defects_configs: dict[Path, dict[int, dict[str, Any]]] = {}

    def train_samples(self, category: str) -> list[Sample]:
        return normal_samples(self.category_folder(category) / "train" / GOOD, "training", self.title)

    def test_samples(self, category: str) -> list[Sample]:
        return list_loco_test_samples(self.category_folder(category))

    def saturation_regions(self, image_path: str | Path, size: int) -> list[tuple[np.ndarray, float]]:
        """The defects of a test image for sPRO: per mask file of ``ground_truth/<type>/<stem>/``, its
        (size, size) bool mask and saturation area in pixels at that size (``[]`` for a good image)."""
        image_path = Path(image_path)
        category_dir, defect = image_path.parents[2], image_path.parent.name
        folder = category_dir / "ground_truth" / defect / image_path.stem
        if defect == GOOD or not folder.is_dir():
            return []
        config = self._defects_config(category_dir)
        regions = []
        for file in image_files(folder):
            with Image.open(file) as mask_image:
                values = np.asarray(mask_image.convert("L"))
                full_area, width_height = int((values > 0).sum()), mask_image.size
            if full_area == 0:
                continue
            value = int(values.max())
            if value not in config:
                raise DatasetError(f"mask {str(file)!r} has pixel value {value}, which no entry of "
                                   f"{str(category_dir / LOCO_DEFECTS_CONFIG)!r} names")
            mask = np.asarray(Image.fromarray(values > 0).resize((size, size), Image.Resampling.NEAREST))
            area = float(mask.sum())
            entry = config[value]
            if entry["relative_saturation"]:
                saturation = float(entry["saturation_threshold"]) * area
            else:
                saturation = float(entry["saturation_threshold"]) * size * size / (width_height[0] * width_height[1])
            regions.append((mask, min(saturation, area)))
        return regions

    def _defects_config(self, category_dir: Path) -> dict[int, dict[str, Any]]:
        """``defects_config.json`` of a category, by pixel value (read once)."""
        cache = self._defects_configs
        if category_dir not in cache:
            path = category_dir / LOCO_DEFECTS_CONFIG
            if not path.is_file():
                raise DatasetError(f"{str(path)!r} is missing: MVTec LOCO AD's sPRO needs each category's "
                                   "saturation thresholds")
            try:
                cache[category_dir] = {int(e["pixel_value"]): e for e in json.loads(path.read_text())}
            except (ValueError, KeyError, TypeError) as error:
                raise DatasetError(f"{str(path)!r} is not a list of defects with pixel_value, "
                                   f"saturation_threshold and relative_saturation: {error}") from error
        return cache[category_dir]

    def download_category(self, category: str) -> None:
        # The module's constants are read at call time, so a mirror (or a test) can set them.
        download.download_category(self.dataset_root, category, LOCO_URL, LOCO_SHA256, LOCO_ARCHIVE)
