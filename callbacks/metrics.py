"""Exact anomaly-detection metrics at image and pixel level, and their bootstrap intervals.

Image: AUROC, AP, F1-max. Pixel: AUROC, AP, F1-max, IoU-max, AU-PRO to FPR 0.3 (``pro``)
and 0.05 (``pro_fpr05``), the segmentation F1 at a threshold from defect-free validation
images (``seg_f1``), and mAD, the mean of ADer's seven. Every curve is exact (no binning;
ties as sklearn's), and every pixel metric of a category reads one sweep (:class:`_Sweep`)
built from one sort of its pixels. Intervals resample the test images, stratified by label
(``scipy.stats.bootstrap``, percentile; :mod:`adbench.callbacks.intervals`). Definitions, the
sweep and the resampling: docs/metrics.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "average_precision",
    "compute_anomaly_metrics",
    "f1_max",
    "f1_optimal_threshold",
    "pro_auc",
    "roc_auc",
    "saturated_pro",
    "segmentation_threshold",
]

#: 8-connectivity, as in MVTec AD's evaluation code (``scipy.ndimage.label`` default is 4).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

IMAGE_METRICS = ("image_auroc", "image_f1max", "image_ap")
PIXEL_METRICS = ("pixel_auroc", "pro", "pixel_f1max", "pixel_ap", "pro_fpr05", "pixel_iou_max", "seg_f1", "mad")
#: Every metric's name for people, in the order reports show them (mAD first).
METRIC_LABELS = {
    "mad": "mAD (mean of image AUROC / AP / F1-max, pixel AUROC / AP / F1-max, PRO)",
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pro": "PRO (AUPRO, FPR <= 0.3)",
    "image_f1max": "Image F1-max",
    "pixel_f1max": "Pixel F1-max",
    "image_ap": "Image AP",
    "pixel_ap": "Pixel AP",
    "pro_fpr05": "AU-PRO (FPR <= 0.05)",
    "pixel_iou_max": "Pixel IoU-max",
    "seg_f1": "Segmentation F1 (threshold: validation normal images, mean + 3 std)",
    "spro_fpr05": "sPRO (MVTec LOCO AD, FPR <= 0.05)",
    "spro": "sPRO (MVTec LOCO AD, FPR <= 0.3)",
}
#: ADer's seven, whose mean is ``mad``.
#: sPRO's keys (MVTec LOCO AD only), in the order of ``saturated_pro``'s default FPR limits.
SPRO_METRICS = ("spro_fpr05", "spro")
MAD_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro")
#: The second AU-PRO limit, MVTec AD 2's (``pro_fpr05``), beside the protocol's ``fpr_limit`` (``pro``).
TIGHT_FPR_LIMIT = 0.05
#: The segmentation threshold rule: mean + SEGMENTATION_SIGMAS standard deviations of the pixel
#: scores of defect-free validation images (see :func:`segmentation_threshold`).
SEGMENTATION_SIGMAS = 3.0


@dataclass(frozen=True)
class _Sweep:
    """Counts at every distinct positive score, in descending score order.

    Everything a ranking curve needs: at the ``g``-th largest distinct positive score
    ``u_g``, ``tp[g]`` positives and ``fp_ge[g]`` negatives have score ``>= u_g`` and
    ``fp_gt[g]`` negatives have score ``> u_g``; ``weight_ge[g]`` is the summed weight of
    the positives with score ``>= u_g`` (the PRO numerator), when weights were given.
    """

    tp: np.ndarray  # (G,) int64, increasing
    fp_ge: np.ndarray  # (G,) int64, non-decreasing
    fp_gt: np.ndarray  # (G,) int64, fp_gt <= fp_ge
    weight_ge: np.ndarray | None  # (G,) float64, increasing
    thresholds: np.ndarray  # (G,) the distinct positive scores u_g, descending
    n_pos: int
    n_neg: int


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of ``x`` on the CPU (no copy for CPU float32/float64/bool tensors)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # numpy has no bfloat16, and half sorts slowly
        return x.numpy()
    return np.asarray(x)


def _as_bool(x: np.ndarray) -> np.ndarray:
    # Masks/labels may come as float {0, 1} (masks are resized images): > 0.5 is "anomalous".
    return x if x.dtype == np.bool_ else x > 0.5


def _sweep(
    neg_sorted: np.ndarray, pos: np.ndarray, pos_weights: np.ndarray | None = None
) -> _Sweep:
    """Build the sweep from ascending-sorted negatives and (unsorted) positives.

    Both must be non-empty and NaN-free, and of the same dtype (so ``searchsorted``
    compares exactly the values that were sorted, without casting the big array).
    """
    order = np.argsort(pos)
    pos_sorted = pos[order]
    n_pos, n_neg = pos_sorted.size, neg_sorted.size

    # First index of each run of equal values in the ascending positives.
    first = np.flatnonzero(np.concatenate(([True], pos_sorted[1:] != pos_sorted[:-1])))
    values = pos_sorted[first]  # distinct positive scores, ascending

    neg_lt = np.searchsorted(neg_sorted, values, side="left")  # negatives < u
    neg_le = np.searchsorted(neg_sorted, values, side="right")  # negatives <= u

    weight_ge = None
    if pos_weights is not None:
        # Accumulate from the top score down (the order the curve is traversed), in float64:
        # the weights of a 10M-pixel category are tiny and float32 sums would drift.
        w_desc = pos_weights[order[::-1]].astype(np.float64, copy=False)
        suffix = np.cumsum(w_desc)[::-1]  # suffix[i] = summed weight of pos_sorted[i:]
        weight_ge = suffix[first][::-1]

    # Reverse everything to descending thresholds.
    return _Sweep(
        tp=(n_pos - first)[::-1],
        fp_ge=(n_neg - neg_lt)[::-1],
        fp_gt=(n_neg - neg_le)[::-1],
        weight_ge=weight_ge,
        thresholds=values[::-1],
        n_pos=n_pos,
        n_neg=n_neg,
    )


def area_under_polyline(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline ``(x, y)`` (x non-decreasing, ``x[0] <= limit``) over ``[0, limit]``.

    The segment that crosses ``limit`` is cut there with linear interpolation; vertical
    segments (equal x) have zero width, so they never matter for the area.
    """
    if limit >= x[-1]:  # the whole curve
        return float(np.dot(np.diff(x), y[:-1] + y[1:]) / 2.0)
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit < x[k]
    inside = np.dot(np.diff(x[:k]), y[: k - 1] + y[1:k]) / 2.0
    x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
    y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return float(inside + (limit - x0) * (y0 + y_limit) / 2.0)


