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

from pathlib import Path

from .base import AnomalyDataModule, DatasetError, Sample
from .mvtec import list_test_samples, list_train_samples, resolve_category
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

    def _category_dir(self, category: str) -> Path:
        root = self.dataset_root
        # resolve_category's message for a missing category speaks of MVTec AD's categories.
        if root.is_dir() and not (root / category).is_dir():
            hint = "" if category in MPDD_CATEGORIES else f"; MPDD's categories: {', '.join(MPDD_CATEGORIES)}"
            raise FileNotFoundError(f"category {category!r} not found under {str(root)!r}: MPDD categories "
                                    f"there: {', '.join(self.find_categories()) or 'none'}{hint}")
        return resolve_category(root, category)

    def _looks_like_category(self, folder: Path) -> bool:
        return (folder / "train" / "good").is_dir()

    def train_samples(self, category: str) -> list[Sample]:
        return list_train_samples(self._category_dir(category))

    def test_samples(self, category: str) -> list[Sample]:
        return list_test_samples(self._category_dir(category))

    def download_category(self, category: str) -> None:
        raise DatasetError(
            f"MPDD category {category!r} is not under {str(self.dataset_root)!r} and MPDD cannot be "
            f"downloaded by the suite (no archive with a published checksum): get it from {MPDD_SOURCE} "
            "and point root (--data.root) at the folder that holds its category folders"
        )
