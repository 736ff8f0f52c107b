"""MVTec AD on disk -> dataset items -> a ``LightningDataModule``.

The official layout (also accepted for any folder shaped the same way)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/test/<defect or good>/*.png
    ROOT/CATEGORY/ground_truth/<defect>/<image stem>_mask.png

Every item is a dict with the same keys for every split, so methods, the
evaluator and the visualiser read one format:

* ``image``: float32 (3, H, W) in [0, 1], the network input
* ``mask``: float32 (1, H, W) in {0, 1}, the anomalous pixels of ``image``
* ``label``: int64, 1 if ``image`` is anomalous
* ``defect_type``: str (``good``, a defect folder, or ``synthetic``)
* ``path``: str, the source image file

Training items of methods that learn from DRAEM-style pseudo-anomalies also
carry ``clean_image`` (the original); ``image``/``mask``/``label`` then describe
the synthesised anomaly. Normalisation for a backbone is the model's business:
the data stays in [0, 1].

Protocol: the validation split is carved from ``train/good`` (seeded), and gets
fixed synthetic anomalies so that checkpoint selection has something to rank
without ever looking at the test set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .download import download_mvtec, needs_extraction
from .embedded import EMBEDDED_CATEGORIES, ensure_embedded_dataset
from .synthesis import FolderTextures, PseudoAnomalySynthesizer, make_texture_source

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
#: ``texture_source`` of the paper profiles: a texture folder must be supplied.
TEXTURES_REQUIRED = "required"
VALIDATION_TEXTURES = ("shared", "held-out")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used as it is; the message names it."""


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Sample:
    """One image on disk and what is known about it."""

    image_path: Path
    mask_path: Path | None  # None for good images
    label: int
    defect_type: str


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


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
    files = _image_files(folder)
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
        for path in _image_files(defect_dir):
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


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as error:  # not an OSError: PIL's message names no file
        raise DatasetError(f"image {str(path)!r} is too large to decode safely ({error}); if it is "
                           "trusted, raise PIL.Image.MAX_IMAGE_PIXELS") from error
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {str(path)!r}: {error}") from error
    return image


def read_image(path: Path, size: int) -> np.ndarray:
    """Decode to uint8 RGB (H, W, 3) at ``size`` x ``size``; grayscale, 16-bit, palette, RGBA converted."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("RGB") clips 16-bit values instead of rescaling them.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array * (255.0 / max(array.max(), 1.0))).astype(np.uint8))
    image = image.convert("RGB")  # alpha is dropped, gray replicated
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def read_mask(path: Path, size: int, image_path: Path) -> np.ndarray:
    """Binary uint8 (H, W) mask at ``size``; must match its image's size on disk."""
    mask = _open(path)
    with Image.open(image_path) as image:
        if mask.size != image.size:
            raise DatasetError(
                f"mask {str(path)!r} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{str(image_path)!r} is {image.size[0]}x{image.size[1]}"
            )
    mask = mask.convert("L")
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    array = np.asarray(mask)
    return (array > (127 if array.max() > 1 else 0)).astype(np.uint8)


# --------------------------------------------------------------------------- dataset


