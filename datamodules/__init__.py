"""Data: datasets on disk -> items, DRAEM-style pseudo-anomalies, the embedded default dataset.

Each dataset is an ``AnomalyDataModule`` subclass in its own file, registered by name;
importing it here registers it.
"""

from . import (  # one line per dataset, each imported to register it
    btad,  # noqa: F401
    folder,  # noqa: F401
    loco,  # noqa: F401
    mpdd,  # noqa: F401
    mvtec,  # noqa: F401
    mvtec3d,  # noqa: F401
    mvtec_ad2,  # noqa: F401
    real_iad,  # noqa: F401
    visa,  # noqa: F401
)
from .base import ALL_CATEGORIES, AnomalyDataModule, AnomalyDataset, DatasetError, Sample
from .embedded import ensure_embedded_dataset
from .embedded_render import EMBEDDED_CATEGORIES
from .mvtec import MVTEC_CATEGORIES, MVTecDataModule
from .registry import dataset_class_path, get_dataset_class, list_datasets, register_dataset
from .synthesis import PseudoAnomalySynthesizer, make_texture_source

__all__ = [
    "ALL_CATEGORIES",
    "EMBEDDED_CATEGORIES",
    "MVTEC_CATEGORIES",
    "AnomalyDataModule",
    "AnomalyDataset",
    "DatasetError",
    "MVTecDataModule",
    "PseudoAnomalySynthesizer",
    "Sample",
    "dataset_class_path",
    "ensure_embedded_dataset",
    "get_dataset_class",
    "list_datasets",
    "make_texture_source",
    "register_dataset",
]
