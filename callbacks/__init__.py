"""Lightning callbacks shared by every method: evaluation, visualisation, timing, guards."""

from .evaluation import AnomalyEvaluator
from .guards import NonFiniteLossError, NonFiniteLossGuard
from .metrics import compute_anomaly_metrics, f1_max, f1_optimal_threshold, pro_auc, roc_auc
from .timing import TimingCallback
from .visualization import AnomalyMapVisualizer

__all__ = [
    "AnomalyEvaluator",
    "AnomalyMapVisualizer",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "TimingCallback",
    "compute_anomaly_metrics",
    "f1_max",
    "f1_optimal_threshold",
    "pro_auc",
    "roc_auc",
]
