"""MPDD, the Metal Parts Defect Detection dataset (Jezek et al., ICUMT 2021, "Deep learning-based
defect detection of metal parts: evaluating current methods in complex conditions").

Layout: MVTec AD's, exactly (read by :mod:`adbench.datamodules.mvtec`'s layout functions)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<defect or good>/*.png
    ROOT/<category>/ground_truth/<defect>/<image stem>_mask.png

Split: the official one, by folder (``train/good`` for training, ``test/*`` for testing);
``defect_type`` is the defect folder's name.

MPDD publishes no archive with a checksum (it is distributed from
https://github.com/stepanje/MPDD through a shared drive), so the suite does not download it:
``download=True`` with a category missing fails and says where to get it.
"""

from __future__ import annotations

from .base import AnomalyDataModule, DatasetError, Sample
from .mvtec import list_test_samples, list_train_samples
from .registry import register_dataset

MPDD_CATEGORIES: tuple[str, ...] = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip

MPDD_SOURCE = "https://github.com/stepanje/MPDD"


@register_dataset("mpdd")
class MPDDDataModule(AnomalyDataModule):
    """MPDD: one category (or several, or ``all``); see :class:`AnomalyDataModule` for the
    arguments. Not downloadable by the suite: point ``root`` at a copy."""

    categories = MPDD_CATEGORIES
    title = "MPDD"
    category_markers = ("train/good",)

    def train_samples(self, category: str) -> list[Sample]:
        return list_train_samples(self.category_folder(category))

    def test_samples(self, category: str) -> list[Sample]:
        return list_test_samples(self.category_folder(category))

    def download_category(self, category: str) -> None:
        raise DatasetError(
            f"{self.title} category {category!r} is not under {str(self.dataset_root)!r} and it cannot be "
            f"downloaded by the suite (no archive with a published checksum): get it from {MPDD_SOURCE} "
            "and point root (--data.root) at the folder that holds its category folders"
        )
