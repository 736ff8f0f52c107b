"""TSDN: Two-stream Decoder Feature Normality Estimating Network.

Park, Lee, Cho, Kim, Lee. "Two-stream Decoder Feature Normality Estimating
Network for Industrial Anomaly Detection", ICASSP 2023 (arXiv 2302.09794).

READ THIS FIRST: only the abstract and the opening of the introduction of TSDN
could be read here, and no official code exists. The ideas below (a U-Net-like
autoencoder, a two-stream decoder trained on synthetic anomalies, a feature
normality estimator on the skips) are the paper's; EVERY architectural detail
that realises them (one shared encoder, what each stream sees, the FNE's head,
gate and target, the anomaly map) is this suite's reading, and TSDN's numbers
here are numbers of that reading, labelled so wherever they are shown. The
readings the abstract allows for the anomaly map are an argument
(``anomaly_map``: the reconstruction error only, the abnormal stream only, or
both) and ablated in ``configs/sweeps/ablations.yaml``.

What the paper states (abstract, introduction, Fig. 1) and this module implements:

* A U-Net-like autoencoder. The paper's diagnosis: an autoencoder "similar to
  U-net" whose skips "supplement the encoder features" generalises to abnormal
  test data too ("indiscriminate conveyance of features"), while a general
  autoencoder without skips is "weak in anomaly detection".
* A two-stream decoder "designed to learn both normal and abnormal features",
  trained on DRAEM-style synthetic anomalies so that the network is "explicitly
  optimized for distinguishable anomalies". Here both streams share one encoder:

  - the normal stream (a U-Net decoder) reconstructs the anomaly-free image
    ``clean_image`` from the input carrying the synthetic anomaly;
    loss ``L2 + (1 - SSIM)`` (``adbench.models.losses.reconstruction_loss``);
  - the abnormal stream (a second U-Net decoder) learns the abnormal features:
    it predicts the synthetic anomaly's ``mask`` (one logit per pixel); loss:
    focal loss, gamma 2 (``adbench.models.losses.focal_loss``).

* A feature normality estimator (FNE) "to eliminate abnormal features and
  prevent high-quality reconstruction of abnormal regions": at every skip level
  ``l`` a small conv head on the encoder feature ``f_l`` estimates a per-position
  normality ``g_l = sigmoid(n_l)`` in [0, 1], and the normal stream receives
  ``g_l * f_l`` instead of ``f_l``. The FNE is supervised by the anomaly mask
  brought to the level's resolution: focal loss on the abnormality logit ``-n_l``
  against ``maxpool(mask)_l`` (mean over levels). It is also trained end to end
  by the reconstruction loss, which itself rewards suppressing features whose
  reconstruction target (the clean image) they contradict.
* Total loss ``lambda_rec * L_rec + lambda_abn * L_abn + lambda_fne * L_fne``.
* Anomaly map (``anomaly_map``): ``"abnormal"``, the abnormal stream's per-pixel
  probability; ``"reconstruction"``, the normal stream's reconstruction error
  ``(1 - SSIM(x, x_hat)) / 2`` per pixel (11 x 11 Gaussian window, mean over
  channels); ``"fused"``, the mean of the two. Image score: the maximum of the
  map average-pooled with a ``pool_size`` window (DRAEM's score, which TSDN's
  DRAEM-style training inherits).

Choices the paper leaves open, or that could not be checked against its method
section (only the abstract and the opening of the introduction could be
retrieved here, so the layer-level details below are this implementation's
reading of them; each is a constructor argument):

* Encoder (``encoder``): ``"unet"``, the suite's U-Net encoder trained from
  scratch (stage widths ``widths_from_base(base_width, depth)``) - the default,
  as a "U-Net-like autoencoder" suggests. Any backbone name (e.g.
  ``"tf_efficientnet_lite0"``) builds :class:`adbench.models.unet.BackboneEncoder`: a
  trainable full-resolution stem plus the ImageNet backbone's stride 2..2^(d-1)
  features projected to the same widths, frozen unless ``encoder_frozen=False``.
  It is offered for short CPU budgets (the quick profile), where a from-scratch
  encoder does not learn useful features in minutes; it is not the paper's.
* What the abnormal stream sees (``abnormal_skips``): ``"full"`` (default), the
  ungated encoder skips - the abnormal stream must see the abnormal features the
  FNE withholds from the normal stream; ``"complement"``, exactly the withheld
  part ``(1 - g_l) * f_l``, so the FNE splits every skip feature between the
  two streams. Without the FNE both streams get the full skips.
* FNE head: conv3x3-BN-ReLU (half the channels, at least 8) then a 1x1 conv to
  one logit; its bias starts at ``fne_init_bias`` (2.0, a gate of 0.88) so that
  at initialisation features mostly pass, matching the prior that most
  positions are normal. Only skip features are gated; the bottleneck (the
  autoencoder path without skips) is not.
* FNE target: ``fne_target="max"`` max-pools the mask to each level (a cell
  with any anomalous pixel counts as abnormal, so suppression covers the whole
  anomaly); ``"area"`` uses the anomalous fraction of the cell as a soft target.
* Loss weights: all 1 (``lambda_*``); optimiser: Adam, lr 1e-4, lr x0.2 at 80 %
  and 90 % of the optimiser steps, 700 epochs, batch 8, 256 px - DRAEM's
  schedule, whose pseudo-anomalies TSDN trains on.
* ``anomaly_map="auto"`` (default) is ``"fused"`` with the two streams and
  ``"reconstruction"`` with one stream (``two_stream=False``): the map the
  paper's motivation implies (reconstruction error that the FNE makes large on
  anomalies, plus the stream optimised to find them), and the only map left
  when the abnormal stream is ablated.
* ``pool_size`` 21 at 256 px (DRAEM's); profiles at other resolutions scale it.

Ablation switches (also YAML keys): ``use_fne=False`` passes the encoder skips
to the normal stream unchanged (plain U-Net skips, no FNE loss);
``two_stream=False`` builds no abnormal stream (reconstruction only);
``anomaly_map="reconstruction"`` / ``"abnormal"``: the other readings of the map
(same networks and training; only the map differs, and with it the validation
signal that selects the checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from .base import AnomalyModule, AnomalyOutput
from .losses import focal_loss, reconstruction_loss
from .registry import register_model
from .scoring import pooled_max_score
from .unet import BackboneEncoder, Decoder, Encoder, conv_bn_relu, widths_from_base

ANOMALY_MAPS = ("auto", "abnormal", "reconstruction", "fused")


class FeatureNormalityEstimator(nn.Module):
    """Per-position normality logit of one encoder level: conv3x3-BN-ReLU, conv1x1 -> (B, 1, h, w)."""

    def __init__(self, channels: int, init_bias: float = 2.0) -> None:
        super().__init__()
        hidden = max(channels // 2, 8)
        self.body = conv_bn_relu(channels, hidden)
        self.logit = nn.Conv2d(hidden, 1, 1)
        nn.init.constant_(self.logit.bias, init_bias)

    def forward(self, feature: Tensor) -> Tensor:
        return self.logit(self.body(feature))


def reconstruction_error_map(images: Tensor, reconstruction: Tensor, kernel_size: int = 11) -> Tensor:
    """Per-pixel structural dissimilarity ``(1 - SSIM) / 2`` in [0, 1], mean over channels -> (B, 1, H, W).

    SSIM rather than the squared error because the squared error of a blurry
    reconstruction is dominated by edges of normal structure; computed in float32.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        _, ssim_map = structural_similarity_index_measure(
            reconstruction.float().clamp(0, 1), images.float(), data_range=1.0,
            kernel_size=kernel_size, reduction="none", return_full_image=True,
        )  # fmt: skip
    return ((1.0 - ssim_map.mean(dim=1, keepdim=True)) / 2.0).clamp(0.0, 1.0)


