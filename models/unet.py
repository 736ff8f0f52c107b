"""U-Net building blocks shared by the reconstruction/discrimination methods.

One encoder and one decoder, parameterised by their stage widths, serve DRAEM's
reconstructive network (no skip connections) and discriminative network (skip
connections), and expose every stage's features so that POUTA and TSDN can tap
the encoder and the symmetric decoder stage by stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .backbones import FeatureExtractor


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


class Encoder(nn.Module):
    """Stages of two conv-BN-ReLU layers, a 2x2 max-pool before every stage but the first.

    Returns every stage's output, finest first: stage ``i`` is at 1/2^i resolution
    with ``widths[i]`` channels.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.stages = nn.ModuleList(double_conv(channels[i], channels[i + 1]) for i in range(len(widths)))
        self.pool = nn.MaxPool2d(2)
        self.widths = list(widths)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for index, stage in enumerate(self.stages):
            x = stage(self.pool(x) if index else x)
            features.append(x)
        return features


class BackboneEncoder(nn.Module):
    """The :class:`Encoder` interface over a pretrained CNN (an option for short training budgets).

    Stage 0 (full resolution, ``widths[0]`` channels) is a trainable two-conv block
    on the image, because ImageNet backbones start at stride 2; stage ``i >= 1`` is
    the backbone's stride-``2^i`` feature map projected to ``widths[i]`` channels
    by a trainable 1x1 conv-BN-ReLU. The output therefore has exactly the shapes of
    ``Encoder(3, widths)``, so :class:`Decoder` (and anything that taps encoder
    stages) works unchanged. The backbone is a :class:`FeatureExtractor` (it
    normalises its own input), frozen by default.
    """

    def __init__(
        self,
        widths: Sequence[int],
        backbone: str = "tf_efficientnet_lite0",
        weights: str = "auto",
        frozen: bool = True,
    ) -> None:
        super().__init__()
        self.widths = list(widths)
        self.stem = double_conv(3, widths[0])
        self.backbone = FeatureExtractor(backbone, tuple(range(len(widths) - 1)), weights, frozen=frozen)
        expected = [2 ** (i + 1) for i in range(len(widths) - 1)]
        if self.backbone.reductions != expected:
            raise ValueError(
                f"backbone {backbone!r} has strides {self.backbone.reductions} at layers "
                f"0..{len(widths) - 2}; a U-Net encoder of depth {len(widths)} needs {expected}"
            )
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            for c, w in zip(self.backbone.channels, widths[1:], strict=True)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        deep = self.backbone(x)
        return [self.stem(x), *(project(f) for project, f in zip(self.projections, deep, strict=True))]


class Decoder(nn.Module):
    """The encoder's mirror: upsample x2, conv-BN-ReLU, [concat the encoder stage], two convs.

    Returns the decoder's features from coarse to fine; the last has
    ``widths[0]`` channels at full resolution, and decoder level ``i`` has the
    shape of encoder stage ``i`` (what POUTA compares).
    """

    def __init__(self, widths: Sequence[int], skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        levels = range(len(widths) - 2, -1, -1)
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                conv_bn_relu(widths[i + 1], widths[i]),
            )
            for i in levels
        )
        self.blocks = nn.ModuleList(double_conv(widths[i] * (2 if skip else 1), widths[i]) for i in levels)

    def forward(self, encoder_features: Sequence[Tensor], skips: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Decode from the deepest encoder feature; ``skips`` replaces the encoder's skip features."""
        skips = encoder_features if skips is None else skips
        x = encoder_features[-1]
        outputs = []
        for offset, (up, block) in enumerate(zip(self.up, self.blocks, strict=True)):
            x = up(x)
            if self.skip:
                x = torch.cat([x, skips[len(skips) - 2 - offset]], dim=1)
            x = block(x)
            outputs.append(x)
        return outputs


class UNet(nn.Module):
    """Encoder + decoder + 3x3 output convolution (no output activation)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], skip: bool = True) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, widths)
        self.decoder = Decoder(widths, skip=skip)
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.decoder(self.encoder(x))[-1])

    def forward_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Encoder stages (fine to coarse), decoder stages (coarse to fine) and the output."""
        encoded = self.encoder(x)
        decoded = self.decoder(encoded)
        return encoded, decoded, self.head(decoded[-1])


def widths_from_base(base: int, depth: int, max_multiplier: int = 8) -> list[int]:
    """DRAEM's width ladder: base, 2*base, 4*base, 8*base, 8*base, ..."""
    return [base * min(2**i, max_multiplier) for i in range(depth)]