def _curve_area(sweep: _Sweep, y_ge: np.ndarray, y_total: float, fpr_limit: float) -> float:
    """Area under ``y`` over FPR in ``[0, fpr_limit]``; ``y_ge[g]`` is y at threshold ``u_g``.

    Polyline vertices: the origin, then per distinct positive score ``(FP(>u), y(>u))`` and
    ``(FP(>=u), y(>=u))``, where ``y(>u_g) = y(>=u_{g-1})``, then ``(1, y_total)``.
    """
    n_groups = y_ge.size
    x = np.empty(2 * n_groups + 2, dtype=np.float64)
    y = np.empty_like(x)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], x[2:-1:2] = sweep.fp_gt, sweep.fp_ge
    y[1:-1:2] = np.concatenate(([0.0], y_ge[:-1]))
    y[2:-1:2] = y_ge
    x[-1], y[-1] = sweep.n_neg, y_total
    x /= sweep.n_neg
    return area_under_polyline(x, y, fpr_limit)


def _auroc_from(sweep: _Sweep) -> float:
    # min(): summation rounding can leave a perfect detector at 1 + 2e-16.
    return min(_curve_area(sweep, sweep.tp / sweep.n_pos, 1.0, 1.0), 1.0)


def _f1max_from(sweep: _Sweep) -> float:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P). The maximum over all thresholds is
    # reached at a distinct positive score: lowering the threshold past negatives only
    # adds FP, so within a run of thresholds with the same TP the highest one is best.
    f1 = 2.0 * sweep.tp / (sweep.tp + sweep.fp_ge + sweep.n_pos)
    return float(f1.max())


def _ap_from(sweep: _Sweep) -> float:
    # sklearn's AP: sum over thresholds of (R_k - R_{k-1}) P_k; recall moves only at a positive score.
    # (A resampled sweep can start with thresholds none of its drawn images reaches: 0 / 0, no recall step.)
    counted = sweep.tp + sweep.fp_ge
    precision = np.divide(sweep.tp, counted, out=np.zeros(counted.shape), where=counted > 0)
    recall_step = np.diff(sweep.tp, prepend=0) / sweep.n_pos
    return min(float(np.dot(recall_step, precision)), 1.0)


