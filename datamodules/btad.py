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

from .base import AnomalyDataModule, DatasetError, Sample, image_files
from .download import download_file, extract_zip_category, needs_extraction
from .registry import register_dataset

BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")

BTAD_URL = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
BTAD_SHA256 = "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"
#: The archive's file name in the dataset root.
BTAD_ARCHIVE = "btad.zip"


def _images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing {what} folder {str(folder)!r} (expected BTAD layout)")
    return image_files(folder)


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

    def _category_dir(self, category: str) -> Path:
        root = self.dataset_root
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a folder")
        folder = root / category
        if not folder.is_dir():
            hint = "" if category in BTAD_CATEGORIES else f"; BTAD's categories: {', '.join(BTAD_CATEGORIES)}"
            raise FileNotFoundError(f"category {category!r} not found under {str(root)!r}: BTAD categories "
                                    f"there: {', '.join(self.find_categories()) or 'none'}{hint}")
        return folder

    def _looks_like_category(self, folder: Path) -> bool:
        return (folder / "train" / "ok").is_dir()

    def train_samples(self, category: str) -> list[Sample]:
        folder = self._category_dir(category) / "train" / "ok"
        files = _images(folder, "training")
        if not files:
            raise DatasetError(f"no images in training folder {str(folder)!r}")
        return [Sample(path, None, 0, "good") for path in files]

    def test_samples(self, category: str) -> list[Sample]:
        category_dir = self._category_dir(category)
        test_dir = category_dir / "test"
        if not test_dir.is_dir():
            raise FileNotFoundError(f"missing test folder {str(test_dir)!r} (expected BTAD layout)")
        samples = [Sample(path, None, 0, "good") for path in _images(test_dir / "ok", "test")]
        mask_dir = category_dir / "ground_truth" / "ko"
        masks = masks_by_stem(mask_dir)
        for path in _images(test_dir / "ko", "test"):
            if path.stem not in masks:
                raise DatasetError(f"defective test image {str(path)!r} has no mask "
                                   f"{path.stem}.* in {str(mask_dir)!r}")
            samples.append(Sample(path, masks[path.stem], 1, "ko"))
        if not samples:
            raise DatasetError(f"no images in test folder {str(test_dir)!r}")
        return samples

    def category_missing(self, category: str) -> bool:
        return needs_extraction(self.dataset_root / category, BTAD_ARCHIVE)

    def download_category(self, category: str) -> None:
        root = self.dataset_root
        archive = download_file(BTAD_URL, root / BTAD_ARCHIVE, BTAD_SHA256)
        extract_zip_category(archive, root, category)
