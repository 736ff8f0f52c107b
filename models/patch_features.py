"""Locally aware patch features of a frozen CNN (PatchCore's embedding, also GLASS's and SimpleNet's).

Each mid-level feature map is averaged over a ``3 x 3`` neighbourhood (a patch sees its
neighbours), brought to the first level's grid, reduced to ``pretrain_dim`` channels by
adaptive average pooling, concatenated, and pooled again to ``target_dim`` channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_channels(vectors: Tensor, dim: int) -> Tensor:
    """Adaptive average pooling of the last axis of (B, P, C) to ``dim`` (identity if C == dim)."""
    if vectors.shape[-1] == dim:
        return vectors
    b, p, c = vectors.shape
    return F.adaptive_avg_pool1d(vectors.reshape(b * p, 1, c), dim).view(b, p, dim)


def locally_aware_patches(
    maps: Sequence[Tensor], pretrain_dim: int, target_dim: int, neighbourhood: int = 3
) -> tuple[Tensor, tuple[int, int]]:
    """(B, h * w, target_dim) patch features at the first map's grid (h, w), in float32.

    Autocast is off: the features are pooled and compared in float32 whatever the
    training precision (a bf16 average of 3 x 3 neighbours loses the differences a
    nearest-neighbour search or a discriminator ranks).
    """
    with torch.autocast(device_type=maps[0].device.type, enabled=False):
        size = maps[0].shape[-2:]
        per_layer = []
        for feature_map in maps:
            pooled = F.avg_pool2d(feature_map.float(), neighbourhood, stride=1, padding=neighbourhood // 2,
                                  count_include_pad=False)
            if pooled.shape[-2:] != size:
                pooled = F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
            per_layer.append(pool_channels(pooled.flatten(2).transpose(1, 2), pretrain_dim))  # (B, h*w, C)
        features = pool_channels(torch.cat(per_layer, dim=-1), target_dim)
    return features, (int(size[0]), int(size[1]))