def _iou_max_from(sweep: _Sweep) -> float:
    # IoU = TP / (TP + FP + FN) = TP / (FP + P): like F1, at its best at a distinct positive score.
    return float((sweep.tp / (sweep.fp_ge + sweep.n_pos)).max())


def _f1_threshold_from(sweep: _Sweep) -> float:
    """The threshold ``t`` (predict anomalous where ``score >= t``) that reaches F1-max."""
    f1 = 2.0 * sweep.tp / (sweep.tp + sweep.fp_ge + sweep.n_pos)
    return float(sweep.thresholds[int(np.argmax(f1))])


def _pro_from(sweep: _Sweep, fpr_limit: float) -> float:
    assert sweep.weight_ge is not None
    # The weights sum to 1 over all regions; y_total is that sum (1 up to rounding).
    area = _curve_area(sweep, sweep.weight_ge, float(sweep.weight_ge[-1]), fpr_limit)
    return min(area / fpr_limit, 1.0)


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


# --------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------


def _image_sweep(scores: Any, labels: Any) -> _Sweep | None:
    """Sweep over image scores, or ``None`` when a metric is undefined (one class, NaN)."""
    scores_np = _to_numpy(scores).reshape(-1)
    labels_np = _as_bool(_to_numpy(labels).reshape(-1))
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"{scores_np.shape[0]} scores but {labels_np.shape[0]} labels")
    pos, neg = scores_np[labels_np], np.sort(scores_np[~labels_np])
    if pos.size == 0 or neg.size == 0:
        return None
    if np.isnan(neg[-1]) or np.isnan(pos).any():  # NaN sorts last
        warnings.warn("NaN in image scores: image metrics are NaN", RuntimeWarning, stacklevel=3)
        return None
    return _sweep(neg, pos)


def roc_auc(scores: Any, labels: Any) -> float:
    """Exact area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score``.

    ``scores``: (N,) larger = more anomalous; ``labels``: (N,) 0 normal / 1 anomalous.
    Returns ``nan`` if only one class is present.
    """
    sweep = _image_sweep(scores, labels)
    return math.nan if sweep is None else _auroc_from(sweep)


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 score over all thresholds ``score >= t`` (``nan`` if only one class is present)."""
    sweep = _image_sweep(scores, labels)
    return math.nan if sweep is None else _f1max_from(sweep)


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score`` (``nan``: one class)."""
    sweep = _image_sweep(scores, labels)
    return math.nan if sweep is None else _ap_from(sweep)


def f1_optimal_threshold(scores: Any, labels: Any) -> float:
    """The threshold at which :func:`f1_max` is reached (``nan`` if only one class is present).

    Meant for thresholds chosen on a validation split and then applied to the test set.
    """
    sweep = _image_sweep(scores, labels)
    return math.nan if sweep is None else _f1_threshold_from(sweep)


# --------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------