class MVTecDataset(Dataset):
    """Images decoded once into memory, served as float tensors.

    Decoding and resizing happen once, at construction (in threads): the hot
    training loop only converts uint8 to float, and synthesises a pseudo-anomaly
    when a ``synthesizer`` is given. Its randomness is drawn from torch's RNG of
    the process (seeded by ``lightning.seed_everything(workers=True)`` per worker),
    so a seed reproduces the same batches for the same number of workers.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        synthesizer: PseudoAnomalySynthesizer | None = None,
    ) -> None:
        if not samples:
            raise DatasetError("a dataset needs at least one image")
        self.samples = list(samples)
        self.image_size = image_size
        self.synthesizer = synthesizer
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            self.images = np.stack(list(pool.map(lambda s: read_image(s.image_path, image_size), self.samples)))
            self.masks = np.stack(list(pool.map(self._read_mask, self.samples)))
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        self.defect_types = [s.defect_type for s in self.samples]

    def _read_mask(self, sample: Sample) -> np.ndarray:
        if sample.mask_path is None:
            return np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        return read_mask(sample.mask_path, self.image_size, sample.image_path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index].astype(np.float32) / 255.0
        item: dict[str, Any] = {"path": str(self.samples[index].image_path)}
        if self.synthesizer is None:
            item.update(
                image=_to_chw(image),
                mask=torch.from_numpy(self.masks[index]).float()[None],
                label=torch.tensor(self.labels[index]),
                defect_type=self.defect_types[index],
            )
            return item
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        result = self.synthesizer(image, rng)
        item.update(
            image=_to_chw(result.image),
            clean_image=_to_chw(image),
            mask=torch.from_numpy(np.ascontiguousarray(result.mask, dtype=np.float32))[None],
            label=torch.tensor(int(result.has_anomaly)),
            defect_type="synthetic" if result.has_anomaly else "good",
        )
        return item

    def bake_pseudo_anomalies(self, synthesizer: PseudoAnomalySynthesizer, seed: int) -> None:
        """Replace images by fixed synthetic anomalies (validation): same seed, same set."""
        for index in range(len(self)):
            image = self.images[index].astype(np.float32) / 255.0
            result = synthesizer(image, np.random.default_rng([seed, index]))
            self.images[index] = np.clip(np.rint(result.image * 255.0), 0, 255).astype(np.uint8)
            self.masks[index] = result.mask > 0.5
            self.labels[index] = int(result.has_anomaly)
            self.defect_types[index] = "synthetic" if result.has_anomaly else "good"


def _to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def split_train_validation(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded random split of ``train/good`` into train and validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(samples) * val_fraction))
    order = np.random.default_rng(seed).permutation(len(samples))
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    if not train:
        raise DatasetError(f"val_fraction={val_fraction} leaves no training images")
    return train, val


# --------------------------------------------------------------------------- datamodule


class MVTecDataModule(LightningDataModule):
    """One MVTec AD category (or a folder in its layout) for training and evaluation.

    Args:
        root: dataset root holding category folders. ``None`` uses the embedded
            procedural dataset (generated on first use, no download).
        category: category folder name; ``None`` means the first embedded category.
        image_size: images and masks are resized to ``image_size`` x ``image_size``.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        val_fraction: share of ``train/good`` held out for validation (never the test set).
        split_seed: seed of that split and of the validation set's synthetic anomalies.
        pseudo_anomalies: supply DRAEM-style pseudo-anomalies in training batches.
            ``None`` asks the model (its ``needs_pseudo_anomalies``).
        texture_source: anomaly-source textures: a DTD-style folder, ``"procedural"``
            (no files needed) or ``"self"`` (the training images themselves).
            ``"required"`` (the paper profiles): a texture folder must be given
            (``--data.texture_source=/path/to/dtd``, the sweep's ``texture_root``);
            the run fails instead of silently using procedural textures.
        validation_anomalies: give validation images fixed synthetic anomalies, so
            that validation metrics can rank checkpoints.
        validation_textures: ``"shared"``: validation anomalies are drawn from the
            same textures as training's; ``"held-out"``: from texture classes that
            training never sees (20 % of a texture folder's classes, seeded by
            ``split_seed``), so validation measures generalisation of the synthesis
            rather than its memorisation. Needs a texture folder.
        download: download the official archive (SHA-256 verified) if ``category``
            is missing under ``root``.
    """

    def __init__(
        self,
        root: str | None = None,
        category: str | None = None,
        image_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        pseudo_anomalies: bool | None = None,
        texture_source: str = "procedural",
        validation_anomalies: bool = True,
        validation_textures: str = "shared",
        download: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if validation_textures not in VALIDATION_TEXTURES:
            raise ValueError(f"validation_textures must be one of {VALIDATION_TEXTURES}, got {validation_textures!r}")
        self.save_hyperparameters()
        self.root = root
        self.category = category or (EMBEDDED_CATEGORIES[0] if root is None else None)
        if self.category is None:
            raise ValueError("category is required when root is given")
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.pseudo_anomalies = pseudo_anomalies
        self.texture_source = texture_source
        self.validation_anomalies = validation_anomalies
        self.validation_textures = validation_textures
        self.download = download
        self.train_set: MVTecDataset | None = None
        self.val_set: MVTecDataset | None = None
        self.test_set: MVTecDataset | None = None

    @property
    def category_dir(self) -> Path:
        root = ensure_embedded_dataset() if self.root is None else Path(self.root)
        return resolve_category(root, self.category)

    def prepare_data(self) -> None:
        if self.root is None:
            ensure_embedded_dataset()
        elif self.download and needs_extraction(Path(self.root) / self.category):
            download_mvtec(self.root, self.category)

    def _model_asks(self, attribute: str, default: bool) -> bool:
        """What the model being trained declares it needs (see models.base.AnomalyModule)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, attribute, default))

    def _wants_pseudo_anomalies(self) -> bool:
        if self.pseudo_anomalies is not None:
            return self.pseudo_anomalies
        return self._model_asks("needs_pseudo_anomalies", False)

    def _synthesizers(self, train_images: np.ndarray) -> tuple[PseudoAnomalySynthesizer, PseudoAnomalySynthesizer]:
        """The training synthesizer and the validation one (the same, or on held-out textures)."""
        if self.texture_source == TEXTURES_REQUIRED:
            raise DatasetError(
                "this profile needs a texture folder for its pseudo-anomalies (DRAEM uses DTD) and got none: "
                "set texture_root in the sweep (--texture-root, DTD_ROOT) or --data.texture_source=/path/to/dtd; "
                "--data.texture_source=procedural uses procedural textures deliberately"
            )
        source = make_texture_source(self.texture_source, images=train_images)
        if self.validation_textures == "shared":
            synthesizer = PseudoAnomalySynthesizer(source)
            return synthesizer, synthesizer
        if not isinstance(source, FolderTextures):
            raise DatasetError(
                f"validation_textures='held-out' needs a texture folder, got texture_source={self.texture_source!r}"
            )
        kept, held_out = source.split(0.2, seed=self.split_seed)
        return PseudoAnomalySynthesizer(kept), PseudoAnomalySynthesizer(held_out)

    def setup(self, stage: str | None = None) -> None:
        category_dir = self.category_dir
        if stage in ("fit", "validate", None) and self.train_set is None:
            train, val = split_train_validation(
                list_train_samples(category_dir), self.val_fraction, self.split_seed
            )
            self.train_set = MVTecDataset(train, self.image_size)
            wants = self._wants_pseudo_anomalies()
            if wants or (val and self.validation_anomalies):
                train_synthesis, val_synthesis = self._synthesizers(self.train_set.images)
                if wants:
                    self.train_set.synthesizer = train_synthesis
            if val:
                self.val_set = MVTecDataset(val, self.image_size)
                if self.validation_anomalies:
                    self.val_set.bake_pseudo_anomalies(val_synthesis, self.split_seed)
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = MVTecDataset(list_test_samples(category_dir), self.image_size)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            # Never drop the only batch; otherwise as the model asks.
            drop_last=train and len(dataset) > batch_size and self._model_asks("drop_incomplete_batches", True),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, self.eval_batch_size) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
