"""Dataset items and the ``LightningDataModule`` every dataset shares; each dataset adds its layout.

A dataset is a subclass of :class:`AnomalyDataModule` in its own file, registered by
name (:func:`adbench.datamodules.registry.register_dataset`): it says which categories it has
and how to list a category's training images and its test images with their masks
(:meth:`AnomalyDataModule.train_samples`, :meth:`AnomalyDataModule.test_samples`).
Everything else (decoding, validation split, pseudo-anomalies, few-shot selection, the
unified multi-category setting, loaders) is here, the same for every dataset.

Every item is a dict with the same keys for every split, so methods, the
evaluator and the visualiser read one format:

* ``image``: float32 (3, H, W) in [0, 1], the network input
* ``mask``: float32 (1, H, W) in {0, 1}, the anomalous pixels of ``image``
* ``label``: int64, 1 if ``image`` is anomalous
* ``defect_type``: str (``good``, a defect folder, or ``synthetic``)
* ``category``: str, the category the image belongs to
* ``path``: str, the source image file

Training items of methods that learn from DRAEM-style pseudo-anomalies also
carry ``clean_image`` (the original); ``image``/``mask``/``label`` then describe
the synthesised anomaly. Normalisation for a backbone is the model's business:
the data stays in [0, 1].

Protocol: the validation split is carved from the training images (seeded), and gets
fixed synthetic anomalies so that checkpoint selection has something to rank
without ever looking at the test set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from .decoding import (  # noqa: F401 - image_files, IMAGE_SUFFIXES, read_image, read_mask: imported from here
    IMAGE_SUFFIXES,
    DatasetError,
    DecodeCache,
    DecodedOnAccess,
    check_headers,
    default_workers,
    image_files,
    read_image,
    read_mask,
)
from .download import needs_extraction
from .synthesis import SYNTHESIS_RECIPES as RECIPES
from .synthesis import FolderTextures, PseudoAnomalySynthesizer, make_texture_source

#: ``texture_source`` of the paper profiles: a texture folder must be supplied.
TEXTURES_REQUIRED = "required"
VALIDATION_TEXTURES = ("auto", "shared", "held-out")
#: ``preload=None``: a split is decoded into memory when it takes at most this many bytes (1 GiB:
#: about 5,400 images at 256 px), otherwise on each access (see :class:`AnomalyDataModule`).
PRELOAD_MAX_BYTES = 2**30
#: ``defect_type`` of a normal image, and the folder name of normal images in the MVTec-style layouts.
GOOD = "good"


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Sample:
    """One image on disk and what is known about it."""

    image_path: Path
    mask_path: Path | None  # None for good images
    label: int
    defect_type: str
    category: str = ""


def layout_folder(folder: Path, what: str, layout: str, hint: str = "") -> Path:
    """``folder``, or an error naming it as the ``what`` folder that the ``layout`` layout expects."""
    if not folder.is_dir():
        raise FileNotFoundError(f"missing {what} folder {str(folder)!r} (expected {layout} layout){hint}")
    return folder


def normal_samples(folder: Path, what: str, layout: str, hint: str = "") -> list[Sample]:
    """The images of a folder of normal images (``train/good``...), which must hold at least one."""
    files = image_files(layout_folder(folder, what, layout, hint))
    if not files:
        raise DatasetError(f"no images in {what} folder {str(folder)!r}")
    return [Sample(path, None, 0, GOOD) for path in files]


# --------------------------------------------------------------------------- dataset


class AnomalyDataset(Dataset):
    """A split's images and masks, served as float tensors; decoded once into memory, or on access.

    ``preload=True`` decodes and resizes every file once, at construction (in threads): the hot
    training loop only converts uint8 to float. ``preload=False`` keeps only the file list, so
    memory stays flat in the number of images, and decodes in ``__getitem__`` (in the DataLoader
    workers); every file's header is read at construction, so an unreadable file or a mask of the
    wrong size fails before training starts. Both give identical items; both read through
    ``cache`` (:class:`adbench.datamodules.decoding.DecodeCache`) when one is given.

    A pseudo-anomaly is synthesised when a ``synthesizer`` is given. Its randomness is drawn from
    torch's RNG of the process (seeded by ``lightning.seed_everything(workers=True)`` per worker),
    so a seed reproduces the same batches for the same number of workers.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        synthesizer: PseudoAnomalySynthesizer | None = None,
        preload: bool = True,
        cache: DecodeCache | None = None,
    ) -> None:
        if not samples:
            raise DatasetError("a dataset needs at least one image")
        self.samples = list(samples)
        self.image_size = image_size
        self.synthesizer = synthesizer
        self.preload = preload
        self.cache = cache
        #: Lazily decoded validation anomalies: (synthesizer, seed) of :meth:`bake_pseudo_anomalies`.
        self.baked: tuple[PseudoAnomalySynthesizer, int] | None = None
        images = DecodedOnAccess(self.samples, "image", image_size, cache)
        masks = DecodedOnAccess(self.samples, "mask", image_size, cache)
        self.images: np.ndarray | DecodedOnAccess = images
        self.masks: np.ndarray | DecodedOnAccess = masks
        if preload:  # into arrays allocated once: np.stack of a list would need twice the memory
            self.images = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
            self.masks = np.empty((len(masks), image_size, image_size), dtype=np.uint8)

            def fill(index: int) -> None:
                self.images[index], self.masks[index] = images.read(index), masks.read(index)

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                list(pool.map(fill, range(len(images))))
        else:
            check_headers([(s.image_path, s.mask_path) for s in self.samples])
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        self.defect_types = [s.defect_type for s in self.samples]
        self.categories = [s.category for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.images[index], self.masks[index]
        if self.baked is not None:
            image, mask, _ = _baked_anomaly(image, *self.baked, index)
        image = image.astype(np.float32) / 255.0
        item: dict[str, Any] = {"path": str(self.samples[index].image_path), "category": self.categories[index]}
        if self.synthesizer is None:
            item.update(
                image=_to_chw(image),
                mask=torch.from_numpy(mask).float()[None],
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
            defect_type="synthetic" if result.has_anomaly else GOOD,
        )
        return item

    def bake_pseudo_anomalies(self, synthesizer: PseudoAnomalySynthesizer, seed: int) -> None:
        """Replace images by fixed synthetic anomalies (validation): same seed, same set. Preloaded,
        in place; otherwise the labels now (one pass) and the same images and masks on each access."""
        for index in range(len(self)):
            image, mask, has_anomaly = _baked_anomaly(self.images[index], synthesizer, seed, index)
            if self.preload:
                self.images[index], self.masks[index] = image, mask
            self.labels[index] = int(has_anomaly)
            self.defect_types[index] = "synthetic" if has_anomaly else GOOD
        if not self.preload:
            self.baked = (synthesizer, seed)


def _baked_anomaly(
    image: np.ndarray, synthesizer: PseudoAnomalySynthesizer, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Item ``index``'s fixed validation anomaly: uint8 image, uint8 mask, whether it is anomalous."""
    result = synthesizer(image.astype(np.float32) / 255.0, np.random.default_rng([seed, index]))
    baked = np.clip(np.rint(result.image * 255.0), 0, 255).astype(np.uint8)
    return baked, (result.mask > 0.5).astype(np.uint8), bool(result.has_anomaly)


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


#: ``category`` value of the unified (multi-class) setting: one model for every category present.
ALL_CATEGORIES = "all"


def select_shots(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """``shots`` training images drawn at random (seeded), kept in file order."""
    if shots < 1:
        raise ValueError(f"train_shots must be a positive number of images (or null for all), got {shots}")
    if shots > len(samples):
        folder = samples[0].image_path.parent if samples else "?"
        raise DatasetError(f"train_shots={shots} but only {len(samples)} training images are left in {str(folder)!r}")
    order = np.random.default_rng([seed, shots]).permutation(len(samples))
    return [samples[i] for i in sorted(order[:shots])]


class AnomalyDataModule(LightningDataModule):
    """One category of a dataset (or several, in the unified setting) for training and evaluation.

    A dataset subclass sets :attr:`categories` and implements :meth:`train_samples` and
    :meth:`test_samples`; it may add arguments of its own (a layout option, a download). Its
    category folders are found here (:meth:`category_folder`, :meth:`categories_under`), by what
    it states as data (:attr:`title`, :attr:`category_markers`, ...).

    Args:
        root: dataset root (each dataset documents its layout under it).
        category: the category to train and test on. Several (a list, or comma-separated on the
            command line), or ``"all"`` (every category present under ``root``): the unified setting, one
            model trained on the union of their training images and tested on each
            (items carry their ``category``; metrics are reported per category).
        image_size: images and masks are resized to ``image_size`` x ``image_size``.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader workers. ``None``: 0 for a preloaded split, ``default_workers()`` (the
            CPUs less one, 1 to 8) for a lazy one; pseudo-anomalies depend on it (set it to reproduce).
        val_fraction: share of the training images held out for validation (never the test set).
        split_seed: seed of that split, of the few-shot draw and of the validation set's
            synthetic anomalies.
        train_shots: few-shot training: ``k`` normal images per category, drawn (seeded by
            ``split_seed``) from what the validation split leaves; ``None``: all of them.
            The drawn files are listed by :attr:`shot_files`. With ``val_fraction=0`` the
            model sees exactly ``k`` normal images per category and nothing else.
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
            ``split_seed``; training never draws them), so validation measures generalisation
            of the synthesis rather than its memorisation. Needs a texture folder.
            ``"auto"`` (default): held-out with a texture folder, else shared.
        validation_recipe: ``"validation"`` (default: smaller ellipses, weaker blends than
            training's) or ``"draem"`` (training's; the suite's before 2026-12-06): ``SYNTHESIS_RECIPES``.
        download: download the official archive (SHA-256 verified) if the category is
            missing under ``root`` (datasets that publish one).
        preload: decode each split into memory once (``True``), or each item when read, memory flat
            (``False``); identical items. ``None``: preload a split of at most :data:`PRELOAD_MAX_BYTES`.
        cache_dir: keep decoded, resized arrays here (``decoding.DecodeCache``); ``None``: nothing written.
    """

    #: Registry name (``--data <name>``, ``dataset: <name>`` in a sweep); set by ``register_dataset``.
    dataset_name: ClassVar[str] = ""
    #: The official categories, in the order papers tabulate them.
    categories: ClassVar[tuple[str, ...]] = ()
    #: Report test metrics per defect type too (each type against the good images), for datasets
    #: whose anomaly kinds are compared separately (MVTec LOCO AD: logical vs structural).
    report_per_defect_type: ClassVar[bool] = False
    #: The dataset's name in messages (``"MVTec AD"``); default: :attr:`dataset_name`.
    title: ClassVar[str] = ""
    #: A folder not named as an official category is one if these paths in it are folders
    #: (``("train/good",)``: MVTec AD's layout); none: only the official names are categories.
    category_markers: ClassVar[tuple[str, ...]] = ()
    #: Whether a folder named as an official category counts without :attr:`category_markers`.
    official_names_suffice: ClassVar[bool] = True
    #: Names listed right after the official categories when present, in this order.
    extra_categories: ClassVar[tuple[str, ...]] = ()
    #: The official archive's file name in the root, where :attr:`category_missing` looks for a
    #: half-extracted category (:func:`adbench.datamodules.download.needs_extraction`).
    archive_name: ClassVar[str] = ""
    #: Validate on the official validation images (:meth:`validation_samples`) instead of a
    #: ``val_fraction`` of the training images; an argument of the datasets that have them.
    use_official_validation: bool = False
    #: The official folder of normal validation images under a category's folder, where there is one.
    official_validation: ClassVar[str | None] = None

    def __init__(
        self,
        root: str | None = None,
        category: str | list[str] | None = None,
        image_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        train_shots: int | None = None,
        pseudo_anomalies: bool | None = None,
        texture_source: str = "procedural",
        validation_anomalies: bool = True,
        validation_textures: str = "auto",
        validation_recipe: str = "validation",
        download: bool = False,
        preload: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be at least 0 (or null for the default), got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if train_shots is not None and train_shots < 1:
            raise ValueError(f"train_shots must be a positive number of images (or null for all), got {train_shots}")
        if validation_textures not in VALIDATION_TEXTURES:
            raise ValueError(f"validation_textures must be one of {VALIDATION_TEXTURES}, got {validation_textures!r}")
        if validation_recipe not in RECIPES:
            raise ValueError(f"validation_recipe must be one of {tuple(RECIPES)}, got {validation_recipe!r}")
        self.save_hyperparameters()
        self.root = root
        self.category = category or self.default_category()
        if not self.category:
            raise ValueError(f"category is required ({self.display_name()}: "
                             f"{', '.join(self.categories) or 'a category folder under root'}, or 'all')")
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train_shots = train_shots
        self.pseudo_anomalies = pseudo_anomalies
        self.texture_source = texture_source
        self.validation_anomalies = validation_anomalies
        self.validation_textures = validation_textures
        self.validation_recipe = validation_recipe
        self.download = download
        self.preload = preload
        self.cache_dir = cache_dir
        self.train_set: AnomalyDataset | None = None
        self.val_set: AnomalyDataset | None = None
        self.test_set: AnomalyDataset | None = None
        #: The training files of a few-shot run (``train_shots``), for the record.
        self.shot_files: list[str] = []

    # ------------------------------------------------------------------ the dataset's layout

    def default_category(self) -> str | None:
        """The category used when none is given (``None``: one must be)."""
        return None

    @classmethod
    def display_name(cls) -> str:
        """The dataset's name in messages."""
        return cls.title or cls.dataset_name or cls.__name__

    @property
    def dataset_root(self) -> Path:
        """The folder the layout is read from."""
        if self.root is None:
            raise ValueError(f"root is required for the {self.display_name()} dataset")
        return Path(self.root).expanduser()

    @classmethod
    def existing_root(cls, root: str | Path) -> Path:
        """``root`` as a path, or an error naming the dataset if it is no folder."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{cls.display_name()} dataset root {str(root)!r} does not exist or is not a folder")
        return root

    @classmethod
    def _is_category(cls, folder: Path) -> bool:
        if not folder.is_dir() or folder.name.startswith("."):
            return False
        if cls.official_names_suffice and folder.name in cls.categories:
            return True
        return bool(cls.category_markers) and all((folder / marker).is_dir() for marker in cls.category_markers)

    @classmethod
    def categories_under(cls, root: str | Path) -> list[str]:
        """The categories present under ``root``: the official ones (then :attr:`extra_categories`)
        in their order, then any other folder that holds :attr:`category_markers`, by name."""
        root = cls.existing_root(root)
        known = [c for c in dict.fromkeys((*cls.categories, *cls.extra_categories)) if cls._is_category(root / c)]
        return known + sorted(p.name for p in root.iterdir() if p.name not in known and cls._is_category(p))

    @classmethod
    def category_folder_under(cls, root: str | Path, category: str) -> Path:
        """``root/category``, or an error that names the dataset, what is there instead and, for a
        name that is not official either, the official categories."""
        folder = Path(root).expanduser() / category
        if not folder.is_dir():
            present, name = cls.categories_under(folder.parent), cls.display_name()  # root checked first
            hint = "" if category in cls.categories or not cls.categories else (
                f"; {category!r} is not an official {name} category either "
                f"({name}'s categories: {', '.join(cls.categories)})"
            )
            raise FileNotFoundError(
                f"{name} category {category!r} not found under {str(folder.parent)!r}: {name} categories "
                f"there: {', '.join(present) or 'none'}{hint}"
            )
        return folder

    def find_categories(self) -> list[str]:
        """The categories present under :attr:`dataset_root` (:meth:`categories_under`)."""
        return self.categories_under(self.dataset_root)

    def category_folder(self, category: str) -> Path:
        """``category``'s folder under :attr:`dataset_root` (:meth:`category_folder_under`)."""
        return self.category_folder_under(self.dataset_root, category)

    def train_samples(self, category: str) -> list[Sample]:
        """The normal training images of ``category`` (all of them; the split is done here)."""
        raise NotImplementedError

    def test_samples(self, category: str) -> list[Sample]:
        """The test images of ``category``, defective ones with their masks."""
        raise NotImplementedError

    def validation_samples(self, category: str) -> list[Sample]:
        """The official validation images of ``category`` (``use_official_validation``): the normal
        images of :attr:`official_validation` under its folder."""
        if self.official_validation is None:
            raise DatasetError(f"the {self.display_name()} dataset has no official validation split")
        return normal_samples(self.category_folder(category) / self.official_validation, "validation",
                              self.display_name(), "; use_official_validation=False carves validation from train/good")

    def download_category(self, category: str) -> None:
        """Fetch ``category`` (SHA-256 verified) into :attr:`dataset_root`."""
        raise DatasetError(f"the {self.display_name()} dataset cannot be downloaded by the suite: "
                           "get it from its publisher and point root at it")

    def category_missing(self, category: str) -> bool:
        """Whether ``category`` must be downloaded before use (``download=True``): its folder is
        absent, or half-extracted from :attr:`archive_name`."""
        folder = self.dataset_root / category
        return needs_extraction(folder, self.archive_name) if self.archive_name else not folder.is_dir()

    # ------------------------------------------------------------------ categories and setup

    @property
    def category_names(self) -> list[str]:
        """The categories this module loads: one, or several in the unified setting."""
        if self.category == ALL_CATEGORIES:
            found = self.find_categories()
            if not found:
                raise DatasetError(f"category 'all': no {self.display_name()} category under {str(self.dataset_root)!r}")
            return found
        if isinstance(self.category, str):  # the command line's form: "bottle" or "bottle,transistor"
            return [c.strip() for c in self.category.split(",") if c.strip()]
        return list(self.category)

    @property
    def unified(self) -> bool:
        """One model for several categories (the multi-class setting)."""
        return len(self.category_names) > 1

    def prepare_data(self) -> None:
        if not self.download:
            return
        for category in self.category_names:
            if self.category_missing(category):
                self.download_category(category)

    def _model_asks(self, attribute: str, default: bool) -> bool:
        """What the model being trained declares it needs (see adbench.models.base.AnomalyModule)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, attribute, default))

    def _wants_pseudo_anomalies(self) -> bool:
        if self.pseudo_anomalies is not None:
            return self.pseudo_anomalies
        return self._model_asks("needs_pseudo_anomalies", False)

    def _synthesizers(self, train_images: np.ndarray) -> tuple[PseudoAnomalySynthesizer, PseudoAnomalySynthesizer]:
        """The training synthesizer (DRAEM's recipe) and the validation one (``validation_recipe``), on shared
        or held-out textures."""
        if self.texture_source == TEXTURES_REQUIRED:
            raise DatasetError(
                "this profile needs a texture folder for its pseudo-anomalies (DRAEM uses DTD) and got none: "
                "set texture_root in the sweep (--texture-root, DTD_ROOT) or --data.texture_source=/path/to/dtd; "
                "--data.texture_source=procedural uses procedural textures deliberately"
            )
        source = make_texture_source(self.texture_source, images=train_images)
        held_out = self.validation_textures == "held-out" or (
            self.validation_textures == "auto" and isinstance(source, FolderTextures))
        if held_out and not isinstance(source, FolderTextures):
            raise DatasetError(
                f"validation_textures='held-out' needs a texture folder, got texture_source={self.texture_source!r}"
            )
        train_source, val_source = source.split(0.2, seed=self.split_seed) if held_out else (source, source)
        return (PseudoAnomalySynthesizer.from_recipe(train_source, "draem"),
                PseudoAnomalySynthesizer.from_recipe(val_source, self.validation_recipe))

    def _split(self, category: str) -> tuple[list[Sample], list[Sample]]:
        """``category``'s training and validation images (seeded split, or the official validation
        images with all training images, then the few-shot draw)."""
        samples = [replace(s, category=category) for s in self.train_samples(category)]
        if not samples:
            raise DatasetError(f"no training images for category {category!r} under {str(self.dataset_root)!r}")
        if self.use_official_validation:
            train, val = samples, [replace(s, category=category) for s in self.validation_samples(category)]
        else:
            train, val = split_train_validation(samples, self.val_fraction, self.split_seed)
        if self.train_shots is not None:
            train = select_shots(train, self.train_shots, self.split_seed)
        return train, val

    def setup(self, stage: str | None = None) -> None:
        categories = self.category_names
        if stage in ("fit", "validate", None) and self.train_set is None:
            train, val = [], []
            for category in categories:
                category_train, category_val = self._split(category)
                train += category_train
                val += category_val
            self.shot_files = [str(s.image_path) for s in train] if self.train_shots is not None else []
            self.train_set = self._dataset(train)
            wants = self._wants_pseudo_anomalies()
            if wants or (val and self.validation_anomalies):
                train_synthesis, val_synthesis = self._synthesizers(self.train_set.images)
                if wants:
                    self.train_set.synthesizer = train_synthesis
            if val:
                self.val_set = self._dataset(val)
                if self.validation_anomalies:
                    self.val_set.bake_pseudo_anomalies(val_synthesis, self.split_seed)
        if stage in ("test", "predict", None) and self.test_set is None:
            test = []
            for category in categories:
                samples = self.test_samples(category)
                if not samples:
                    raise DatasetError(f"no test images for category {category!r} under {str(self.dataset_root)!r}")
                test += [replace(s, category=category) for s in samples]
            self.test_set = self._dataset(test)

    def _dataset(self, samples: Sequence[Sample]) -> AnomalyDataset:
        """A split's dataset, preloaded or decoded on access (``preload``), through the cache if any."""
        preload = self.preload if self.preload is not None else len(samples) * self.image_size**2 * 3 <= PRELOAD_MAX_BYTES
        cache = DecodeCache(self.cache_dir) if self.cache_dir else None
        return AnomalyDataset(samples, self.image_size, preload=preload, cache=cache)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool = False) -> DataLoader:
        workers = self.num_workers
        if workers is None:
            workers = 0 if getattr(dataset, "preload", True) else default_workers()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            # Never drop the only batch; otherwise as the model asks.
            drop_last=train and len(dataset) > batch_size and self._model_asks("drop_incomplete_batches", True),
            num_workers=workers,
            persistent_workers=workers > 0,
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
