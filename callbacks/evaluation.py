"""Collect every method's validation/test outputs and score them with the exact metrics.

Metrics are computed once per epoch on the whole split, not averaged over batches:
AUROC, F1-max and PRO are ranking metrics over all images/pixels of a category, and a
per-batch mean of them is a different (and batch-size dependent) number.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from adbench.checkpoints import metadata, update_metadata

from .intervals import BOOTSTRAP_METHOD, bootstrap_intervals, bootstrap_saturated_pro
from .metrics import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    SPRO_METRICS,
    compute_anomaly_metrics,
    saturated_pro,
    segmentation_threshold,
)

__all__ = ["AnomalyEvaluator"]

_STAGES = ("val", "test")
#: The checkpoint-selection monitor (logged by the evaluator at every validation).
SELECTION_MONITOR = "val/selection_score"
#: Validation metrics averaged into ``val/selection_score``, the checkpoint-selection monitor.
SELECTION_METRICS = ("image_auroc", "pixel_auroc")
#: The selection score of an epoch whose model says it is not ready (see AnomalyModule.ready_for_selection).
NOT_READY_SCORE = -1.0


@dataclass
class _Collected:
    """What one process saw in one epoch of one stage, on the CPU."""

    scores: list[Tensor] = field(default_factory=list)  # (B,) float32
    labels: list[Tensor] = field(default_factory=list)  # (B,) int64
    maps: list[Tensor] = field(default_factory=list)  # (B, H, W) float32, if pixel metrics
    masks: list[Tensor] = field(default_factory=list)  # (B, H, W) bool, if pixel metrics
    paths: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)

    def concatenate(self) -> dict[str, Any]:
        """One tensor per field (empties the lists as it goes, to not hold two copies)."""

        def cat(parts: list[Tensor]) -> Tensor | None:
            if not parts:
                return None
            joined = torch.cat(parts)
            parts.clear()
            return joined

        return {
            "scores": cat(self.scores),
            "labels": cat(self.labels),
            "maps": cat(self.maps),
            "masks": cat(self.masks),
            "paths": self.paths,
            "categories": self.categories,
            "defect_types": self.defect_types,
        }


def _merge_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate what all processes collected and drop repeated images.

    ``DistributedSampler`` pads the last batches with repeats of the first samples so
    that every process gets as many; counting them twice would bias every metric.
    """
    paths = [p for part in per_rank for p in part["paths"]]
    # Category and defect type lists may be absent (outputs collected without them): blanks, one per image.
    merged: dict[str, Any] = {key: [v for part in per_rank for v in part.get(key, [""] * len(part["paths"]))]
                              for key in ("paths", "categories", "defect_types")}
    for key in ("scores", "labels", "maps", "masks"):
        parts = [part[key] for part in per_rank if part[key] is not None]
        merged[key] = torch.cat(parts) if parts else None
        for part in per_rank:
            part[key] = None  # let the per-rank copies go as soon as they are merged

    seen: set[str] = set()
    keep = []
    for i, path in enumerate(paths):
        if path not in seen:
            seen.add(path)
            keep.append(i)
    if len(keep) < len(paths):
        index = torch.tensor(keep, dtype=torch.long)
        for key in ("scores", "labels", "maps", "masks"):
            if merged[key] is not None:
                merged[key] = merged[key][index]
        for key in ("paths", "categories", "defect_types"):
            merged[key] = [merged[key][i] for i in keep]
    return merged


