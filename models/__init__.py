"""Methods (one file each) and the parts they share; importing registers every method."""

from .base import AnomalyModule, AnomalyOutput
from .registry import create_model, get_model_class, list_models, register_model

# Importing a method's module registers it (one file per method).
from . import stpm  # noqa: E402, F401  isort: skip
from . import draem  # noqa: E402, F401  isort: skip
from . import patchcore  # noqa: E402, F401  isort: skip
from . import rd4ad  # noqa: E402, F401  isort: skip
from . import tsdn  # noqa: E402, F401  isort: skip
from . import rstpm  # noqa: E402, F401  isort: skip
from . import pouta  # noqa: E402, F401  isort: skip
from . import destseg  # noqa: E402, F401  isort: skip
from . import glass  # noqa: E402, F401  isort: skip
from . import fastflow  # noqa: E402, F401  isort: skip
from . import padim  # noqa: E402, F401  isort: skip
from . import efficientad  # noqa: E402, F401  isort: skip
from . import uniad  # noqa: E402, F401  isort: skip

__all__ = [
    "AnomalyModule",
    "AnomalyOutput",
    "create_model",
    "get_model_class",
    "list_models",
    "register_model",
]
