"""BTAD, the BeanTech Anomaly Detection dataset (Mishra et al., 2021, "VT-ADL: A Vision
Transformer Network for Image Anomaly Detection and Localization"), in its official layout.

Layout (three products, ``01``, ``02``, ``03``)::

    ROOT/<product>/train/ok/*
    ROOT/<product>/test/ok/*
    ROOT/<product>/test/ko/*
    ROOT/<product>/ground_truth/ko/<image stem>.<png or bmp>

Split: the official one, by folder: ``train/ok`` for training, ``test/ok`` and ``test/ko`` for
testing. Images are ``.bmp`` in 01 and 03 and ``.png`` in 02, so files are matched to their
masks by stem, whatever either's suffix. ``defect_type`` is ``"ko"`` for a defective image
(BTAD names no defect types) and ``"good"`` for an ``ok`` one.

Our reading: ``download=True`` fetches the ZIP the authors link (:data:`BTAD_URL`), verified
against :data:`BTAD_SHA256`; its products sit under a top folder
(``BTech_Dataset_transformed/``), which is stripped (any single top folder is).
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    GOOD,
    AnomalyDataModule,
    DatasetError,
    Sample,
    image_files,
    layout_folder,
    normal_samples,
)
from .download import download_file, extract_zip_category
from .registry import register_dataset

BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")

BTAD_URL = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
BTAD_SHA256 = "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"
#: The archive's file name in the dataset root.
BTAD_ARCHIVE = "btad.zip"


def masks_by_stem(folder: Path) -> dict[str, Path]:
    """The mask files in ``folder`` by stem; two masks of one stem are ambiguous and refused."""
    masks: dict[str, Path] = {}
    for path in image_files(folder) if folder.is_dir() else []:
        if path.stem in masks:
            raise DatasetError(f"two masks for one image in {str(folder)!r}: {masks[path.stem].name}, {path.name}")
        masks[path.stem] = path
    return masks


@register_dataset("btad")
class BTADDataModule(AnomalyDataModule):
    """BTAD: one product (or several, or ``all``); see :class:`AnomalyDataModule` for the
    arguments. ``download=True`` fetches the official archive (SHA-256 verified)."""

    categories = BTAD_CATEGORIES
    title = "BTAD"
    category_markers = ("train/ok",)
    archive_name = BTAD_ARCHIVE

    def train_samples(self, category: str) -> list[Sample]:
        return normal_samples(self.category_folder(category) / "train" / "ok", "training", self.title)

    def test_samples(self, category: str) -> list[Sample]:
        category_dir = self.category_folder(category)
        test_dir = layout_folder(category_dir / "test", "test", self.title)
        ok, ko = (image_files(layout_folder(test_dir / name, "test", self.title)) for name in ("ok", "ko"))
        samples = [Sample(path, None, 0, GOOD) for path in ok]
        mask_dir = category_dir / "ground_truth" / "ko"
        masks = masks_by_stem(mask_dir)
        for path in ko:
            if path.stem not in masks:
                raise DatasetError(f"defective test image {str(path)!r} has no mask "
                                   f"{path.stem}.* in {str(mask_dir)!r}")
            samples.append(Sample(path, masks[path.stem], 1, "ko"))
        if not samples:
            raise DatasetError(f"no images in test folder {str(test_dir)!r}")
        return samples

    def download_category(self, category: str) -> None:
        root = self.dataset_root
        archive = download_file(BTAD_URL, root / BTAD_ARCHIVE, BTAD_SHA256)
        extract_zip_category(archive, root, category)
