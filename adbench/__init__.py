"""adbench's Python API: load a trained checkpoint and score images.

    import adbench
    detector = adbench.load("runs/stpm/bottle/seed0/checkpoints/best.ckpt")
    result = detector.predict("image.png")    # a path, a PIL image, an HxWxC array or a CHW tensor
    result.score, result.anomalous, result.anomaly_map   # float, bool (saved threshold), HxW array
"""

from __future__ import annotations

import os
from typing import Any

# Installed, ``adbench.models`` is the checkout's models/ folder (pyproject.toml maps each folder).
# Run from a checkout's root (``python -m adbench...``), this folder comes before any installed
# copy, so its sibling folders are found the same way, with or without an editable install.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isfile(
    os.path.join(_checkout, "models", "__init__.py")
):
    __path__.append(_checkout)

__all__ = ["Detector", "Prediction", "load", "predict_folder"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `adbench --help` must not pay for importing torch and the methods.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'adbench' has no attribute {name!r}")
