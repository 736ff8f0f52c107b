"""Losses and map smoothing shared by the methods (one implementation each).

The distillation methods' feature distances, loss and map fusion are beside the
student-teacher pair, in ``models/distillation.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.ops import sigmoid_focal_loss


def ssim_loss(prediction: Tensor, target: Tensor, kernel_size: int = 11) -> Tensor:
    """1 - SSIM (Gaussian window, sigma 1.5, images in [0, 1]), as in DRAEM's reconstruction loss."""
    ssim = structural_similarity_index_measure(
        prediction.float(), target.float(), data_range=1.0, kernel_size=kernel_size
    )
    return 1.0 - ssim


def reconstruction_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """DRAEM's reconstruction loss: L2 + SSIM."""
    return F.mse_loss(prediction.float(), target.float()) + ssim_loss(prediction, target)


def focal_loss(logits: Tensor, mask: Tensor, gamma: float = 2.0, alpha: float | None = None) -> Tensor:
    """Per-pixel focal loss on one-channel logits (mean over pixels).

    DRAEM writes its segmentation head as a 2-class softmax; a softmax over two
    logits is a sigmoid of their difference, so one logit per pixel is the same
    model with half the output channels. ``alpha=None``: no class weighting
    (DRAEM's); otherwise anomalous pixels weigh ``alpha`` and normal ones
    ``1 - alpha`` (the ``alpha_t`` of Lin et al.'s focal loss).
    """
    weight = -1 if alpha is None else alpha  # torchvision: a negative alpha disables the weighting
    return sigmoid_focal_loss(logits.float(), mask.float(), alpha=weight, gamma=gamma, reduction="mean")


def gaussian_blur(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """Gaussian smoothing of anomaly maps (B, C, H, W), in float32, kernel radius ``4 sigma``.

    PatchCore and RD4AD smooth their maps with sigma 4. The kernel is applied
    separably (two 1-D convolutions: ~16x fewer operations than one 33 x 33 kernel)
    with reflect padding (replicate when a map is smaller than the radius), so the
    border is not pulled towards zero. Autocast is disabled: a bf16 convolution
    would quantise the scores that the metrics rank.
    """
    if sigma <= 0:
        return maps.float()
    radius = int(4.0 * sigma + 0.5)
    with torch.autocast(device_type=maps.device.type, enabled=False):
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        b, c, h, w = maps.shape
        out = maps.float().reshape(b * c, 1, h, w)
        mode = "reflect" if radius < min(h, w) else "replicate"
        out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
        out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return out.reshape(b, c, h, w)
