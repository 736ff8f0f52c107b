"""Both sides scored alike: our metrics on each worker's raw predictions, against one ground truth
(our masks, matched to the predictions by image path)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .pairs import CompareError


@dataclass
class GroundTruth:
    paths: list[str]  # realpaths, in test-sample order
    labels: Any  # (N,) int
    masks: Any  # (N, H, W) bool


def load_ground_truth(
    root: str, category: str, image_size: int, keep: list[str] | None = None
) -> GroundTruth:
    """Labels and masks (at ``image_size``, nearest) of the test images, as our DataModule reads them."""
    import numpy as np

    from adbench.datamodules import MVTecDataModule
    from adbench.datamodules.base import read_mask

    samples = MVTecDataModule(root=root, category=category).test_samples(category)
    if keep is not None:
        wanted = {os.path.realpath(p) for p in keep}
        samples = [s for s in samples if os.path.realpath(s.image_path) in wanted]
    masks = np.zeros((len(samples), image_size, image_size), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            masks[i] = read_mask(sample.mask_path, image_size, sample.image_path) > 0
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return GroundTruth([os.path.realpath(s.image_path) for s in samples], labels, masks)


#: The metrics whose ours - anomalib difference gets a paired bootstrap interval.
DELTA_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro", "pro_fpr05")


def aligned_predictions(predictions: str | Path, truth: GroundTruth) -> tuple[Any, Any]:
    """One run's raw image scores and maps (``.npz`` from a worker), in ``truth``'s image order."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    data = np.load(predictions)
    index = {os.path.realpath(str(p)): i for i, p in enumerate(data["paths"])}
    missing = [p for p in truth.paths if p not in index]
    extra = sorted(set(index) - set(truth.paths))
    if missing or extra:
        raise CompareError(
            f"predictions of {predictions} do not cover the test set: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    order = np.array([index[p] for p in truth.paths])
    scores, maps = data["scores"][order], data["maps"][order]
    if maps.shape[-2:] != truth.masks.shape[-2:]:  # not expected: both sides predict at image_size
        maps = F.interpolate(torch.from_numpy(maps)[:, None], size=truth.masks.shape[-2:],
                             mode="bilinear", align_corners=False)[:, 0].numpy()  # fmt: skip
    return scores, maps


def metrics_from_predictions(predictions: str | Path, truth: GroundTruth) -> dict[str, float]:
    """Our metrics of one run's raw predictions (``.npz`` from a worker) against ``truth``."""
    from adbench.callbacks.metrics import compute_anomaly_metrics

    scores, maps = aligned_predictions(predictions, truth)
    return compute_anomaly_metrics(scores, truth.labels, maps, truth.masks)


def deltas_from_predictions(ours: str | Path, theirs: str | Path, truth: GroundTruth,
                            n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per metric of :data:`DELTA_KEYS`: ``delta`` (ours - anomalib) and its paired bootstrap
    interval ``low``, ``high`` (the test images resampled once per draw for both sides)."""
    from adbench.callbacks.intervals import paired_bootstrap_deltas
    from adbench.callbacks.metrics import compute_anomaly_metrics

    (scores_a, maps_a), (scores_b, maps_b) = aligned_predictions(ours, truth), aligned_predictions(theirs, truth)
    point_a = compute_anomaly_metrics(scores_a, truth.labels, maps_a, truth.masks)
    point_b = compute_anomaly_metrics(scores_b, truth.labels, maps_b, truth.masks)
    intervals = paired_bootstrap_deltas(scores_a, scores_b, truth.labels, maps_a, maps_b, truth.masks,
                                        n_resamples=n_resamples, seed=seed)  # fmt: skip
    return {key: {"delta": point_a[key] - point_b[key], "low": intervals[key][0], "high": intervals[key][1]}
            for key in DELTA_KEYS}  # fmt: skip
