"""adbench's Python API: load a trained checkpoint and score images.

    import adbench
    detector = adbench.load("runs/stpm/bottle/seed0/checkpoints/best.ckpt")
    result = detector.predict("image.png")    # a path, a PIL image, an HxWxC array or a CHW tensor
    result.score, result.anomalous, result.anomaly_map   # float, bool (saved threshold), HxW array
"""

from .api import Detector, Prediction, load, predict_folder

__all__ = ["Detector", "Prediction", "load", "predict_folder"]
