"""Lightning callbacks shared by every method: evaluation, visualisation, timing, guards, CPU memory."""

from .allocator import ReuseFreedMemory, keep_freed_memory
from .evaluation import AnomalyEvaluator
from .guards import LossHistory, NonFiniteLossError, NonFiniteLossGuard
from .metrics import compute_anomaly_metrics, f1_max, f1_optimal_threshold, pro_auc, roc_auc
from .timing import TimingCallback
from .visualization import AnomalyMapVisualizer

__all__ = [
    "AnomalyEvaluator",
    "AnomalyMapVisualizer",
    "LossHistory",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ReuseFreedMemory",
    "TimingCallback",
    "compute_anomaly_metrics",
    "f1_max",
    "f1_optimal_threshold",
    "keep_freed_memory",
    "pro_auc",
    "roc_auc",
]
