"""MVTec AD (Bergmann et al., CVPR 2019), the suite's default dataset, and its on-disk layout.

The official layout (also accepted for any folder shaped the same way)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/test/<defect or good>/*.png
    ROOT/CATEGORY/ground_truth/<defect>/<image stem>_mask.png

Without a ``root`` the embedded procedural dataset is used (generated on first use, no
download). The layout functions here are shared by the datasets that copy it (MPDD).
"""

from __future__ import annotations

from pathlib import Path

from .base import AnomalyDataModule, DatasetError, Sample, image_files
from .download import download_mvtec, needs_extraction
from .embedded import EMBEDDED_CATEGORIES, ensure_embedded_dataset
from .registry import register_dataset

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip


def resolve_category(root: str | Path, category: str) -> Path:
    """The category folder, or an error that says what is there instead."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a folder")
    folder = root / category
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        hint = "" if category in MVTEC_CATEGORIES else (
            f"; {category!r} is not an MVTec AD category either ({', '.join(MVTEC_CATEGORIES)})"
        )
        raise FileNotFoundError(
            f"category {category!r} not found under {str(root)!r}: folders in MVTec layout there: "
            f"{', '.join(present) or 'none'}{hint}"
        )
    return folder


def list_train_samples(category_dir: Path) -> list[Sample]:
    folder = category_dir / "train" / "good"
    if not folder.is_dir():
        raise FileNotFoundError(f"missing training folder {str(folder)!r} (expected MVTec layout)")
    files = image_files(folder)
    if not files:
        raise DatasetError(f"no images in training folder {str(folder)!r}")
    return [Sample(path, None, 0, "good") for path in files]


def list_test_samples(category_dir: Path) -> list[Sample]:
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"missing test folder {str(test_dir)!r} (expected MVTec layout)")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in image_files(defect_dir):
            if defect == "good":
                samples.append(Sample(path, None, 0, defect))
                continue
            mask = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"defective test image {str(path)!r} has no mask at {str(mask)!r}")
            samples.append(Sample(path, mask, 1, defect))
    if not samples:
        raise DatasetError(f"no images in test folder {str(test_dir)!r}")
    return samples



@register_dataset("mvtec")
class MVTecDataModule(AnomalyDataModule):
    """MVTec AD: one category (or a folder in its layout); see :class:`AnomalyDataModule` for
    the arguments. ``root=None`` uses the embedded procedural dataset; ``category=None`` its
    first category. ``download=True`` fetches the official archive (SHA-256 verified)."""

    categories = MVTEC_CATEGORIES

    def default_category(self) -> str | None:
        return EMBEDDED_CATEGORIES[0] if self.root is None else None

    @property
    def dataset_root(self) -> Path:
        return ensure_embedded_dataset() if self.root is None else Path(self.root).expanduser()

    @property
    def category_dir(self) -> Path:
        """The folder of the (single) category."""
        return resolve_category(self.dataset_root, self.category_names[0])

    def find_categories(self) -> list[str]:
        root = self.dataset_root
        present = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
        known = [c for c in (*MVTEC_CATEGORIES, *EMBEDDED_CATEGORIES) if c in present]
        return known + [c for c in present if c not in known]

    def train_samples(self, category: str) -> list[Sample]:
        return list_train_samples(resolve_category(self.dataset_root, category))

    def test_samples(self, category: str) -> list[Sample]:
        return list_test_samples(resolve_category(self.dataset_root, category))

    def category_missing(self, category: str) -> bool:
        return self.root is not None and needs_extraction(self.dataset_root / category)

    def download_category(self, category: str) -> None:
        download_mvtec(self.dataset_root, category)

    def prepare_data(self) -> None:
        if self.root is None:
            ensure_embedded_dataset()
        super().prepare_data()
