"""Shared U-Net blocks: BatchNorm folded at inference, and skip concatenations never built,
both equal to the layers as written (conv of the concatenation -> BatchNorm -> ReLU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adbench.models.unet import ConvBNReLU, UNet


def _as_written(layer: ConvBNReLU, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """conv -> BatchNorm -> ReLU on the concatenated input, by ``nn.Sequential``'s plain forward."""
    return nn.Sequential.forward(layer, x if isinstance(x, torch.Tensor) else torch.cat(x, dim=1))


def _with_running_statistics(module: nn.Module, in_channels: int) -> nn.Module:
    """Train on a few random batches so BatchNorm's running statistics are far from (0, 1)."""
    module.train()
    with torch.no_grad():
        for _ in range(5):
            module(3.0 * torch.rand(4, in_channels, 32, 32) + 1.0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 2.0)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return module.eval()


def test_eval_mode_folds_batchnorm_without_changing_the_result() -> None:
    torch.manual_seed(0)
    layer = _with_running_statistics(ConvBNReLU(5, 7), 5)
    weight = layer[0].weight.detach().clone()
    x = 3.0 * torch.rand(2, 5, 16, 16) + 1.0
    with torch.no_grad():
        folded = layer(x)
        unfolded = _as_written(layer, x)
    assert (unfolded > 0).float().mean() > 0.2  # not all clipped: the comparison means something
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)
    # Folding happens per call, on copies: the layer's own weights stay untouched.
    torch.testing.assert_close(layer[0].weight.detach(), weight, rtol=0, atol=0)
    assert set(layer.state_dict()) == {
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"
    }


def test_training_mode_uses_batch_statistics_and_trains() -> None:
    torch.manual_seed(0)
    layer = ConvBNReLU(3, 4, kernel_size=1).train()
    x = torch.rand(4, 3, 8, 8)
    out = layer(x)
    out.sum().backward()
    assert layer[0].weight.grad is not None and layer[1].weight.grad is not None
    # Batch statistics: each channel of the BatchNorm output has zero mean before the ReLU.
    pre = layer[1](layer[0](x))
    torch.testing.assert_close(pre.mean(dim=(0, 2, 3)), layer[1].bias.detach().expand(4), atol=1e-5, rtol=0)


def test_skip_concatenation_is_convolved_part_by_part_with_the_same_result_and_gradients() -> None:
    torch.manual_seed(0)
    layer = ConvBNReLU(5, 6).train()
    a = torch.rand(2, 3, 16, 16, requires_grad=True)
    b = torch.rand(2, 2, 16, 16, requires_grad=True)
    parts = layer([a, b])
    parts.square().sum().backward()
    grads = [t.grad.clone() for t in (a, b, layer[0].weight)]
    for t in (a, b, layer[0].weight):
        t.grad = None
    whole = _as_written(layer, [a, b])
    whole.square().sum().backward()
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, (a.grad, b.grad, layer[0].weight.grad), strict=True):
        # float32 sums in another order: agreement relative to the gradient's scale
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    with torch.no_grad():  # eval: folded and part by part at once
        torch.testing.assert_close(layer.eval()([a, b]), _as_written(layer, [a, b]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="4 channels, the convolution expects 5"):
        layer([a, b[:, :1]])


def test_unet_prediction_is_the_same_folded_or_not_and_in_either_memory_format() -> None:
    torch.manual_seed(0)
    net = _with_running_statistics(UNet(3, 1, [4, 8, 8], skip=True, layout="draem"), 3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        folded = net(x)
        original = ConvBNReLU.forward
        ConvBNReLU.forward = _as_written  # type: ignore[method-assign]
        try:
            unfolded = net(x)
        finally:
            ConvBNReLU.forward = original  # type: ignore[method-assign]
        channels_last = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(channels_last, folded, rtol=1e-4, atol=1e-5)
