"""STPM's student-teacher pair and the rules of the distillation methods (STPM, RSTPM, RD4AD).

A frozen ImageNet teacher and a randomly initialised student of the same
architecture; on normal images the student learns to reproduce the teacher's
feature pyramid, so where the two disagree the input is anomalous (Wang et al.,
BMVC 2021). The pair owns the three things every such method computes the same
way: the features, the distillation loss and the per-level discrepancy maps.
Beside it: STPM's feature distance and loss, reverse distillation's cosine
distance, the fusion of per-level maps into one map, and the students' optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FeatureExtractor


def normalized_l2_distance(teacher: Tensor, student: Tensor) -> Tensor:
    """STPM's per-position discrepancy: 0.5 * ||t/|t| - s/|s| ||^2 over channels -> (B, 1, h, w)."""
    t = F.normalize(teacher.float(), dim=1)
    s = F.normalize(student.float(), dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1, keepdim=True)


def cosine_distance(teacher: Tensor, student: Tensor) -> Tensor:
    """1 - cosine similarity over channels -> (B, 1, h, w) (reverse distillation's discrepancy)."""
    return 1.0 - F.cosine_similarity(teacher.float(), student.float(), dim=1).unsqueeze(1)


def feature_matching_loss(teachers: Sequence[Tensor], students: Sequence[Tensor]) -> Tensor:
    """Sum over pyramid levels of the mean normalised L2 discrepancy (the STPM loss)."""
    return sum(normalized_l2_distance(t, s).mean() for t, s in zip(teachers, students, strict=True))


def fuse_maps(maps: Sequence[Tensor], size: tuple[int, int], mode: str = "product") -> Tensor:
    """Upsample per-level maps (B, 1, h, w) to ``size`` and fuse them by product, sum or mean."""
    upsampled = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps]
    stacked = torch.stack(upsampled)
    if mode == "product":
        return stacked.prod(dim=0)
    if mode == "sum":
        return stacked.sum(dim=0)
    if mode == "mean":
        return stacked.mean(dim=0)
    raise ValueError(f"unknown fusion mode {mode!r}; use 'product', 'sum' or 'mean'")


class StudentTeacherPair(nn.Module):
    """Teacher (pretrained, frozen) and student (same architecture, from scratch) at ``layers``.

    Args:
        backbone: the architecture of both networks (see :class:`FeatureExtractor`).
        layers: the distilled pyramid levels (timm ``out_indices``).
        weights: the teacher's weights (``"auto"``, a file, or ``"random"``).
        extra_teacher_layers: deeper teacher levels computed in the same forward pass
            and returned beside the distilled ones, but not distilled (RSTPM feeds the
            teacher's deepest feature to its second student). The student is built
            for ``layers`` only.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        extra_teacher_layers: Sequence[int] = (),
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        self.extra_layers = tuple(int(i) for i in extra_teacher_layers)
        if self.extra_layers and min(self.extra_layers) <= max(self.layers):
            raise ValueError(
                f"extra_teacher_layers {self.extra_layers} must be deeper than the distilled layers {self.layers}"
            )
        self.teacher = FeatureExtractor(backbone, self.layers + self.extra_layers, weights, weights_sha256,
                                        frozen=True)
        self.student = FeatureExtractor.random_like(self.teacher, layers=self.layers)

    def teacher_features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The teacher's distilled levels and its extra levels, without gradient."""
        with torch.no_grad():
            features = self.teacher(images)
        return features[: len(self.layers)], features[len(self.layers):]

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher and student features of the distilled levels."""
        teacher, _ = self.teacher_features(images)
        return teacher, self.student(images)

    def loss(self, images: Tensor) -> Tensor:
        """STPM's loss on ``images``: sum over levels of the mean normalised L2 discrepancy."""
        return feature_matching_loss(*self(images))

    @staticmethod
    def level_maps(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
        """Per-level discrepancy maps ``0.5 * || t/|t| - s/|s| ||^2``, each (B, 1, h_l, w_l)."""
        return [normalized_l2_distance(t, s) for t, s in zip(teacher, student, strict=True)]

    def anomaly_map(self, images: Tensor, fusion: str = "product") -> Tensor:
        """STPM's anomaly map: the level maps upsampled to the input size and fused (product or sum)."""
        return fuse_maps(self.level_maps(*self(images)), images.shape[-2:], fusion)


STUDENT_OPTIMIZERS = ("sgd", "adam")


def check_student_optimizer(kind: str) -> None:
    if kind not in STUDENT_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {STUDENT_OPTIMIZERS}, got {kind!r}")


def student_optimizer(
    params: Iterable[nn.Parameter], kind: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """STPM's optimiser for a student: SGD (the paper's: lr 0.4, momentum 0.9, weight decay 1e-4) or Adam.

    Adam is offered because the paper's lr 0.4 is tuned for ResNet's plain
    convolutions and diverges for depthwise-separable students (EfficientNet-Lite).
    """
    check_student_optimizer(kind)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
