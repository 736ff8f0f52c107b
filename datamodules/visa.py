"""VisA, the Visual Anomaly dataset (Zou et al., ECCV 2022, "SPot-the-Difference Self-Supervised
Pre-training for Anomaly Detection and Segmentation"), read in its official archive's layout.

Layout (as ``VisA_20220922.tar`` extracts)::

    ROOT/<category>/Data/Images/Normal/*.JPG
    ROOT/<category>/Data/Images/Anomaly/*.JPG
    ROOT/<category>/Data/Masks/Anomaly/<image stem>.png
    ROOT/<category>/image_anno.csv
    ROOT/split_csv/1cls.csv

Split: the official one-class split, ``split_csv/1cls.csv`` (columns ``object, split, label,
image, mask``; ``split`` is ``train`` or ``test``, ``label`` ``normal`` or ``anomaly``, ``image``
and ``mask`` are paths relative to ROOT, ``mask`` empty for normal images). Training images are
its ``train`` rows (all normal), test images its ``test`` rows; the folders themselves are not
listed, so an image that the CSV does not name is not used. Images differ in size between
categories; each mask has its image's size.

Masks are not 0/255: an anomalous pixel holds a small nonzero value (the defect's instance
number), and every nonzero pixel counts as anomalous (:func:`adbench.datamodules.base.read_mask`).

Our reading:

* ``defect_type`` of an anomalous test image is ``"anomaly"``: ``1cls.csv`` names no defect
  type (``image_anno.csv`` describes defects in free text, which is not used).
* ``download=True`` fetches the archive anomalib publishes with its SHA-256
  (:data:`VISA_URL`, :data:`VISA_SHA256`) and extracts the category and ``split_csv``, which sit
  at the archive's top level; the rest of the archive stays packed.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .base import GOOD, AnomalyDataModule, DatasetError, Sample
from .download import download_file, extract_category, needs_extraction
from .registry import register_dataset

VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip

VISA_URL = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
VISA_SHA256 = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"  # as anomalib publishes it
#: The archive's file name in the dataset root.
VISA_ARCHIVE = "VisA_20220922.tar"
#: The folder of the official split files, beside the categories.
SPLIT_FOLDER = "split_csv"
SPLIT_FILE = f"{SPLIT_FOLDER}/1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def read_split(root: Path, category: str) -> dict[str, list[Sample]]:
    """``category``'s rows of ``ROOT/split_csv/1cls.csv`` as samples, by split (``train``, ``test``)."""
    path = root / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"missing VisA split file {str(path)!r} (the official 1-class split; "
                                "it is in the VisA archive beside the category folders)")
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(f"VisA split file {str(path)!r} lacks column(s) {', '.join(missing)} "
                               f"(expected {', '.join(_COLUMNS)})")
        for line, row in enumerate(reader, start=2):
            if row["object"] != category:
                continue
            where = f"{str(path)!r} line {line}"
            if row["split"] not in splits or row["label"] not in _LABELS:
                raise DatasetError(f"{where}: split {row['split']!r} / label {row['label']!r} is not "
                                   f"train/test and normal/anomaly")
            splits[row["split"]].append(_sample(root, row, where))
    return splits


def _sample(root: Path, row: dict[str, str], where: str) -> Sample:
    image = root / row["image"]
    if not image.is_file():
        raise FileNotFoundError(f"image {str(image)!r} listed in {where} does not exist")
    if _LABELS[row["label"]] == 0:
        return Sample(image, None, 0, GOOD)
    if row["split"] == "train":
        raise DatasetError(f"{where}: an anomalous image in the training split of the 1-class split")
    mask = root / row["mask"] if row["mask"] else None
    if mask is None or not mask.is_file():
        raise DatasetError(f"defective test image {str(image)!r} has no mask "
                           f"{'listed' if mask is None else f'at {str(mask)!r}'} ({where})")
    return Sample(image, mask, 1, "anomaly")


@register_dataset("visa")
class VisADataModule(AnomalyDataModule):
    """VisA: one category (or several, or ``all``); see :class:`AnomalyDataModule` for the
    arguments. ``download=True`` fetches the official archive (SHA-256 verified)."""

    categories = VISA_CATEGORIES
    title = "VisA"
    category_markers = ("Data/Images",)
    archive_name = VISA_ARCHIVE

    def _rows(self, category: str, split: str) -> list[Sample]:
        self.category_folder(category)
        samples = read_split(self.dataset_root, category)[split]
        if not samples:
            raise DatasetError(f"no {split} rows for category {category!r} in "
                               f"{str(self.dataset_root / SPLIT_FILE)!r}")
        return samples

    def train_samples(self, category: str) -> list[Sample]:
        return self._rows(category, "train")

    def test_samples(self, category: str) -> list[Sample]:
        return self._rows(category, "test")

    def category_missing(self, category: str) -> bool:
        return super().category_missing(category) or needs_extraction(self.dataset_root / SPLIT_FOLDER, VISA_ARCHIVE)

    def download_category(self, category: str) -> None:
        root = self.dataset_root
        archive = download_file(VISA_URL, root / VISA_ARCHIVE, VISA_SHA256)
        # The split file first: a category folder in place is then always usable.
        for folder in (SPLIT_FOLDER, category):
            if needs_extraction(root / folder, VISA_ARCHIVE):
                extract_category(archive, root, folder)
