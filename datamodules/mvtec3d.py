"""MVTec 3D-AD (Bergmann et al., VISAPP 2022, "The MVTec 3D-AD Dataset for Unsupervised 3D
Anomaly Detection and Localization"), its RGB images only.

Layout (the ``xyz/`` point-cloud folders beside each ``rgb/`` are not read)::

    ROOT/<category>/train/good/rgb/*.png
    ROOT/<category>/validation/good/rgb/*.png
    ROOT/<category>/test/<defect or good>/rgb/*.png
    ROOT/<category>/test/<defect>/gt/<same name>.png

Split: the official one, by folder: ``train/good`` for training, ``test/*`` for testing, and an
official validation split of normal images, ``validation/good``. ``defect_type`` is the
defect folder's name (``good`` for normal test images, whose all-zero ``gt`` masks are not read).

Our reading, the validation split: by default it is treated like every other dataset's, carved
out of ``train/good`` with ``val_fraction``, and the official ``validation/good`` images are not
used, so that protocols stay comparable across datasets. ``use_official_validation=True`` makes
``validation/good`` the validation split instead (all of ``train/good`` is then trained on, and
``val_fraction`` is not used).

Download: only an MD5 of the archive is published (:data:`MVTEC3D_MD5`), no SHA-256, and the
suite verifies downloads by SHA-256 only. So ``download=True`` needs ``download_sha256``, which
the user computes from a copy whose MD5 they checked; without it the download is refused.
"""

from __future__ import annotations

from typing import Any

from .base import GOOD, AnomalyDataModule, DatasetError, Sample, normal_samples
from .download import download_category
from .mvtec import defect_folder_samples
from .registry import register_dataset

MVTEC3D_CATEGORIES: tuple[str, ...] = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire",
)  # fmt: skip

MVTEC3D_URL = (
    "https://www.mydrive.ch/shares/45920/dd1eb345346df066c63b5c95676b961b/"
    "download/428824485-1643285832/mvtec_3d_anomaly_detection.tar.xz"
)
#: The only checksum MVTec publishes for the archive; not used to verify (see the module docstring).
MVTEC3D_MD5 = "d8bb2800fbf3ac88e798da6ae10dc819"
#: The archive's file name in the dataset root.
MVTEC3D_ARCHIVE = "mvtec_3d_anomaly_detection.tar.xz"
#: Where a defective test image's mask is (:func:`adbench.datamodules.mvtec.defect_folder_samples`).
MVTEC3D_MASK = "test/{defect}/gt/{name}"


@register_dataset("mvtec3d")
class MVTec3DDataModule(AnomalyDataModule):
    """MVTec 3D-AD, RGB: one category (or several, or ``all``); see :class:`AnomalyDataModule`
    for the other arguments.

    Args:
        use_official_validation: validate on the official ``validation/good`` images instead of
            a ``val_fraction`` of ``train/good`` (``val_fraction`` is then not used).
        download_sha256: SHA-256 of the official archive, required by ``download=True``
            (MVTec publishes only an MD5).
    """

    categories = MVTEC3D_CATEGORIES
    title = "MVTec 3D-AD"
    category_markers = ("train/good/rgb",)
    official_validation = "validation/good/rgb"
    archive_name = MVTEC3D_ARCHIVE

    def __init__(
        self, *args: Any, use_official_validation: bool = False, download_sha256: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.use_official_validation = use_official_validation
        self.download_sha256 = download_sha256

    def train_samples(self, category: str) -> list[Sample]:
        return normal_samples(self.category_folder(category) / "train" / GOOD / "rgb", "training", self.title)

    def test_samples(self, category: str) -> list[Sample]:
        return defect_folder_samples(self.category_folder(category), self.title, MVTEC3D_MASK, images_in="rgb")

    def download_category(self, category: str) -> None:
        if not self.download_sha256:
            raise DatasetError(
                f"{self.title} category {category!r} is not under {str(self.dataset_root)!r}, and download=True "
                "needs the archive's SHA-256, which MVTec does not publish (only an MD5). Download "
                f"{MVTEC3D_URL}, check that `md5sum {MVTEC3D_ARCHIVE}` prints {MVTEC3D_MD5}, then pass "
                f"--data.download_sha256 with what `sha256sum {MVTEC3D_ARCHIVE}` prints (placing the file in "
                "root skips the download), or extract it yourself and point root at it"
            )
        download_category(self.dataset_root, category, MVTEC3D_URL, self.download_sha256, MVTEC3D_ARCHIVE)