def region_pixel_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """One (H, W) bool mask's anomalous pixels, in C order of ``mask[mask]``: ``1 / |their region|``
    (8-connected regions); and the number of regions. Each region's weights sum to 1."""
    regions, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    in_region = regions[mask]
    return 1.0 / np.bincount(in_region)[in_region], n


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel ``1 / |its region|``, in C order of ``masks[masks]``; and #regions.

    Labelled image by image (regions never span images) and only where there is an
    anomaly, so no N*H*W label volume is ever allocated.
    """
    weights: list[np.ndarray] = []
    n_regions = 0
    for i in np.flatnonzero(masks.any(axis=(1, 2))):
        image_weights, n = region_pixel_weights(masks[i])
        weights.append(image_weights)
        n_regions += n
    if not weights:
        return np.empty(0, dtype=np.float64), 0
    return np.concatenate(weights), n_regions


def _pixel_inputs(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps_np = _to_numpy(anomaly_maps)
    masks_np = _as_bool(_to_numpy(masks))
    if maps_np.ndim == 4 and maps_np.shape[1] == 1:  # (N, 1, H, W) as the models return it
        maps_np = maps_np[:, 0]
    if masks_np.ndim == 4 and masks_np.shape[1] == 1:
        masks_np = masks_np[:, 0]
    if maps_np.ndim != 3 or maps_np.shape != masks_np.shape:
        raise ValueError(
            f"anomaly maps {maps_np.shape} and masks {masks_np.shape} must both be (N, H, W)"
        )
    return maps_np, masks_np


def _pixel_sweep(maps: np.ndarray, masks: np.ndarray) -> _Sweep | None:
    """The single sweep shared by pixel AUROC, pixel F1-max and PRO (``None``: undefined)."""
    region_weights, n_regions = _region_weights(masks)
    if n_regions == 0:
        return None
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    pos = flat_maps[flat_masks]
    neg = flat_maps[~flat_masks]  # a fresh copy, sorted in place: no extra N-sized buffer
    if neg.size == 0:
        return None
    neg.sort()
    if np.isnan(neg[-1]) or np.isnan(pos).any():  # NaN sorts last
        warnings.warn("NaN in anomaly maps: pixel metrics are NaN", RuntimeWarning, stacklevel=3)
        return None
    region_weights /= n_regions
    return _sweep(neg, pos, region_weights)


def segmentation_threshold(normal_maps: Any) -> float:
    """The segmentation threshold from defect-free validation maps: mean + 3 std of their pixel scores.

    The rule the suite applies for MVTec AD 2's thresholded segmentation F1: no test
    information, no anomalous image. ``nan`` when there is no finite pixel score.
    """
    values = _to_numpy(normal_maps).reshape(-1)
    if values.size == 0 or not np.isfinite(values).all():
        return math.nan
    values = values.astype(np.float64, copy=False)
    return float(values.mean() + SEGMENTATION_SIGMAS * values.std())


def _threshold_counts(maps: np.ndarray, masks: np.ndarray, threshold: float) -> np.ndarray:
    """Per image: anomalous pixels ``>= threshold`` (TP), normal pixels ``>= threshold`` (FP),
    anomalous pixels (P); (N, 3) float64."""
    above = maps >= threshold
    return np.stack([(above & masks).sum(axis=(1, 2)), (above & ~masks).sum(axis=(1, 2)),
                     masks.sum(axis=(1, 2))], axis=1).astype(np.float64)  # fmt: skip


def _f1_from_counts(counts: np.ndarray) -> float:
    tp, fp, positives = counts
    return float(2.0 * tp / (tp + fp + positives)) if positives > 0 else math.nan


def _mad(metrics: dict[str, float]) -> float:
    return float(np.mean([metrics[k] for k in MAD_METRICS]))


def saturated_pro(anomaly_maps: Any, labels: Any, regions: dict[int, list[tuple[np.ndarray, float]]],
                  fpr_limits: tuple[float, ...] = (TIGHT_FPR_LIMIT, 0.3)) -> list[float]:  # fmt: skip
    """MVTec LOCO AD's saturated PRO (sPRO), normalised area to each FPR limit of ``fpr_limits``.

    ``regions[i]``: the ground-truth defects of image ``i``, each a (H, W) bool mask and its
    saturation area in pixels (at most the mask's area). A defect's overlap at threshold ``t`` is
    ``min(|{score >= t} in mask| / saturation, 1)``, averaged over all defects; the FPR is over the
    pixels of the defect-free images (``labels == 0``) only, as LOCO's evaluation computes it. The
    same sweep as PRO: each defect pixel weighs what it adds to its defect's saturated overlap when
    the threshold passes it (``1 / saturation`` until the saturation area is reached, then 0).
    ``nan`` without a defect or a defect-free image.
    """
    negatives, defects = _saturated_defects(anomaly_maps, labels, regions)
    if not defects or negatives.size == 0:
        return [math.nan] * len(fpr_limits)
    sweep = _saturated_sweep(negatives, defects)
    return [_pro_from(sweep, limit) for limit in fpr_limits]


def _saturated_sweep(negatives: np.ndarray, defects: dict[int, tuple[np.ndarray, np.ndarray, int]]) -> _Sweep:
    """sPRO's sweep of :func:`_saturated_defects`' output: every defect's weights shared out over all defects."""
    n_defects = sum(count for _, _, count in defects.values())
    positives = np.concatenate([scores for scores, _, _ in defects.values()]).astype(negatives.dtype)
    weights = np.concatenate([weights for _, weights, _ in defects.values()]) / n_defects
    return _sweep(np.sort(negatives), positives, weights)


def _saturated_defects(anomaly_maps: Any, labels: Any, regions: dict[int, list[tuple[np.ndarray, float]]],
                       ) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray, int]]]:  # fmt: skip
    """sPRO's inputs: the defect-free images' pixel scores, and per image with a defect its
    defect pixels' scores, their saturated weights (each defect's sum to 1) and its defect count."""
    maps = _to_numpy(anomaly_maps)
    maps = maps[:, 0] if maps.ndim == 4 else maps
    good = ~_as_bool(_to_numpy(labels).reshape(-1))
    defects: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for i, found in regions.items():
        scores, weights = [], []
        for mask, saturation in found:
            if not mask.any():
                continue
            values = maps[i][mask]
            saturation = min(float(saturation), float(values.size))
            rank = np.empty(values.size)
            rank[np.argsort(-values, kind="stable")] = np.arange(1, values.size + 1)  # 1 = the highest score
            weights.append((np.minimum(rank, saturation) - np.minimum(rank - 1, saturation)) / saturation)
            scores.append(values)
        if scores:
            defects[i] = (np.concatenate(scores), np.concatenate(weights), len(scores))
    return maps[good].reshape(-1), defects