@register_model("tsdn")
class TSDN(AnomalyModule):
    needs_pseudo_anomalies = True
    #: methods.md states no MVTec numbers for TSDN ("no official numbers are at hand").
    paper_results: dict[str, float] = {}

    def __init__(
        self,
        base_width: int = 64,
        depth: int = 5,
        encoder: str = "unet",
        encoder_weights: str = "auto",
        encoder_weights_sha256: str | None = None,
        encoder_frozen: bool = True,
        use_fne: bool = True,
        two_stream: bool = True,
        abnormal_skips: str = "full",
        fne_target: str = "max",
        fne_init_bias: float = 2.0,
        anomaly_map: str = "auto",
        lambda_rec: float = 1.0,
        lambda_abn: float = 1.0,
        lambda_fne: float = 1.0,
        focal_gamma: float = 2.0,
        lr: float = 1e-4,
        lr_milestones: tuple[float, ...] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        pool_size: int = 21,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2 (one skip level), got {depth}")
        if abnormal_skips not in ("full", "complement"):
            raise ValueError(f"abnormal_skips must be 'full' or 'complement', got {abnormal_skips!r}")
        if fne_target not in ("max", "area"):
            raise ValueError(f"fne_target must be 'max' or 'area', got {fne_target!r}")
        if anomaly_map not in ANOMALY_MAPS:
            raise ValueError(f"anomaly_map must be one of {ANOMALY_MAPS}, got {anomaly_map!r}")
        if not two_stream and anomaly_map in ("abnormal", "fused"):
            raise ValueError(f"anomaly_map={anomaly_map!r} needs the abnormal stream (two_stream=True)")
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number (same-size pooling), got {pool_size}")
        self.save_hyperparameters()
        self.map_mode = ("fused" if two_stream else "reconstruction") if anomaly_map == "auto" else anomaly_map

        widths = widths_from_base(base_width, depth)
        if encoder == "unet":
            self.encoder: nn.Module = Encoder(3, widths)
        else:
            self.encoder = BackboneEncoder(widths, encoder, encoder_weights, frozen=encoder_frozen,
                                           weights_sha256=encoder_weights_sha256)
        # One estimator per skip level (all encoder stages but the bottleneck).
        self.fne = (
            nn.ModuleList(FeatureNormalityEstimator(w, fne_init_bias) for w in widths[:-1]) if use_fne else None
        )
        self.normal_decoder = Decoder(widths, skip=True)
        self.normal_head = nn.Conv2d(widths[0], 3, 3, padding=1)
        self.abnormal_decoder = Decoder(widths, skip=True) if two_stream else None
        self.abnormal_head = nn.Conv2d(widths[0], 1, 3, padding=1) if two_stream else None

    # ------------------------------------------------------------------ network

    def streams(self, images: Tensor) -> dict[str, Any]:
        """Run both streams: ``reconstruction`` (B, 3, H, W), ``abnormal_logits`` (B, 1, H, W) or None,
        ``normality_logits`` (one (B, 1, h_l, w_l) per skip level; empty without FNE),
        ``encoder`` features and the ``normal_skips`` / ``abnormal_skips`` the decoders received."""
        features = self.encoder(images)
        skips = features[:-1]
        normality_logits: list[Tensor] = []
        normal_skips = list(skips)
        abnormal_skips = list(skips)
        if self.fne is not None:
            normality_logits = [estimator(f) for estimator, f in zip(self.fne, skips, strict=True)]
            gates = [torch.sigmoid(n) for n in normality_logits]
            normal_skips = [g * f for g, f in zip(gates, skips, strict=True)]
            if self.hparams.abnormal_skips == "complement":
                abnormal_skips = [(1.0 - g) * f for g, f in zip(gates, skips, strict=True)]
        # The decoders take skips for levels 0..d-2 and start from the bottleneck features[-1].
        reconstruction = self.normal_head(self.normal_decoder(features, [*normal_skips, features[-1]])[-1])
        abnormal_logits = None
        if self.abnormal_decoder is not None:
            decoded = self.abnormal_decoder(features, [*abnormal_skips, features[-1]])
            abnormal_logits = self.abnormal_head(decoded[-1])
        return {
            "reconstruction": reconstruction,
            "abnormal_logits": abnormal_logits,
            "normality_logits": normality_logits,
            "encoder": features,
            "normal_skips": normal_skips,
            "abnormal_skips": abnormal_skips,
        }

    def anomaly_maps(self, images: Tensor, out: dict[str, Any]) -> dict[str, Tensor]:
        """Every map this model can produce, (B, 1, H, W) in [0, 1], float32."""
        maps = {"reconstruction": reconstruction_error_map(images, out["reconstruction"])}
        if out["abnormal_logits"] is not None:
            maps["abnormal"] = torch.sigmoid(out["abnormal_logits"].float())
            maps["fused"] = 0.5 * (maps["abnormal"] + maps["reconstruction"])
        return maps

    def forward(self, images: Tensor) -> AnomalyOutput:
        anomaly_map = self.anomaly_maps(images, self.streams(images))[self.map_mode]
        return AnomalyOutput(anomaly_map, pooled_max_score(anomaly_map, self.hparams.pool_size))

    # ------------------------------------------------------------------ training

    def fne_targets(self, mask: Tensor, sizes: list[torch.Size]) -> list[Tensor]:
        """The mask at each level's resolution: max-pooled (any anomalous pixel) or area fraction."""
        if self.hparams.fne_target == "max":
            return [F.adaptive_max_pool2d(mask.float(), tuple(s)) for s in sizes]
        return [F.adaptive_avg_pool2d(mask.float(), tuple(s)) for s in sizes]

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        hp = self.hparams
        out = self.streams(batch["image"])
        losses = {"reconstruction": reconstruction_loss(out["reconstruction"], batch["clean_image"])}
        total = hp.lambda_rec * losses["reconstruction"]
        if out["abnormal_logits"] is not None:
            losses["abnormal"] = focal_loss(out["abnormal_logits"], batch["mask"], gamma=hp.focal_gamma)
            total = total + hp.lambda_abn * losses["abnormal"]
        if out["normality_logits"]:
            targets = self.fne_targets(batch["mask"], [n.shape[-2:] for n in out["normality_logits"]])
            # The abnormality logit is the negated normality logit.
            per_level = [
                focal_loss(-n, t, gamma=hp.focal_gamma)
                for n, t in zip(out["normality_logits"], targets, strict=True)
            ]
            losses["fne"] = torch.stack(per_level).mean()
            total = total + hp.lambda_fne * losses["fne"]
        losses["loss"] = total
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        batch_size = len(batch["image"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        for name in ("reconstruction", "abnormal", "fne"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=batch_size)
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # A frozen pretrained encoder contributes no trainable parameters.
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=hp.lr)
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf") or not hp.lr_milestones:
            return {"optimizer": optimizer}  # time-bounded run: no known end, constant lr
        milestones = sorted({max(1, int(round(total * fraction))) for fraction in hp.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
