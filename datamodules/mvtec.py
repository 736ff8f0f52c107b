"""MVTec AD (Bergmann et al., CVPR 2019), the suite's default dataset, and its on-disk layout.

The official layout (also accepted for any folder shaped the same way)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/test/<defect or good>/*.png
    ROOT/CATEGORY/ground_truth/<defect>/<image stem>_mask.png

Without a ``root`` the embedded procedural dataset is used (generated on first use, no
download). The layout functions here are shared by the datasets that copy it (MPDD) and by
those shaped like it (MVTec 3D-AD, MVTec LOCO AD: :func:`defect_folder_samples`).
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
from .download import ARCHIVE_NAME, download_mvtec
from .embedded import ensure_embedded_dataset
from .embedded_render import EMBEDDED_CATEGORIES
from .registry import register_dataset

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
#: Where a defective test image's mask is (see :func:`defect_folder_samples`).
MVTEC_MASK = "ground_truth/{defect}/{stem}_mask.png"
LAYOUT = "MVTec AD"


def defect_folder_samples(category_dir: Path, layout: str, mask: str, images_in: str = "") -> list[Sample]:
    """The test images of ``category_dir/test/<defect>[/images_in]/``, the MVTec-style layouts: those
    of ``good`` are normal, every other folder's are defective with ``defect_type`` its name.

    ``mask`` is where a defective image's mask is, relative to ``category_dir``, with the
    placeholders ``{defect}``, ``{stem}`` and ``{name}`` (the image's file name); ending in ``/``
    it is a folder of mask files, read as their union (:func:`adbench.datamodules.base.read_mask`).
    """
    test_dir = layout_folder(category_dir / "test", "test", layout)
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        folder = layout_folder(defect_dir / images_in, "test", layout) if images_in else defect_dir
        for path in image_files(folder):
            if defect == GOOD:
                samples.append(Sample(path, None, 0, GOOD))
                continue
            mask_path = category_dir / mask.format(defect=defect, stem=path.stem, name=path.name)
            folder_mask = mask.endswith("/")
            if not (mask_path.is_dir() and image_files(mask_path) if folder_mask else mask_path.is_file()):
                raise DatasetError(f"defective test image {str(path)!r} has no mask"
                                   f"{' folder with mask images' if folder_mask else ''} at {str(mask_path)!r}")
            samples.append(Sample(path, mask_path, 1, defect))
    if not samples:
        raise DatasetError(f"no images in test folder {str(test_dir)!r}")
    return samples


def list_train_samples(category_dir: Path) -> list[Sample]:
    """The training images of a category folder in MVTec AD's layout (``train/good``)."""
    return normal_samples(category_dir / "train" / GOOD, "training", LAYOUT)


def list_test_samples(category_dir: Path) -> list[Sample]:
    """The test images of a category folder in MVTec AD's layout, defective ones with their masks."""
    return defect_folder_samples(category_dir, LAYOUT, MVTEC_MASK)


@register_dataset("mvtec")
class MVTecDataModule(AnomalyDataModule):
    """MVTec AD: one category (or a folder in its layout); see :class:`AnomalyDataModule` for
    the arguments. ``root=None`` uses the embedded procedural dataset; ``category=None`` its
    first category. ``download=True`` fetches the official archive (SHA-256 verified)."""

    categories = MVTEC_CATEGORIES
    title = LAYOUT
    # Any folder in its layout is a category, an official name only with it too; the embedded
    # dataset's categories are listed after the official ones.
    category_markers = ("train/good",)
    official_names_suffice = False
    extra_categories = EMBEDDED_CATEGORIES
    archive_name = ARCHIVE_NAME

    def default_category(self) -> str | None:
        return EMBEDDED_CATEGORIES[0] if self.root is None else None

    @property
    def dataset_root(self) -> Path:
        return ensure_embedded_dataset() if self.root is None else Path(self.root).expanduser()

    @property
    def category_dir(self) -> Path:
        """The folder of the (single) category."""
        return self.category_folder(self.category_names[0])

    def train_samples(self, category: str) -> list[Sample]:
        return list_train_samples(self.category_folder(category))

    def test_samples(self, category: str) -> list[Sample]:
        return list_test_samples(self.category_folder(category))

    def category_missing(self, category: str) -> bool:
        return self.root is not None and super().category_missing(category)

    def download_category(self, category: str) -> None:
        download_mvtec(self.dataset_root, category)

    def prepare_data(self) -> None:
        if self.root is None:
            ensure_embedded_dataset()
        super().prepare_data()