def pro_auc(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in ``[0, fpr_limit]`` (1.0 is perfect).

    ``anomaly_maps``: (N, H, W) scores; ``masks``: (N, H, W) bool ground truth. ``nan`` if
    there is no anomalous region or no normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    sweep = _pixel_sweep(*_pixel_inputs(anomaly_maps, masks))
    return math.nan if sweep is None else _pro_from(sweep, fpr_limit)


def compute_anomaly_metrics(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any | None = None,
    masks: Any | None = None,
    fpr_limit: float = 0.3,
    with_thresholds: bool = False,
    segmentation_threshold: float = math.nan,
) -> dict[str, float]:
    """All benchmark metrics of one category.

    Returns the image metrics (``image_auroc``, ``image_f1max``, ``image_ap``) and, when
    ``anomaly_maps`` and ``masks`` are given, the pixel ones (``pixel_auroc``, ``pro``,
    ``pixel_f1max``, ``pixel_ap``, ``pro_fpr05``, ``pixel_iou_max``, ``seg_f1``, ``mad``), all from
    one sort of the category's pixels. Undefined metrics are ``nan``.

    Args:
        image_scores: (N,) image anomaly scores.
        image_labels: (N,) 0 good / 1 anomalous.
        anomaly_maps: (N, H, W) or (N, 1, H, W) pixel scores; float32 keeps memory low.
        masks: same shape, bool (or float {0, 1}) ground truth.
        fpr_limit: upper FPR bound of the PRO integral.
        with_thresholds: also return ``image_threshold`` and ``pixel_threshold``, the
            F1-optimal thresholds (to be chosen on validation data, applied to test data).
        segmentation_threshold: the pixel threshold of ``seg_f1``, from validation data
            (:func:`segmentation_threshold`); ``nan``: ``seg_f1`` is ``nan``.
    """
    _check_fpr_limit(fpr_limit)
    image = _image_sweep(image_scores, image_labels)
    metrics = {
        "image_auroc": math.nan if image is None else _auroc_from(image),
        "image_f1max": math.nan if image is None else _f1max_from(image),
        "image_ap": math.nan if image is None else _ap_from(image),
    }
    if with_thresholds:
        metrics["image_threshold"] = math.nan if image is None else _f1_threshold_from(image)
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("pass both anomaly_maps and masks, or neither")
    if anomaly_maps is not None:
        maps, mask_array = _pixel_inputs(anomaly_maps, masks)
        pixel = _pixel_sweep(maps, mask_array)
        if pixel is None:
            metrics.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        else:
            metrics.update({
                "pixel_auroc": _auroc_from(pixel), "pro": _pro_from(pixel, fpr_limit),
                "pixel_f1max": _f1max_from(pixel), "pixel_ap": _ap_from(pixel),
                "pro_fpr05": _pro_from(pixel, TIGHT_FPR_LIMIT), "pixel_iou_max": _iou_max_from(pixel),
                "seg_f1": math.nan if math.isnan(segmentation_threshold) else
                _f1_from_counts(_threshold_counts(maps, mask_array, segmentation_threshold).sum(axis=0)),
            })  # fmt: skip
            metrics["mad"] = _mad(metrics)
        if with_thresholds:
            metrics["pixel_threshold"] = math.nan if pixel is None else _f1_threshold_from(pixel)
    return metrics
