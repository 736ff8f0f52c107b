"""Exact metrics against slow references, degenerate inputs, and the evaluator in a Trainer."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from lightning import Trainer
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.data import DataLoader

import adbench.callbacks.evaluation as evaluation_module
from adbench.callbacks import AnomalyEvaluator, compute_anomaly_metrics, f1_max, pro_auc, roc_auc
from adbench.callbacks.metrics import (
    MAD_METRICS,
    average_precision,
    f1_optimal_threshold,
    saturated_pro,
    segmentation_threshold,
)
from adbench.models.base import AnomalyModule, AnomalyOutput

SEEDS = range(6)


# ----------------------------------------------------------------------------- references


def f1_max_reference(scores: np.ndarray, labels: np.ndarray) -> float:
    """F1 of ``score >= t`` at every distinct score, by counting."""
    labels = labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def iou_max_reference(scores: np.ndarray, labels: np.ndarray) -> float:
    """IoU of ``score >= t`` at every distinct score, by counting."""
    labels = labels.astype(bool)
    return max(np.sum((scores >= t) & labels) / np.sum((scores >= t) | labels) for t in np.unique(scores))


def pro_reference(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """PRO the slow way: threshold at every distinct score, measure every region."""
    regions = []
    for i in range(maps.shape[0]):
        labelled, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.sum(pred & normal) / np.sum(normal))
        pros.append(np.mean([pred[i][region].mean() for i, region in regions]))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the crossing segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def spro_reference(maps: np.ndarray, labels: np.ndarray, regions: dict, fpr_limit: float) -> float:
    """sPRO the slow way: threshold at every distinct score; FPR over the good images' pixels only."""
    defects = [(i, mask, min(saturation, mask.sum())) for i, found in regions.items() for mask, saturation in found]
    good = maps[labels == 0]
    fprs, overlaps = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(good >= t))
        overlaps.append(np.mean([min(np.sum(maps[i][mask] >= t) / sat, 1.0) for i, mask, sat in defects]))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], overlaps[k - 1], overlaps[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_category(seed: int, n: int = 6, size: int = 20, levels: int = 0):
    """Small maps with several (also diagonal-only connected) regions per defective mask."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n, 2):  # every other image is defective
        seeds = rng.random((size, size)) < 0.02
        masks[i] = ndimage.binary_dilation(seeds, iterations=int(rng.integers(0, 3)))
        masks[i, 0, 0] = masks[i, 1, 1] = True  # a diagonal pair: one region only with 8-conn
    maps = (rng.random((n, size, size)) + 0.6 * masks).astype(np.float32)
    if levels:
        maps = np.round(maps * levels) / levels  # heavy ties, also across classes
    return maps, masks


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [0, 3, 10])
def test_roc_auc_matches_sklearn_with_ties(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300) + 0.3 * labels
    if levels:
        scores = np.round(scores * levels) / levels
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    # torch float32 input gives the same as numpy float32 input
    scores32 = scores.astype(np.float32)
    assert roc_auc(torch.from_numpy(scores32), torch.from_numpy(labels)) == pytest.approx(
        roc_auc_score(labels, scores32), abs=1e-6
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [0, 4])
def test_f1_max_matches_brute_force(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = rng.random(200) + 0.2 * labels
    if levels:
        scores = np.round(scores * levels) / levels
    assert f1_max(scores, labels) == pytest.approx(f1_max_reference(scores, labels), abs=1e-12)


# ----------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [0, 5, 20])
def test_average_precision_matches_sklearn_with_ties(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300) + 0.3 * labels
    if levels:
        scores = np.round(scores * levels) / levels
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_segmentation_threshold_is_mean_plus_three_std_of_normal_pixels() -> None:
    normal = np.random.default_rng(0).normal(2.0, 0.5, (4, 16, 16)).astype(np.float32)
    assert segmentation_threshold(normal) == pytest.approx(normal.mean() + 3 * normal.std(), rel=1e-6)
    assert math.isnan(segmentation_threshold(np.empty((0, 16, 16))))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [0, 5, 20])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_pro_matches_brute_force(seed: int, levels: int, fpr_limit: float) -> None:
    maps, masks = random_category(seed, levels=levels)
    expected = pro_reference(maps, masks, fpr_limit)
    assert pro_auc(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("levels", [0, 5])
def test_compute_anomaly_metrics_matches_references(seed: int, levels: int) -> None:
    maps, masks = random_category(seed, levels=levels)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(np.int64)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    threshold = float(np.quantile(maps[~masks], 0.9))
    got = compute_anomaly_metrics(torch.from_numpy(scores), torch.from_numpy(labels), maps, masks,
                                  segmentation_threshold=threshold)  # fmt: skip
    assert set(got) == {"image_auroc", "pixel_auroc", "pro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap",
                        "pro_fpr05", "pixel_iou_max", "seg_f1", "mad"}  # fmt: skip
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert got["image_f1max"] == pytest.approx(f1_max_reference(scores, labels), abs=1e-12)
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-6)
    assert got["pixel_f1max"] == pytest.approx(f1_max_reference(flat_maps, flat_masks), abs=1e-12)
    assert got["pro"] == pytest.approx(pro_reference(maps, masks, 0.3), abs=1e-9)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-12)
    assert got["pro_fpr05"] == pytest.approx(pro_reference(maps, masks, 0.05), abs=1e-9)
    assert got["pixel_iou_max"] == pytest.approx(iou_max_reference(flat_maps, flat_masks), abs=1e-12)
    predicted = flat_maps >= threshold
    assert got["seg_f1"] == pytest.approx(2 * np.sum(predicted & flat_masks) / (predicted.sum() + flat_masks.sum()))
    assert got["mad"] == pytest.approx(np.mean([got[k] for k in MAD_METRICS]), abs=1e-12)
    # (N, 1, H, W) tensors as the models return them give the same numbers
    got4d = compute_anomaly_metrics(
        scores, labels, torch.from_numpy(maps)[:, None], torch.from_numpy(masks).float()[:, None],
        segmentation_threshold=threshold,
    )
    assert got4d == pytest.approx(got, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS[:4])
@pytest.mark.parametrize("levels", [0, 5])
def test_saturated_pro_matches_brute_force(seed: int, levels: int) -> None:
    maps, masks = random_category(seed, levels=levels)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    rng = np.random.default_rng(seed)
    regions = {}
    for i in np.flatnonzero(labels):
        parts, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        found = [(parts == r, float(rng.choice([2.0, 0.5 * (parts == r).sum(), 1e6]))) for r in range(1, n + 1)]
        logical = np.zeros_like(masks[i])
        logical[2:9, 3:12] = True  # a large defect overlapping others: its pixels count for it too
        regions[i] = [*found, (logical, 20.0)]
    got = saturated_pro(maps, labels, regions, fpr_limits=(0.05, 0.3))
    for value, limit in zip(got, (0.05, 0.3), strict=True):
        assert value == pytest.approx(spro_reference(maps, labels, regions, limit), abs=1e-9)
    # Saturation at every defect's own area is plain per-defect overlap: PRO with the good images' FPR.
    plain = {i: [(m, m.sum()) for m, _ in found] for i, found in regions.items()}
    assert saturated_pro(maps, labels, plain)[1] == pytest.approx(spro_reference(maps, labels, plain, 0.3), abs=1e-9)
    assert all(math.isnan(v) for v in saturated_pro(maps, labels, {}))


def test_pro_uses_eight_connectivity() -> None:
    # (0,0)-(0,1) and the diagonal (1,2) are one region of 3 pixels with 8-connectivity
    # (PRO 1/3 when only (1,2) is found), two regions with 4-connectivity (PRO 1/2).
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.where(masks, 0.0, 0.5).astype(np.float32)
    maps[0, 1, 2] = 1.0
    assert pro_auc(maps, masks) == pytest.approx(1 / 3)


def test_perfect_detector() -> None:
    maps, masks = random_category(0)
    perfect = masks.astype(np.float32)  # ties inside each class only
    labels = masks.reshape(len(masks), -1).any(axis=1)
    got = compute_anomaly_metrics(labels.astype(np.float32), labels, perfect, masks, segmentation_threshold=0.5)
    assert got == pytest.approx(dict.fromkeys(got, 1.0), abs=1e-12)


def test_degenerate_inputs_give_nan() -> None:
    maps, masks = random_category(1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # degenerate is not an error, and not noisy
        assert math.isnan(roc_auc(scores, np.zeros(len(scores))))
        assert math.isnan(f1_max(scores, np.ones(len(scores))))
        assert math.isnan(roc_auc([], []))
        empty = np.zeros((0, 4, 4), dtype=np.float32)
        assert math.isnan(pro_auc(empty, empty.astype(bool)))
        assert math.isnan(pro_auc(maps, np.zeros_like(masks)))  # no region
        assert math.isnan(pro_auc(maps, np.ones_like(masks)))  # no normal pixel
        got = compute_anomaly_metrics(scores, np.zeros(len(scores)), maps, np.zeros_like(masks))
    assert all(math.isnan(v) for v in got.values()) and len(got) == 11

    # Image level defined, pixel level not: only the pixel metrics are NaN.
    labels = np.arange(len(scores)) % 2
    got = compute_anomaly_metrics(scores, labels, maps, np.zeros_like(masks))
    assert not math.isnan(got["image_auroc"]) and math.isnan(got["pro"])

    nan_maps = maps.copy()
    nan_maps[0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):
        assert math.isnan(pro_auc(nan_maps, masks))
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(maps, masks, fpr_limit=0.0)


# ----------------------------------------------------------------------------- evaluator


class _BrightnessModel(AnomalyModule):
    """Anomaly map = mean intensity: the fake data below puts anomalies in bright pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        anomaly_map = images.mean(dim=1, keepdim=True) * self.weight
        return AnomalyOutput(anomaly_map, anomaly_map.flatten(1).amax(dim=1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.weight - 1.0) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fake_items(n: int = 11, size: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    maps, masks = random_category(seed, n=n, size=size, levels=8)
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.from_numpy(maps[i] / maps.max()).expand(3, size, size).clone()
        image += 0.05 * torch.rand(3, size, size, generator=g)  # the model averages this away
        items.append(
            {
                "image": image.clamp(0, 1),
                "mask": torch.from_numpy(masks[i]).float()[None],
                "label": torch.tensor(int(masks[i].any())),
                "defect_type": "blob" if masks[i].any() else "good",
                "path": f"fake/{i:03d}.png",
            }
        )
    return items


def _expected(items: list[dict[str, Any]], pixel: bool = True) -> dict[str, float]:
    model = _BrightnessModel()
    images = torch.stack([item["image"] for item in items])
    with torch.no_grad():
        anomaly_map, image_score = model(images)
    labels = torch.stack([item["label"] for item in items])
    masks = torch.stack([item["mask"] for item in items]) > 0.5
    if not pixel:
        return compute_anomaly_metrics(image_score, labels)
    return compute_anomaly_metrics(image_score, labels, anomaly_map[:, 0], masks[:, 0])


def _trainer(evaluator: AnomalyEvaluator, **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[evaluator],
        **kwargs,
    )


def test_evaluator_in_trainer_test() -> None:
    items = _fake_items()
    evaluator = AnomalyEvaluator()
    trainer = _trainer(evaluator)
    trainer.test(_BrightnessModel(), dataloaders=DataLoader(items, batch_size=4))

    expected = _expected(items)
    assert math.isnan(evaluator.test_metrics["seg_f1"])  # no validation: no segmentation threshold
    assert evaluator.test_metrics == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert 0.5 < expected["pro"] < 1.0 and 0.5 < expected["pixel_auroc"] < 1.0  # not trivial
    for name, value in expected.items():
        if not math.isnan(value):
            assert trainer.callback_metrics[f"test/{name}"].item() == pytest.approx(value, abs=1e-6)
    assert "test/seg_f1" not in trainer.callback_metrics
    assert not evaluator._collected["test"].maps  # freed after computing


def test_segmentation_f1_uses_the_threshold_of_the_validation_normal_images_only() -> None:
    val_items, test_items = _fake_items(seed=1), _fake_items(seed=2)
    evaluator = AnomalyEvaluator(bootstrap_resamples=50)
    trainer = _trainer(evaluator)
    model = _BrightnessModel()
    trainer.validate(model, dataloaders=DataLoader(val_items, batch_size=4))
    with torch.no_grad():
        normal = torch.stack([item["image"] for item in val_items if item["label"] == 0]).mean(dim=1)
    threshold = evaluator.val_segmentation_threshold
    assert threshold == pytest.approx(float(normal.mean() + 3 * normal.std(unbiased=False)), rel=1e-5)
    # Changing the validation split's anomalous images does not move it.
    others = [item if item["label"] == 0 else {**item, "image": torch.ones_like(item["image"])} for item in val_items]
    trainer.validate(model, dataloaders=DataLoader(others, batch_size=4))
    assert evaluator.val_segmentation_threshold == pytest.approx(threshold, rel=1e-9)

    trainer.test(model, dataloaders=DataLoader(test_items, batch_size=4))
    maps = torch.stack([item["image"] for item in test_items]).mean(dim=1)
    masks = torch.stack([item["mask"][0] for item in test_items]) > 0.5
    predicted = maps >= threshold
    expected = 2 * (predicted & masks).sum().item() / (predicted.sum().item() + masks.sum().item())
    assert 0.0 < expected < 1.0 and evaluator.test_metrics["seg_f1"] == pytest.approx(expected, abs=1e-6)
    low, high = evaluator.test_intervals["seg_f1"]
    assert low <= evaluator.test_metrics["seg_f1"] <= high and low < high


def test_evaluator_fit_skips_sanity_check_and_pixel_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(len(args[0]))
        return compute_anomaly_metrics(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "compute_anomaly_metrics", counting)
    items = _fake_items(seed=3)
    evaluator = AnomalyEvaluator(pixel_metrics=("test",))
    trainer = _trainer(evaluator, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1)
    loader = DataLoader(items, batch_size=4)
    trainer.fit(_BrightnessModel(), train_dataloaders=loader, val_dataloaders=loader)

    assert calls == [len(items)]  # once, on the whole split; not on the sanity batch
    expected = _expected(items, pixel=False)
    # Without pixel metrics the selection score is the image AUROC alone.
    expected["selection_score"] = expected["image_auroc"]
    assert evaluator.val_metrics == pytest.approx(expected, abs=1e-12)
    assert trainer.callback_metrics["val/selection_score"].item() == pytest.approx(
        expected["image_auroc"], abs=1e-6
    )
    assert math.isfinite(evaluator.val_image_threshold)
    assert "val/pro" not in trainer.callback_metrics
    assert trainer.callback_metrics["val/image_auroc"].item() == pytest.approx(
        expected["image_auroc"], abs=1e-6
    )


def test_evaluator_does_not_log_nan() -> None:
    items = [item for item in _fake_items() if item["label"] == 0]  # only good images
    evaluator = AnomalyEvaluator()
    trainer = _trainer(evaluator)
    trainer.validate(_BrightnessModel(), dataloaders=DataLoader(items, batch_size=4))
    assert len(evaluator.val_metrics) == 11
    assert all(math.isnan(v) for v in evaluator.val_metrics.values())
    assert not any(key.startswith("val/") for key in trainer.callback_metrics)


def test_merge_ranks_drops_distributed_sampler_repeats() -> None:
    def part(indices: list[int]) -> dict[str, Any]:
        return {
            "scores": torch.tensor(indices, dtype=torch.float32),
            "labels": torch.tensor([i % 2 for i in indices]),
            "maps": torch.tensor(indices, dtype=torch.float32)[:, None, None].expand(-1, 2, 2),
            "masks": torch.zeros(len(indices), 2, 2, dtype=torch.bool),
            "paths": [f"p{i}" for i in indices],
        }

    # DistributedSampler with 5 samples on 2 ranks: rank 0 gets 0 2 4, rank 1 gets 1 3 0.
    merged = evaluation_module._merge_ranks([part([0, 2, 4]), part([1, 3, 0])])
    assert merged["paths"] == ["p0", "p2", "p4", "p1", "p3"]
    assert merged["scores"].tolist() == [0, 2, 4, 1, 3]
    assert merged["maps"][:, 0, 0].tolist() == [0, 2, 4, 1, 3]
    assert merged["labels"].tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("seed", range(4))
def test_f1_optimal_threshold_reaches_f1_max(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + 1.5 * labels, 1)  # ties
    threshold = f1_optimal_threshold(scores, labels)
    predicted = scores >= threshold
    tp = np.sum(predicted & labels)
    f1 = 2 * tp / (predicted.sum() + labels.sum())
    assert f1 == pytest.approx(f1_max(scores, labels), abs=1e-12)
    assert threshold in scores[labels]
