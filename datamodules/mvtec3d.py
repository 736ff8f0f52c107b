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

from dataclasses import replace
from pathlib import Path
from typing import Any

from .base import AnomalyDataModule, DatasetError, Sample, image_files, select_shots
from .download import download_category, needs_extraction
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


def _normal_images(folder: Path, what: str) -> list[Sample]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing {what} folder {str(folder)!r} (expected MVTec 3D-AD layout)")
    files = image_files(folder)
    if not files:
        raise DatasetError(f"no images in {what} folder {str(folder)!r}")
    return [Sample(path, None, 0, "good") for path in files]


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

    def __init__(
        self, *args: Any, use_official_validation: bool = False, download_sha256: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.use_official_validation = use_official_validation
        self.download_sha256 = download_sha256

    def _category_dir(self, category: str) -> Path:
        root = self.dataset_root
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a folder")
        folder = root / category
        if not folder.is_dir():
            hint = "" if category in MVTEC3D_CATEGORIES else f"; MVTec 3D-AD's categories: {', '.join(MVTEC3D_CATEGORIES)}"
            raise FileNotFoundError(f"category {category!r} not found under {str(root)!r}: MVTec 3D-AD "
                                    f"categories there: {', '.join(self.find_categories()) or 'none'}{hint}")
        return folder

    def _looks_like_category(self, folder: Path) -> bool:
        return (folder / "train" / "good" / "rgb").is_dir()

    def train_samples(self, category: str) -> list[Sample]:
        return _normal_images(self._category_dir(category) / "train" / "good" / "rgb", "training")

    def validation_samples(self, category: str) -> list[Sample]:
        """The official validation images of ``category`` (normal)."""
        return _normal_images(self._category_dir(category) / "validation" / "good" / "rgb", "validation")

    def test_samples(self, category: str) -> list[Sample]:
        test_dir = self._category_dir(category) / "test"
        if not test_dir.is_dir():
            raise FileNotFoundError(f"missing test folder {str(test_dir)!r} (expected MVTec 3D-AD layout)")
        samples = []
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            rgb = defect_dir / "rgb"
            if not rgb.is_dir():
                raise FileNotFoundError(f"missing test folder {str(rgb)!r} (expected MVTec 3D-AD layout)")
            for path in image_files(rgb):
                if defect_dir.name == "good":
                    samples.append(Sample(path, None, 0, "good"))
                    continue
                mask = defect_dir / "gt" / path.name
                if not mask.is_file():
                    raise DatasetError(f"defective test image {str(path)!r} has no mask at {str(mask)!r}")
                samples.append(Sample(path, mask, 1, defect_dir.name))
        if not samples:
            raise DatasetError(f"no images in test folder {str(test_dir)!r}")
        return samples

    def _split(self, category: str) -> tuple[list[Sample], list[Sample]]:
        if not self.use_official_validation:
            return super()._split(category)
        train = [replace(s, category=category) for s in self.train_samples(category)]
        val = [replace(s, category=category) for s in self.validation_samples(category)]
        if self.train_shots is not None:
            train = select_shots(train, self.train_shots, self.split_seed)
        return train, val

    def category_missing(self, category: str) -> bool:
        return needs_extraction(self.dataset_root / category, MVTEC3D_ARCHIVE)

    def download_category(self, category: str) -> None:
        if not self.download_sha256:
            raise DatasetError(
                f"MVTec 3D-AD category {category!r} is not under {str(self.dataset_root)!r}, and download=True "
                "needs the archive's SHA-256, which MVTec does not publish (only an MD5). Download "
                f"{MVTEC3D_URL}, check that `md5sum {MVTEC3D_ARCHIVE}` prints {MVTEC3D_MD5}, then pass "
                f"--data.download_sha256 with what `sha256sum {MVTEC3D_ARCHIVE}` prints (placing the file in "
                "root skips the download), or extract it yourself and point root at it"
            )
        download_category(self.dataset_root, category, MVTEC3D_URL, self.download_sha256, MVTEC3D_ARCHIVE)
