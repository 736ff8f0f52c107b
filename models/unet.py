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


class ConvBNReLU(nn.Sequential):
    """Convolution (no bias) -> BatchNorm -> ReLU; BatchNorm folded into the convolution in eval mode.

    In eval mode BatchNorm is a per-channel affine map, so it can be applied to
    the convolution's weights (``out_channels`` scalars each) instead of to its
    output, the largest tensor of the layer: inference then makes one pass over
    that output instead of two (DRAEM's test loop: about a quarter less time on
    the CPU). The folded weights are computed per call from the live BatchNorm
    statistics, so nothing goes stale when training resumes; the result equals
    the unfolded layer up to float rounding. Submodules keep ``nn.Sequential``'s
    indices (``0`` conv, ``1`` BatchNorm, ``2`` ReLU), so state dicts are unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """``x``: one tensor, or several whose channel concatenation is the input (U-Net skips)."""
        conv, norm, relu = self
        parts = [x] if isinstance(x, Tensor) else list(x)
        if self.training or norm.running_var is None:
            return relu(norm(self._convolve(parts, conv.weight, conv.bias)))
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        bias = norm.bias - norm.running_mean * scale
        return torch.relu_(self._convolve(parts, weight, bias))

    def _convolve(self, parts: list[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution of the channel concatenation of ``parts``, without building it.

        A convolution is linear in its input channels, so it is the sum of each
        part's convolution with its slice of the weights. Concatenating first would
        allocate (and keep for the backward pass) a copy of every skip connection
        at full resolution: the largest tensors of a U-Net's decoder.
        """
        conv = self[0]
        if len(parts) == 1:
            return conv._conv_forward(parts[0], weight, bias)
        start, out = 0, None
        for part in parts:
            stop = start + part.shape[1]
            y = conv._conv_forward(part, weight[:, start:stop], bias if out is None else None)
            out = y if out is None else out.add_(y)
            start = stop
        if start != weight.shape[1]:
            raise ValueError(f"inputs have {start} channels, the convolution expects {weight.shape[1]}")
        return out


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> ConvBNReLU:
    return ConvBNReLU(in_channels, out_channels, kernel_size)


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
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.widths = list(widths)
        self.stem = double_conv(3, widths[0])
        self.backbone = FeatureExtractor(backbone, tuple(range(len(widths) - 1)), weights, weights_sha256,
                                         frozen=frozen)
        expected = [2 ** (i + 1) for i in range(len(widths) - 1)]
        if self.backbone.reductions != expected:
            raise ValueError(
                f"backbone {backbone!r} has strides {self.backbone.reductions} at layers "
                f"0..{len(widths) - 2}; a U-Net encoder of depth {len(widths)} needs {expected}"
            )
        self.projections = nn.ModuleList(
            conv_bn_relu(c, w, kernel_size=1)
            for c, w in zip(self.backbone.channels, widths[1:], strict=True)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        deep = self.backbone(x)
        return [self.stem(x), *(project(f) for project, f in zip(self.projections, deep, strict=True))]


class Decoder(nn.Module):
    """The encoder's mirror: upsample x2, conv-BN-ReLU, [concat the encoder stage], two convs.

    Returns the decoder's features from coarse to fine; the last has ``widths[0]``
    channels at full resolution.

    ``layout`` sets the width of each level:

    * ``"symmetric"``: decoder level ``i`` has the shape of encoder stage ``i``
      (what POUTA and TSDN compare stage by stage).
    * ``"draem"``: DRAEM's reference layout, one stage narrower: level ``i``
      outputs ``widths[max(i - 1, 0)]`` channels. With skip connections (the
      discriminative sub-network) the upsampling conv makes that reduction and the
      block sees ``[upsampled, encoder stage i]``; without (the reconstructive
      sub-network) the upsampling conv keeps its width and the block's second conv
      reduces. About 30 % fewer FLOPs than ``"symmetric"`` at DRAEM's widths.
    """

    def __init__(self, widths: Sequence[int], skip: bool = True, layout: str = "symmetric") -> None:
        super().__init__()
        if layout not in ("symmetric", "draem"):
            raise ValueError(f"decoder layout must be 'symmetric' or 'draem', got {layout!r}")
        self.skip = skip
        levels = range(len(widths) - 2, -1, -1)
        #: output width per level, coarse to fine
        self.widths = [widths[i] if layout == "symmetric" else widths[max(i - 1, 0)] for i in levels]
        inputs = [widths[-1], *self.widths[:-1]]
        # Width after the upsampling conv, which is also the block's inner width.
        upsampled = inputs if (layout == "draem" and not skip) else self.widths
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                conv_bn_relu(c_in, c_up),
            )
            for c_in, c_up in zip(inputs, upsampled, strict=True)
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(c_up + (widths[i] if skip else 0), c_up), conv_bn_relu(c_up, c_out))
            for i, c_up, c_out in zip(levels, upsampled, self.widths, strict=True)
        )

    def forward(self, encoder_features: Sequence[Tensor], skips: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Decode from the deepest encoder feature; ``skips`` replaces the encoder's skip features."""
        skips = encoder_features if skips is None else skips
        x = encoder_features[-1]
        outputs = []
        for offset, (up, block) in enumerate(zip(self.up, self.blocks, strict=True)):
            x = up(x)
            first, second = block
            x = second(first([x, skips[len(skips) - 2 - offset]] if self.skip else x))
            outputs.append(x)
        return outputs


class UNet(nn.Module):
    """Encoder + decoder + 3x3 output convolution (no output activation); see :class:`Decoder`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        skip: bool = True,
        layout: str = "symmetric",
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, widths)
        self.decoder = Decoder(widths, skip=skip, layout=layout)
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.decoder(self.encoder(x))[-1])

    def forward_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Encoder stages (fine to coarse), decoder stages (coarse to fine) and the output."""
        encoded = self.encoder(x)
        decoded = self.decoder(encoded)
        return encoded, decoded, self.head(decoded[-1])


def draem_init(module: nn.Module) -> None:
    """DRAEM's reference initialisation (``module.apply``): conv ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def widths_from_base(base: int, depth: int, max_multiplier: int = 8) -> list[int]:
    """DRAEM's width ladder: base, 2*base, 4*base, 8*base, 8*base, ..."""
    return [base * min(2**i, max_multiplier) for i in range(depth)]