class AnomalyEvaluator(Callback):
    """Image- and pixel-level anomaly metrics at the end of every validation and test epoch.

    Logs ``val/<metric>`` and ``test/<metric>`` for every metric of
    :mod:`adbench.callbacks.metrics` (``seg_f1`` at test only, at the threshold measured on the
    validation split's defect-free images); ``nan``
    metrics (e.g. a validation split with no anomaly) are kept in :attr:`val_metrics` /
    :attr:`test_metrics` but not logged, so they never poison a checkpoint monitor.

    Under multi-process DDP the outputs of all processes are gathered on rank 0, which
    computes the metrics and broadcasts them, so every process logs the same values
    (``sync_dist`` with ``max`` keeps them exact) and ``*_metrics`` agree everywhere.

    Args:
        pixel_metrics: compute the pixel-level metrics: ``True`` for both stages,
            ``False`` for none, or the stages that get them, e.g. ``("test",)`` to keep
            validation cheap (no anomaly maps are then kept in memory for it either).
        fpr_limit: upper FPR bound of the PRO integral (0.3 in MVTec AD's protocol).
        bootstrap_resamples: resamples of the test images for the 95 % confidence interval
            of every test metric (:func:`adbench.callbacks.intervals.bootstrap_intervals`); 0: none.
        bootstrap_seed: seed of those resamples (fixed, so an interval is reproducible).
    """

    def __init__(
        self,
        pixel_metrics: bool | Sequence[str] = True,
        fpr_limit: float = 0.3,
        bootstrap_resamples: int = 1000,
        bootstrap_seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(pixel_metrics, bool):
            self.pixel_stages = set(_STAGES) if pixel_metrics else set()
        else:
            self.pixel_stages = set(pixel_metrics)
            unknown = self.pixel_stages - set(_STAGES)
            if unknown:
                raise ValueError(f"unknown stages {sorted(unknown)}; choose from {_STAGES}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if bootstrap_resamples < 0:
            raise ValueError(f"bootstrap_resamples must be >= 0, got {bootstrap_resamples}")
        self.fpr_limit = fpr_limit
        self.bootstrap = {"n_resamples": bootstrap_resamples, "seed": bootstrap_seed, "confidence_level": 0.95,
                          "method": BOOTSTRAP_METHOD}
        #: Test metric -> [low, high] (empty when bootstrap_resamples is 0).
        self.test_intervals: dict[str, list[float]] = {}
        #: The scored test images: ``path``, ``label``, ``score`` lists, in loader order.
        self.test_images: dict[str, list[Any]] = {}
        self.val_metrics: dict[str, float] = {}
        #: Every validation epoch of the current fit: ``{"epoch", "step", **metrics}``, oldest first
        #: (what checkpoint selection chose among, and whether it could tell the epochs apart).
        self.val_history: list[dict[str, float]] = []
        #: F1-optimal thresholds found on the validation split (for display/deployment).
        self.val_image_threshold = math.nan
        self.val_pixel_threshold = math.nan
        #: The segmentation threshold of ``seg_f1``: mean + 3 std of the pixel scores of the validation
        #: split's defect-free images (:func:`adbench.callbacks.metrics.segmentation_threshold`).
        self.val_segmentation_threshold = math.nan
        self.test_metrics: dict[str, float] = {}
        #: Unified setting (test images of several categories): category -> its test metrics.
        self.test_metrics_by_category: dict[str, dict[str, float]] = {}
        #: Datasets that report per anomaly type (``report_per_defect_type``, e.g. MVTec LOCO's
        #: logical vs structural anomalies): "category/defect type" -> metrics on that type's
        #: images and the category's good images.
        self.test_metrics_by_defect_type: dict[str, dict[str, float]] = {}
        self._per_defect_type = False
        #: The datamodule's ``saturation_regions(image_path, size)`` where it has one (MVTec LOCO AD): sPRO.
        self._saturation_regions: Any = None
        self._collected = {stage: _Collected() for stage in _STAGES}
        self._warned_no_path = False

    # ------------------------------------------------------------------ lightning hooks

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collected["val"] = _Collected()  # drop leftovers of an interrupted epoch

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._collect("val", trainer, outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            self._collected["val"] = _Collected()
            return
        self.val_metrics = self._evaluate("val", trainer, pl_module)
        self.val_history.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, **self.val_metrics}
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.val_history = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collected["test"] = _Collected()
        self._saturation_regions = getattr(trainer.datamodule, "saturation_regions", None)
        self._per_defect_type = bool(getattr(trainer.datamodule, "report_per_defect_type", False))

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect("test", trainer, outputs, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.test_metrics = self._evaluate("test", trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # What scoring new images needs besides the weights: the validation thresholds and the input size.
        update_metadata(
            checkpoint,
            image_threshold=self.val_image_threshold,
            pixel_threshold=self.val_pixel_threshold,
            segmentation_threshold=self.val_segmentation_threshold,
            image_size=(getattr(trainer.datamodule, "hparams", None) or {}).get("image_size"),
        )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = metadata(checkpoint)
        self.val_image_threshold = float(saved.get("image_threshold", math.nan))
        self.val_pixel_threshold = float(saved.get("pixel_threshold", math.nan))
        self.val_segmentation_threshold = float(saved.get("segmentation_threshold", math.nan))

    def save_test_scores(self, path: str | Path, root: str | None = None) -> Path:
        """Write the last test's per-image CSV (atomically): path (relative to ``root`` when under it),
        defect type, label, score, and the decision at the F1-optimal threshold chosen on validation
        (empty when there is none)."""
        path, threshold, images = Path(path), self.val_image_threshold, self.test_images
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".csv.tmp")
        with open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "category", "defect_type", "label", "score", "val_f1_threshold",
                             "predicted_anomalous"])
            defects = [d or Path(image).parent.name for d, image in zip(images["defect_type"], images["path"], strict=True)]
            for image, category, defect, label, score in zip(images["path"], images["category"], defects,
                                                             images["label"], images["score"], strict=True):
                relative = Path(image)
                if root and relative.is_relative_to(Path(root)):
                    relative = relative.relative_to(Path(root))
                decided = "" if math.isnan(threshold) else int(score >= threshold)
                writer.writerow([relative.as_posix(), category, defect, label, repr(score),
                                 "" if math.isnan(threshold) else repr(threshold), decided])
        os.replace(temporary, path)
        return path

    # ------------------------------------------------------------------ internals

    def _collect(
        self, stage: str, trainer: Trainer, outputs: Any, batch: Mapping[str, Any]
    ) -> None:
        if isinstance(outputs, Mapping):
            anomaly_map, image_score = outputs["anomaly_map"], outputs["image_score"]
        elif outputs is not None and hasattr(outputs, "anomaly_map"):  # an AnomalyOutput
            anomaly_map, image_score = outputs.anomaly_map, outputs.image_score
        else:
            raise TypeError(
                f"{stage} step must return {{'anomaly_map', 'image_score'}} (got {type(outputs).__name__})"
            )
        collected = self._collected[stage]
        scores = image_score.detach().to("cpu", torch.float32).reshape(-1)
        collected.scores.append(scores)
        collected.labels.append(
            torch.as_tensor(batch["label"]).detach().to("cpu", torch.long).reshape(-1)
        )

        paths = batch.get("path")
        if paths is None:
            # Unique stand-ins; they cannot spot DistributedSampler's padding repeats.
            if trainer.world_size > 1 and not self._warned_no_path:
                rank_zero_warn(
                    "batches have no 'path': repeated samples under DDP are counted twice"
                )
                self._warned_no_path = True
            start = len(collected.paths)
            paths = [f"rank{trainer.global_rank}/{start + i}" for i in range(scores.numel())]
        collected.paths.extend(str(p) for p in paths)
        for key, store in (("category", collected.categories), ("defect_type", collected.defect_types)):
            values = batch.get(key)
            store.extend([str(v) for v in values] if values is not None else [""] * scores.numel())

        if stage in self.pixel_stages:
            # Binarise on the device: 1 byte per pixel crosses to the host instead of 4.
            mask = (batch["mask"].detach() > 0.5).cpu()
            anomaly_map = anomaly_map.detach().to("cpu", torch.float32)
            if anomaly_map.ndim == 4:
                anomaly_map = anomaly_map[:, 0]
            if mask.ndim == 4:
                mask = mask[:, 0]
            if anomaly_map.shape != mask.shape:
                raise ValueError(
                    f"anomaly map {tuple(anomaly_map.shape)} and mask {tuple(mask.shape)} differ: "
                    "methods must return maps at input resolution"
                )
            collected.maps.append(anomaly_map)
            collected.masks.append(mask)

    def _gather(self, data: dict[str, Any], trainer: Trainer) -> dict[str, Any] | None:
        """All processes' data on rank 0 (``None`` elsewhere), without repeats."""
        rank = trainer.global_rank
        gathered: list[Any] | None = [None] * trainer.world_size if rank == 0 else None
        dist.gather_object(data, gathered, dst=0)
        data.clear()
        return _merge_ranks(gathered) if gathered is not None else None

    def _compute(self, stage: str, data: dict[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        """The stage's metrics, and for the test stage its intervals and per-image scores."""
        if data is None or data["scores"] is None:  # nothing was evaluated
            keys = [*IMAGE_METRICS, *(PIXEL_METRICS if stage in self.pixel_stages else ())]
            return dict.fromkeys(keys, math.nan), {}
        threshold = self.val_segmentation_threshold if stage == "test" else math.nan
        metrics = compute_anomaly_metrics(
            data["scores"], data["labels"], data["maps"], data["masks"],
            fpr_limit=self.fpr_limit, with_thresholds=True, segmentation_threshold=threshold,
        )
        if stage == "test":
            metrics.update(self._saturated_pro(data, list(range(len(data["paths"])))))
        if stage == "val" and data["maps"] is not None:
            metrics["segmentation_threshold"] = segmentation_threshold(data["maps"][data["labels"] == 0])
        extras: dict[str, Any] = {}
        if stage == "test":
            extras["by_category"], extras["by_defect_type"] = self._grouped_metrics(data)
            extras["images"] = {
                "path": list(data["paths"]),
                "category": list(data["categories"]),
                "defect_type": list(data["defect_types"]),
                "label": data["labels"].tolist(),
                "score": data["scores"].tolist(),
            }
            if self.bootstrap["n_resamples"]:
                extras["intervals"] = bootstrap_intervals(
                    data["scores"], data["labels"], data["maps"], data["masks"],
                    n_resamples=self.bootstrap["n_resamples"], seed=self.bootstrap["seed"],
                    confidence_level=self.bootstrap["confidence_level"], fpr_limit=self.fpr_limit,
                    segmentation_threshold=threshold,
                )
                regions = self._saturation_areas(data, list(range(len(data["paths"]))))
                if regions is not None:
                    spro = bootstrap_saturated_pro(
                        data["maps"], data["labels"], regions, n_resamples=self.bootstrap["n_resamples"],
                        seed=self.bootstrap["seed"], confidence_level=self.bootstrap["confidence_level"],
                    )
                    extras["intervals"].update(zip(SPRO_METRICS, spro, strict=True))
        return metrics, extras

    def _subset_metrics(self, data: dict[str, Any], keep: list[int]) -> dict[str, float]:
        index = torch.tensor(keep, dtype=torch.long)
        pick = {k: None if data[k] is None else data[k][index] for k in ("scores", "labels", "maps", "masks")}
        return {**compute_anomaly_metrics(pick["scores"], pick["labels"], pick["maps"], pick["masks"],
                                          fpr_limit=self.fpr_limit, segmentation_threshold=self.val_segmentation_threshold),
                **self._saturated_pro(data, keep)}

    def _saturation_areas(self, data: dict[str, Any], keep: list[int]) -> dict[int, list[Any]] | None:
        """The defects and saturation areas of the images ``keep`` (row in ``keep`` -> defects), or
        ``None`` for a dataset without them (sPRO is MVTec LOCO AD's)."""
        if self._saturation_regions is None or data["maps"] is None:
            return None
        size = data["maps"].shape[-1]
        return {row: self._saturation_regions(data["paths"][i], size)
                for row, i in enumerate(keep) if data["labels"][i] == 1}  # fmt: skip

    def _saturated_pro(self, data: dict[str, Any], keep: list[int]) -> dict[str, float]:
        """MVTec LOCO AD's sPRO of the images ``keep`` (nothing for a dataset without saturation areas)."""
        regions = self._saturation_areas(data, keep)
        if regions is None:
            return {}
        values = saturated_pro(data["maps"][keep], data["labels"][keep], regions)
        return dict(zip(SPRO_METRICS, values, strict=True))

    def _grouped_metrics(self, data: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """Per category (when there are several: the unified setting) and, when the dataset asks,
        per category and defect type (that type's images against the category's good ones)."""
        categories, defects = data["categories"], data["defect_types"]
        names = sorted(set(categories))
        by_category = {}
        if len(names) > 1:
            by_category = {c: self._subset_metrics(data, [i for i, x in enumerate(categories) if x == c])
                           for c in names}
        by_defect = {}
        if self._per_defect_type:
            labels = data["labels"].tolist()
            for category in names:
                members = [i for i, x in enumerate(categories) if x == category]
                good = [i for i in members if labels[i] == 0]
                for defect in sorted({defects[i] for i in members if labels[i] == 1}):
                    chosen = sorted(good + [i for i in members if labels[i] == 1 and defects[i] == defect])
                    key = f"{category}/{defect}" if category else defect
                    by_defect[key] = self._subset_metrics(data, chosen)
        return by_category, by_defect

    def _evaluate(
        self, stage: str, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, float]:
        data: dict[str, Any] | None = self._collected[stage].concatenate()
        self._collected[stage] = _Collected()

        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if distributed:
            assert data is not None
            data = self._gather(data, trainer)
            # Rank 0 computes; an error there is broadcast too, or the others would hang.
            outcome: tuple[str, Any] = ("ok", None)
            if trainer.global_rank == 0:
                try:
                    outcome = ("ok", self._compute(stage, data))
                except Exception as error:  # re-raised on every rank below
                    outcome = ("error", f"{type(error).__name__}: {error}")
            data = None
            status, payload = trainer.strategy.broadcast(outcome, src=0)
            if status == "error":
                raise RuntimeError(f"{stage} metric computation failed on rank 0: {payload}")
            metrics, extras = payload
        else:
            metrics, extras = self._compute(stage, data)
            data = None  # free the collected maps before logging
        if stage == "test":
            self.test_intervals = extras.get("intervals", {})
            self.test_images = extras.get("images", {})
            self.test_metrics_by_category = extras.get("by_category", {})
            self.test_metrics_by_defect_type = extras.get("by_defect_type", {})

        thresholds = {k: metrics.pop(k, math.nan) for k in ("image_threshold", "pixel_threshold",
                                                             "segmentation_threshold")}  # fmt: skip
        if stage == "val":
            self.val_image_threshold = thresholds["image_threshold"]
            self.val_pixel_threshold = thresholds["pixel_threshold"]
            self.val_segmentation_threshold = thresholds["segmentation_threshold"]
            # One number to rank checkpoints by, from the validation split only.
            ranked = [metrics[k] for k in SELECTION_METRICS if not math.isnan(metrics.get(k, math.nan))]
            if not getattr(pl_module, "ready_for_selection", True):
                metrics["selection_score"] = NOT_READY_SCORE  # a staged method mid-way: never the best
            elif ranked:
                metrics["selection_score"] = sum(ranked) / len(ranked)
        for name, value in metrics.items():
            if not math.isnan(value):
                # Identical on every rank: "max" keeps the synced value exact (a mean could
                # round), and sync_dist silences Lightning's epoch-level DDP warning.
                pl_module.log(f"{stage}/{name}", value, sync_dist=True, reduce_fx="max")
        return metrics
