"""MVTec AD 2 (Heckler-Kram et al., "The MVTec AD 2 Dataset: Advanced Scenarios for Unsupervised
Anomaly Detection", arXiv 2503.21622, 2025), and predictions in the format of its evaluation server.

The official layout, one folder per category (``can``, ``fabric``, ``fruit_jelly``, ``rice``,
``sheet_metal``, ``vial``, ``wallplugs``, ``walnuts``)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/validation/good/*.png                  (normal images only)
    ROOT/CATEGORY/test_public/good/*.png
    ROOT/CATEGORY/test_public/bad/*.png
    ROOT/CATEGORY/test_public/ground_truth/bad/<image stem>_mask.png
    ROOT/CATEGORY/test_private/*.png                     (000_regular.png, ...: no labels)
    ROOT/CATEGORY/test_private_mixed/*.png               (000_mixed.png, ...: no labels)

Sources for the layout: MVTec's own dataset class in ``MVTecAD2_public_code_utils``
(``mvtec_ad_2_public_offline.py``: splits ``train``, ``validation``, ``test_public``,
``test_private``, ``test_private_mixed``; private images directly in their split folder; a bad
image's mask ``test_public/ground_truth/bad/<stem>_mask.png``) and anomalib 2.x's ``MVTecAD2``.

Split: training images from ``train/good``; validation from the official ``validation/good``
(``use_official_validation=True``, the default: the paper's threshold rule is defined on these
normal images; as for every dataset, the base gives them fixed synthetic anomalies so that
checkpoint selection has something to rank); test from ``test_public`` with its masks
(``defect_type`` ``good`` or ``bad``: the public set names no defect types). The private sets are
not labelled: they are not tested on, only predicted (:func:`write_predictions`).

Submission format (the server at https://benchmark.mvtec.com; checked by MVTec's
``check_and_prepare_data_for_upload.py`` / ``utils.py`` in ``MVTecAD2_public_code_utils``)::

    SUBMISSION/anomaly_images/<category>/<test_private|test_private_mixed>/<image stem>.tiff
    SUBMISSION/anomaly_images_thresholded/<category>/<test_private|test_private_mixed>/<image stem>.png

``anomaly_images``: one single-channel float16 TIFF per image (MVTec's checker reads it with
``tifffile`` and demands ``float16``); ``anomaly_images_thresholded``: one single-channel PNG per
image with values in {0, 255} (255 anomalous). The upload holds all 8 categories, both private
sets, and exactly the private images' stems (:data:`SUBMISSION_FILE_COUNTS`); the checker then
packs the folder as ``<folder name>.tar.gz`` (:func:`archive_submission` does the same).

Our reading:

* Maps are written at the image's own size (the :class:`adbench.api.Detector` upsamples them
  bilinearly), deflate-compressed (``compress=False``: uncompressed); ``tifffile`` reads both.
  Values beyond float16's range are clipped to it; a non-finite map is refused.
* The binary maps' threshold, by default, is the mean plus 3 standard deviations of all pixel
  scores of the ``validation/good`` images' maps. This is the rule two third-party MVTec AD 2
  submissions describe as the dataset's baseline binarisation (RoBiS, arXiv 2505.21152:
  "statistical-based binarization strategy (mean+3std)"); we could not read the paper's own text
  to confirm it. ``threshold="checkpoint"`` uses the pixel threshold saved in the checkpoint
  (chosen on validation images with synthetic anomalies), a number uses that number.
* ``download=True`` fetches the archive anomalib publishes with its SHA-256
  (:data:`MVTEC_AD2_URL`, :data:`MVTEC_AD2_SHA256`), assuming, as anomalib does, that its
  top-level folders are the categories; otherwise it stops and says to extract by hand.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tifffile
from PIL import Image

from adbench.callbacks.metrics import SEGMENTATION_SIGMAS

from . import download
from .base import (
    GOOD,
    AnomalyDataModule,
    DatasetError,
    Sample,
    image_files,
    layout_folder,
    normal_samples,
)
from .registry import register_dataset

MVTEC_AD2_CATEGORIES: tuple[str, ...] = (
    "can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts",
)  # fmt: skip
#: The unlabelled test sets, predicted for the evaluation server.
PRIVATE_SPLITS: tuple[str, ...] = ("test_private", "test_private_mixed")
#: Images per private set and category, as MVTec's upload checker demands them (``OBJECT_FILE_COUNTER``).
SUBMISSION_FILE_COUNTS: dict[str, int] = {
    "can": 321, "fabric": 314, "fruit_jelly": 255, "rice": 277,
    "sheet_metal": 142, "vial": 276, "wallplugs": 232, "walnuts": 228,
}  # fmt: skip
#: A private set's file stem suffix in the checker's names (``000_regular``, ``000_mixed``).
PRIVATE_SUFFIX = {"test_private": "regular", "test_private_mixed": "mixed"}
MAPS_FOLDER = "anomaly_images"
BINARY_FOLDER = "anomaly_images_thresholded"
#: Where a bad public test image's mask is, relative to its category folder.
MVTEC_AD2_MASK = "test_public/ground_truth/bad/{stem}_mask.png"
#: The archive as anomalib 2.x publishes it (URL and SHA-256).
MVTEC_AD2_URL = ("https://www.mydrive.ch/shares/121573/7f68fe2c4f7c2ceaa08f463aaeb2f414/download/"
                 "466712769-1743422799/mvtec_ad_2.tar.gz")
MVTEC_AD2_SHA256 = "c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4"
MVTEC_AD2_ARCHIVE = "mvtec_ad_2.tar.gz"
TITLE = "MVTec AD 2"


class SubmissionError(DatasetError):
    """A submission folder that the evaluation server would refuse; the message names the file."""


# --------------------------------------------------------------------------- layout


def public_test_samples(category_dir: Path) -> list[Sample]:
    """The ``test_public`` images of a category folder: ``good`` ones normal, ``bad`` ones with masks."""
    test_dir = layout_folder(category_dir / "test_public", "test", TITLE)
    samples = [Sample(path, None, 0, GOOD) for path in image_files(layout_folder(test_dir / GOOD, "test", TITLE))]
    for path in image_files(layout_folder(test_dir / "bad", "test", TITLE)):
        mask = category_dir / MVTEC_AD2_MASK.format(stem=path.stem)
        if not mask.is_file():
            raise DatasetError(f"defective test image {str(path)!r} has no mask at {str(mask)!r}")
        samples.append(Sample(path, mask, 1, "bad"))
    if not samples:
        raise DatasetError(f"no images in test folder {str(test_dir)!r} (good/ and bad/ are empty)")
    return samples


def private_images(category_dir: Path, split: str) -> list[Path]:
    """The images of a private test set (``test_private``, ``test_private_mixed``), sorted."""
    if split not in PRIVATE_SPLITS:
        raise ValueError(f"split must be one of {', '.join(PRIVATE_SPLITS)}, got {split!r}")
    folder = layout_folder(category_dir / split, f"private test ({split})", TITLE)
    files = image_files(folder)
    if not files:
        raise DatasetError(f"no images in private test folder {str(folder)!r}")
    return files


@register_dataset("mvtec_ad2")
class MVTecAD2DataModule(AnomalyDataModule):
    """MVTec AD 2: one category (or several, or ``"all"``) under ``root`` in the official layout; see
    the module docstring for the layout, the submission format and our choices,
    :class:`AnomalyDataModule` for the shared arguments. ``download=True`` fetches the archive
    anomalib publishes (SHA-256 verified).

    Args:
        use_official_validation: validate on the official ``validation/good`` images (with the
            base's synthetic anomalies) and train on all of ``train/good``; ``val_fraction`` is then
            ignored. ``False``: carve the validation split from ``train/good`` instead.
    """

    categories = MVTEC_AD2_CATEGORIES
    title = TITLE
    category_markers = ("train/good", "test_public")
    official_validation = "validation/good"
    archive_name = MVTEC_AD2_ARCHIVE

    def __init__(self, *args: Any, use_official_validation: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_official_validation = use_official_validation

    def train_samples(self, category: str) -> list[Sample]:
        return normal_samples(self.category_folder(category) / "train" / GOOD, "training", self.title)

    def test_samples(self, category: str) -> list[Sample]:
        return public_test_samples(self.category_folder(category))

    def private_samples(self, category: str, split: str) -> list[Sample]:
        """A private test set's images as samples (``label`` -1, ``defect_type`` ``unknown``): no labels."""
        return [Sample(path, None, -1, "unknown", category)
                for path in private_images(self.category_folder(category), split)]

    def download_category(self, category: str) -> None:
        try:  # the module's constants are read at call time, so a mirror (or a test) can set them
            download.download_category(self.dataset_root, category, MVTEC_AD2_URL, MVTEC_AD2_SHA256,
                                        MVTEC_AD2_ARCHIVE)
        except FileNotFoundError as error:
            raise DatasetError(f"{error}: the archive's top-level folders are not the categories; extract "
                               f"{str(self.dataset_root / MVTEC_AD2_ARCHIVE)!r} by hand so that "
                               f"<root>/{category}/train/good exists") from error


# --------------------------------------------------------------------------- float16 TIFF


def write_float16_tiff(path: str | Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a 2-D array as a single-channel float16 TIFF (deflate when ``compress``), the format of
    the server's ``anomaly_images``."""
    data = np.asarray(array)
    if data.ndim != 2:
        raise ValueError(f"an anomaly image is 2-D (H, W), got shape {data.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data.astype(np.float16), compression="zlib" if compress else None)
    return path


def read_float_tiff(path: str | Path) -> np.ndarray:
    """A single-channel float TIFF as an array of its own dtype (:class:`SubmissionError` otherwise)."""
    try:
        array = tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise SubmissionError(f"{str(path)!r} is not a readable TIFF file: {error}") from error
    if array.ndim != 2 or array.dtype.kind != "f":
        raise SubmissionError(f"{str(path)!r} is not a single-channel float TIFF (shape {array.shape}, {array.dtype})")
    return array


# --------------------------------------------------------------------------- predictions


class MapPredictor(Protocol):
    """What :func:`write_predictions` needs of a detector (:class:`adbench.api.Detector` is one):
    ``predict(path)`` giving an object with ``anomaly_map`` (H, W) at the image's own size."""

    def predict(self, image: Any) -> Any: ...


def _anomaly_map(detector: MapPredictor, path: Path) -> np.ndarray:
    array = np.asarray(detector.predict(path).anomaly_map, dtype=np.float32)
    with Image.open(path) as image:
        size = image.size[::-1]
    if array.shape != size:
        raise ValueError(f"the anomaly map of {str(path)!r} is {array.shape} but the image is {size} (H, W): "
                         "the server expects maps at the image's own size")
    if not np.isfinite(array).all():
        raise ValueError(f"the anomaly map of {str(path)!r} holds NaN or infinite values")
    return array


def validation_threshold(detector: MapPredictor, images: Iterable[str | Path], sigma: float = SEGMENTATION_SIGMAS) -> float:
    """Mean + ``sigma`` standard deviations of all pixel scores of ``images``' maps (normal images:
    the ``validation/good`` set), accumulated in float64."""
    n, total, squares = 0, 0.0, 0.0
    for path in images:
        values = _anomaly_map(detector, Path(path)).astype(np.float64)
        n, total, squares = n + values.size, total + float(values.sum()), squares + float((values**2).sum())
    if n == 0:
        raise DatasetError("no validation images to compute the threshold from")
    mean = total / n
    return mean + sigma * math.sqrt(max(squares / n - mean * mean, 0.0))


@dataclass
class PredictionSummary:
    """What :func:`write_predictions` wrote for one category."""

    category: str
    threshold: float
    threshold_rule: str
    #: Private set -> the (map, binary map) files written, by image.
    files: dict[str, list[tuple[Path, Path]]] = field(default_factory=dict)


def write_predictions(
    detector: MapPredictor,
    root: str | Path,
    category: str,
    output_dir: str | Path,
    splits: Sequence[str] = PRIVATE_SPLITS,
    threshold: float | str = "validation",
    sigma: float = SEGMENTATION_SIGMAS,
    compress: bool = True,
) -> PredictionSummary:
    """Predict ``category``'s private test sets and write them into ``output_dir`` in the server's
    format (module docstring): a float16 TIFF map and a {0, 255} PNG per image.

    ``threshold``: ``"validation"`` (mean + ``sigma`` std of the ``validation/good`` maps' pixels),
    ``"checkpoint"`` (the detector's saved ``pixel_threshold``) or a number. Call once per category
    (with that category's checkpoint), then :func:`check_submission` and :func:`archive_submission`::

        detector = adbench.load("runs/patchcore/can/seed0/checkpoints/best.ckpt")
        write_predictions(detector, MVTEC_AD2_ROOT, "can", "submission")
    """
    category_dir = MVTecAD2DataModule.category_folder_under(MVTecAD2DataModule.existing_root(root), category)
    if threshold == "validation":
        validation = normal_samples(category_dir / "validation" / GOOD, "validation", TITLE)
        value, rule = validation_threshold(detector, [s.image_path for s in validation], sigma), f"validation mean+{sigma:g}std"
    elif threshold == "checkpoint":
        value, rule = float(getattr(detector, "pixel_threshold", math.nan)), "checkpoint pixel_threshold"
    elif isinstance(threshold, str):
        raise ValueError(f"threshold must be 'validation', 'checkpoint' or a number, got {threshold!r}")
    else:
        value, rule = float(threshold), "given"
    if not math.isfinite(value):
        raise ValueError(f"threshold ({rule}) is {value}: not usable for the binary maps")
    summary = PredictionSummary(category, value, rule)
    limit = float(np.finfo(np.float16).max)
    output_dir = Path(output_dir)
    for split in splits:
        written = summary.files.setdefault(split, [])
        for path in private_images(category_dir, split):
            array = _anomaly_map(detector, path)
            tiff = write_float16_tiff(output_dir / MAPS_FOLDER / category / split / f"{path.stem}.tiff",
                                      np.clip(array, -limit, limit), compress)
            png = output_dir / BINARY_FOLDER / category / split / f"{path.stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where(array >= value, 255, 0).astype(np.uint8), mode="L").save(png)
            written.append((tiff, png))
    return summary


def check_submission(folder: str | Path, root: str | Path | None = None, complete: bool = True) -> int:
    """Check a submission folder as MVTec's upload checker does; returns the number of images checked.

    ``complete``: all 8 categories and both private sets, with :data:`SUBMISSION_FILE_COUNTS` files
    named ``000_regular``... (the upload); ``False``: the categories and sets present. ``root``: the
    dataset, whose private images' stems the files must match exactly. Each map must be a
    single-channel float16 TIFF, each binary map a single-channel PNG in {0, 255} of the same size.
    """
    folder = Path(folder)
    found = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if found != {MAPS_FOLDER, BINARY_FOLDER}:
        raise SubmissionError(f"submission folder {str(folder)!r} must hold exactly {MAPS_FOLDER}/ and "
                              f"{BINARY_FOLDER}/, found {sorted(found) or 'nothing'}")
    categories = sorted(p.name for p in (folder / MAPS_FOLDER).iterdir())
    expected_categories = sorted(MVTEC_AD2_CATEGORIES) if complete else categories
    for sub in (MAPS_FOLDER, BINARY_FOLDER):
        present = sorted(p.name for p in (folder / sub).iterdir())
        if present != expected_categories:
            raise SubmissionError(f"{str(folder / sub)!r} holds {present}, expected {expected_categories}")
    checked = 0
    for category in expected_categories:
        splits = sorted(p.name for p in (folder / MAPS_FOLDER / category).iterdir())
        if complete and splits != sorted(PRIVATE_SPLITS) or not set(splits) <= set(PRIVATE_SPLITS):
            raise SubmissionError(f"{str(folder / MAPS_FOLDER / category)!r} holds {splits}, "
                                  f"expected {sorted(PRIVATE_SPLITS)}")
        for split in splits:
            maps_dir, binary_dir = folder / MAPS_FOLDER / category / split, folder / BINARY_FOLDER / category / split
            stems = sorted(p.stem for p in maps_dir.iterdir())
            if root is not None:
                expected = sorted(p.stem for p in private_images(Path(root) / category, split))
            elif complete:
                count = SUBMISSION_FILE_COUNTS[category]
                expected = [f"{i:03d}_{PRIVATE_SUFFIX[split]}" for i in range(count)]
            else:
                expected = stems
            for directory, suffix in ((maps_dir, ".tiff"), (binary_dir, ".png")):
                names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
                if names != [f"{stem}{suffix}" for stem in expected]:
                    missing = sorted({f"{s}{suffix}" for s in expected} - set(names))
                    extra = sorted(set(names) - {f"{s}{suffix}" for s in expected})
                    raise SubmissionError(f"{str(directory)!r}: {len(names)} file(s), expected {len(expected)} "
                                          f"{suffix} files; missing {missing[:4]}, superfluous {extra[:4]}")
            for stem in expected:
                array = read_float_tiff(maps_dir / f"{stem}.tiff")
                if array.dtype != np.float16:
                    raise SubmissionError(f"anomaly image {str(maps_dir / stem)!r}.tiff is {array.dtype}, not float16")
                binary = np.asarray(Image.open(binary_dir / f"{stem}.png"))
                if binary.ndim != 2 or not np.isin(np.unique(binary), (0, 255)).all():
                    raise SubmissionError(f"thresholded image {str(binary_dir / stem)!r}.png is not a single-channel "
                                          "image with values in {0, 255}")
                if binary.shape != array.shape:
                    raise SubmissionError(f"{str(binary_dir / stem)!r}.png is {binary.shape}, its map {array.shape}")
                checked += 1
    return checked


def archive_submission(folder: str | Path, archive: str | Path | None = None) -> Path:
    """Pack a submission folder as ``<folder name>.tar.gz`` (beside it unless ``archive`` is given),
    its files under the folder's name, as MVTec's checker packs it for upload."""
    folder = Path(folder)
    archive = Path(archive) if archive else folder.with_name(f"{folder.name}.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            tar.add(path, arcname=(Path(folder.name) / path.relative_to(folder)).as_posix())
    return archive
