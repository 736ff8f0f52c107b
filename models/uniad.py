"""UniAD: one feature-reconstruction transformer for every category, on a frozen CNN.

You, Cui, Shen, Yang, Lu, Zheng, Le. "A Unified Model for Multi-class Anomaly Detection",
NeurIPS 2022, arXiv 2206.03687 (reference code: github.com/zhiyuanyou/UniAD).

The feature maps of several stages of a frozen ImageNet CNN (paper: EfficientNet-b4 stages
1-4, 272 channels) are resized to one grid (14 x 14 at 224 px) and concatenated; each grid
cell is a token. A linear projection (the paper's 1x1 convolution) takes the tokens to the
hidden size (256); a transformer encoder and a *layer-wise query decoder* (each decoder
layer starts from its own learned query embedding, attends to the encoder output, then to
the previous decoder layer's output) reconstruct them, and a linear projection takes them
back. Two devices keep the network from copying its input (the "identical shortcut"):
*neighbour-masked attention* (no token attends to the k x k neighbourhood around itself, in
the encoder and in both decoder attentions) and *feature jittering* (in training, Gaussian
noise of standard deviation ``alpha * ||token|| / C`` on the input tokens; the target stays
clean). Loss: MSE between reconstructed and input features. Map: the L2 distance between
them per grid cell, upsampled (bilinear) to the image; image score: the maximum of the map
average-pooled over one grid cell. One model serves one category or all of them (the
suite's ``setting: unified``, the paper's).

Readings, open choices and ablations: docs/methods/uniad.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .losses import gaussian_blur
from .registry import register_model
from .schedules import draem_schedule
from .scoring import pooled_max_score


def neighbourhood_mask(height: int, width: int, size: int) -> Tensor:
    """(h*w, h*w) boolean attention mask: True where query token i may *not* attend to key token j.

    Token j is blocked for token i when it lies in the ``size`` x ``size`` window centred on i
    (i itself included; the window is cut at the grid's border), as the reference's
    ``generate_mask``. PyTorch's boolean ``attn_mask`` convention: True = not allowed.
    """
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    half = size // 2
    near_rows = (rows[:, None] - rows[None, :]).abs() <= half
    near_cols = (cols[:, None] - cols[None, :]).abs() <= half
    return near_rows & near_cols


class LearnedPositions(nn.Module):
    """DETR's learned 2-D position embedding: a column half and a row half, (h*w, dim)."""

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.rand(height, dim // 2))
        self.cols = nn.Parameter(torch.rand(width, dim - dim // 2))

    def forward(self) -> Tensor:
        h, w = self.rows.shape[0], self.cols.shape[0]
        return torch.cat([self.cols[None].expand(h, -1, -1), self.rows[:, None].expand(-1, w, -1)], dim=-1).flatten(0, 1)


class Attention(nn.Module):
    """Post-norm residual attention, DETR style: positions are added to queries and keys, not values."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, source: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        out = self.attention(query + positions, source + positions, source, attn_mask=mask, need_weights=False)[0]
        return self.norm(query + self.dropout(out))


class FeedForward(nn.Module):
    """Post-norm residual two-layer MLP (ReLU)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.mlp(x)))


class EncoderLayer(nn.Module):
    """Masked self-attention, then the MLP."""

    def __init__(self, dim: int, heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.attention = Attention(dim, heads, dropout)
        self.feedforward = FeedForward(dim, feedforward, dropout)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        return self.feedforward(self.attention(x, x, positions, mask))


class QueryDecoderLayer(nn.Module):
    """One layer of the layer-wise query decoder.

    Its own learned query (one vector per token) attends to the encoder output, the result
    attends to the previous decoder layer's output (the encoder output for the first
    layer), then the MLP; both attentions neighbour-masked.
    """

    def __init__(self, tokens: int, dim: int, heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(tokens, dim))
        self.to_encoder = Attention(dim, heads, dropout)
        self.to_previous = Attention(dim, heads, dropout)
        self.feedforward = FeedForward(dim, feedforward, dropout)

    def forward(self, previous: Tensor, encoded: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        query = self.query[None].expand(encoded.shape[0], -1, -1)
        x = self.to_encoder(query, encoded, positions, mask)
        x = self.to_previous(x, previous, positions, mask)
        return self.feedforward(x)


@register_model("uniad")
class UniAD(AnomalyModule):
    # The paper's unified model (one for all 15 categories of MVTec AD): mean image and pixel AUROC as its
    # abstract states them (96.5 and 96.8).
    paper_results = {"image_auroc": 0.965, "pixel_auroc": 0.968}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: Sequence[int] = (0, 1, 2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        grid_size: int = 14,
        hidden_dim: int = 256,
        heads: int = 8,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        neighbour_mask: bool = True,
        neighbour_size: int = 7,
        feature_jitter: bool = True,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        sigma: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_milestones: Sequence[float] = (0.8,),
        lr_gamma: float = 0.1,
        clip_grad_norm: float | None = 0.1,
    ) -> None:
        super().__init__()
        if decoder_layers < 1 or encoder_layers < 0 or grid_size < 1:
            raise ValueError(f"need decoder_layers >= 1, encoder_layers >= 0 and grid_size >= 1, got "
                             f"{decoder_layers}, {encoder_layers}, {grid_size}")  # fmt: skip
        self.save_hyperparameters()
        self.backbone = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        channels = sum(self.backbone.channels)
        tokens = grid_size * grid_size
        self.input_projection = nn.Linear(channels, hidden_dim)
        self.positions = LearnedPositions(grid_size, grid_size, hidden_dim)
        self.encoder = nn.ModuleList(
            EncoderLayer(hidden_dim, heads, feedforward_dim, dropout) for _ in range(encoder_layers)
        )
        self.decoder = nn.ModuleList(
            QueryDecoderLayer(tokens, hidden_dim, heads, feedforward_dim, dropout) for _ in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.output_projection = nn.Linear(hidden_dim, channels)
        # The reference initialises every linear layer Xavier-uniform with zero bias.
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Ablation `neighbour_mask=False`: plain (unmasked) attention everywhere.
        mask = neighbourhood_mask(grid_size, grid_size, neighbour_size) if neighbour_mask else None
        if mask is not None and mask.all(dim=1).any():
            raise ValueError(f"a {neighbour_size} x {neighbour_size} neighbourhood masks every token of a "
                             f"{grid_size} x {grid_size} grid for some query: use a smaller neighbour_size")
        self.register_buffer("attention_mask", mask, persistent=False)

    # ------------------------------------------------------------------ features and reconstruction

    def extract(self, images: Tensor) -> Tensor:
        """The stages' maps resized (bilinear, corners aligned, as the reference) to the grid and
        concatenated: (B, C, g, g) float32."""
        with torch.no_grad():
            maps = self.backbone(images)
        size = (self.hparams.grid_size, self.hparams.grid_size)
        with torch.autocast(device_type=images.device.type, enabled=False):
            resized = [m.float() if m.shape[-2:] == size else
                       F.interpolate(m.float(), size=size, mode="bilinear", align_corners=True) for m in maps]
        return torch.cat(resized, dim=1)

    def jitter(self, tokens: Tensor) -> Tensor:
        """Feature jittering (training only): ``tokens + eps``, ``eps ~ N(0, (alpha ||token|| / C)^2)`` per
        token of C channels, applied to the whole batch with probability ``jitter_prob``."""
        if not (self.training and self.hparams.feature_jitter):
            return tokens
        if float(torch.rand(())) >= self.hparams.jitter_prob:
            return tokens
        scale = self.hparams.jitter_scale * tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
        return tokens + torch.randn_like(tokens) * scale

    def reconstruct(self, features: Tensor) -> Tensor:
        """Features (B, C, g, g) -> their reconstruction, same shape (jittered input in training)."""
        b, c, h, w = features.shape
        tokens = self.jitter(features.flatten(2).transpose(1, 2))  # (B, g*g, C)
        x = self.input_projection(tokens)
        positions = self.positions()[None]
        mask = self.attention_mask
        for layer in self.encoder:
            x = layer(x, positions, mask)
        encoded = out = x
        for layer in self.decoder:
            out = layer(out, encoded, positions, mask)
        out = self.output_projection(self.decoder_norm(out))
        return out.transpose(1, 2).reshape(b, c, h, w)

    # ------------------------------------------------------------------ scoring

    def forward(self, images: Tensor) -> AnomalyOutput:
        features = self.extract(images)
        reconstruction = self.reconstruct(features)
        with torch.autocast(device_type=images.device.type, enabled=False):
            distance = (reconstruction.float() - features).pow(2).sum(dim=1, keepdim=True).sqrt()
            anomaly_map = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=True)
            anomaly_map = gaussian_blur(anomaly_map, self.hparams.sigma)
        # The reference pools 16 x 16 pixels at 224 px: one grid cell. (A constant in an exported graph,
        # which always sees the training size.)
        pool_size = max(1, round(int(images.shape[-2]) / self.hparams.grid_size))
        return AnomalyOutput(anomaly_map, pooled_max_score(anomaly_map, pool_size))

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        features = self.extract(batch["image"])
        loss = F.mse_loss(self.reconstruct(features).float(), features)  # the target is the clean features
        self.log("train/loss", loss, prog_bar=True, batch_size=len(features))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # The reference's StepLR (x0.1 after 800 of 1000 epochs): a milestone at 80 % of the steps.
        return draem_schedule(optimizer, self.trainer.estimated_stepping_batches, self.hparams.lr_milestones,
                              self.hparams.lr_gamma)  # fmt: skip

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:  # fmt: skip
        # The reference clips the gradient norm at 0.1; a Trainer's gradient_clip_val takes precedence.
        value = gradient_clip_val if gradient_clip_val is not None else self.hparams.clip_grad_norm
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm)
