"""STPM: Student-Teacher Feature Pyramid Matching.

Wang, Wu, Cui, Gou. "Student-Teacher Feature Pyramid Matching for Anomaly
Detection", BMVC 2021 (arXiv 2103.04257).

An ImageNet-pretrained teacher and a student of the same architecture trained
from scratch to reproduce the teacher's feature pyramid on normal images. On an
anomaly the student, never having seen one, disagrees with the teacher; the
disagreement is the anomaly map. The pair, its loss (sum over levels of the mean
``0.5 * || t/|t| - s/|s| ||^2``) and its map (the per-level discrepancies
upsampled and multiplied) are in ``models/distillation.py``; the image score is
the map's maximum.

Readings, open choices and ablations: docs/methods/stpm.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import AnomalyModule, AnomalyOutput
from .distillation import StudentTeacherPair, check_student_optimizer, student_optimizer
from .registry import register_model
from .scoring import max_score


@register_model("stpm")
class STPM(AnomalyModule):
    paper_results = {"image_auroc": 0.955, "pixel_auroc": 0.970}

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        map_fusion: str = "product",
    ) -> None:
        super().__init__()
        check_student_optimizer(optimizer)
        if map_fusion not in ("product", "sum"):
            raise ValueError(f"map_fusion must be 'product' or 'sum', got {map_fusion!r}")
        self.save_hyperparameters()
        self.pair = StudentTeacherPair(backbone, layers, weights, weights_sha256=weights_sha256)

    def forward(self, images: Tensor) -> AnomalyOutput:
        anomaly_map = self.pair.anomaly_map(images, self.hparams.map_fusion)
        return AnomalyOutput(anomaly_map, max_score(anomaly_map))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.pair.loss(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return student_optimizer(self.pair.student.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
