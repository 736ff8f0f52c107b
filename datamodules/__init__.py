"""Data: MVTec AD folders -> items, DRAEM-style pseudo-anomalies, the embedded default dataset."""

from .embedded import EMBEDDED_CATEGORIES, ensure_embedded_dataset
from .mvtec import MVTEC_CATEGORIES, DatasetError, MVTecDataModule, MVTecDataset
from .synthesis import PseudoAnomalySynthesizer, make_texture_source

__all__ = [
    "EMBEDDED_CATEGORIES",
    "MVTEC_CATEGORIES",
    "DatasetError",
    "MVTecDataModule",
    "MVTecDataset",
    "PseudoAnomalySynthesizer",
    "ensure_embedded_dataset",
    "make_texture_source",
]
