"""adbench's Python API: load a trained checkpoint and score images.

    import adbench
    detector = adbench.load("runs/stpm/bottle/seed0/checkpoints/best.ckpt")
    result = detector.predict("image.png")    # a path, a PIL image, an HxWxC array or a CHW tensor
    result.score, result.anomalous, result.anomaly_map   # float, bool (saved threshold), HxW array
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detector", "Prediction", "load", "predict_folder"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `adbench --help` must not pay for importing torch and the methods.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'adbench' has no attribute {name!r}")
