"""EfficientAD: a patch description network (PDN) teacher, a student and an autoencoder.

Batzner, Heckler, König. "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024 (arXiv 2303.14535).

The teacher is a PDN: four (size S) or six (size M) convolutions with two average poolings and
no padding, so each of its 384 output channels describes one 33 x 33 patch. It is pretrained to
reproduce the features of an ImageNet CNN and then frozen; its outputs are normalised per channel
by their mean and standard deviation over the training images. A student PDN with twice the
output channels learns, on the normal images, to predict the teacher (first half) and an
autoencoder (second half). Its loss on the teacher is *hard*: only the squared differences above
their 0.999 quantile count; a *penalty* keeps its first half near zero on out-of-distribution
images (ImageNet in the paper), so it does not imitate the teacher beyond the normal images. The
autoencoder (strided convolutions to a 1 x 1 code, bilinear upsampling back) learns the teacher's
normalised features from colour-jittered images; its global view detects logical anomalies.
Local map: teacher vs student; global map: autoencoder vs student second half; each is mapped
linearly so that its 0.9 and 0.995 quantiles on normal validation images become 0 and 0.1; the
anomaly map is their mean, padded by 4 cells and resized (bilinear) to the input; its maximum
is the image score.

The paper's teacher is distilled from WideResNet-101 on ImageNet, neither of which is here: when
no teacher file is given, :func:`distill_teacher` distils the PDN from an offline backbone's
PatchCore-style features on texture images (DTD) once, and caches the result.

    python -m adbench.models.efficientad distill --textures DTD_ROOT --output teacher.pth

Readings, open choices and ablations: docs/methods/efficientad.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from adbench.datamodules.synthesis import FolderTextures, TextureSource, make_texture_source

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput, eval_mode
from .patch_features import locally_aware_patches
from .registry import register_model
from .schedules import draem_schedule
from .scoring import max_score
from .weights import (
    IMAGENET_NORMALISATION,
    WeightsIntegrityError,
    WeightsUnavailableError,
    exclusive_file_lock,
    sha256_file,
)

if __name__ == "__main__":
    # `python -m adbench.models.efficientad`: importing the package has registered this module already; run its
    # CLI rather than define (and register) the class a second time.
    from adbench.models.efficientad import main as _main

    _main()
    raise SystemExit(0)

SIZES = ("small", "medium")
#: Where distilled teachers are cached (``teacher_cache``'s default).
DEFAULT_CACHE = "~/.cache/adbench/efficientad"
#: Cells added on each side of the unpadded PDN's map, so that map cell i covers input pixels 4i..4i+3.
MAP_PADDING = 4
#: The autoencoder decoder's bilinear sizes at 256 px (they scale with the input).
DECODER_SIZES = (3, 8, 15, 32, 63, 127)


class PDN(nn.Sequential):
    """Patch description network, the reference implementation's layer order (so its teacher files load).

    ``width`` scales the hidden widths (S: 128/256/256, M: 256/512/512/512); ``padding=True`` is the
    pretraining variant (output at stride 4 on the whole grid), same weights."""

    def __init__(self, size: str = "small", out_channels: int = 384, width: float = 1.0,
                 padding: bool = False) -> None:  # fmt: skip
        if size not in SIZES:
            raise ValueError(f"PDN size must be one of {SIZES}, got {size!r}")
        p = int(padding)
        w1, w2 = max(1, round(128 * width)), max(1, round(256 * width))
        if size == "medium":
            w1, w2 = w2, max(1, round(512 * width))
        layers: list[nn.Module] = [
            nn.Conv2d(3, w1, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(w1, w2, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        ]  # fmt: skip
        if size == "small":
            layers += [nn.Conv2d(w2, w2, 3, padding=p), nn.ReLU(inplace=True), nn.Conv2d(w2, out_channels, 4)]
        else:
            layers += [nn.Conv2d(w2, w2, 1), nn.ReLU(inplace=True), nn.Conv2d(w2, w2, 3, padding=p),
                       nn.ReLU(inplace=True), nn.Conv2d(w2, out_channels, 4), nn.ReLU(inplace=True),
                       nn.Conv2d(out_channels, out_channels, 1)]  # fmt: skip
        super().__init__(*layers)


def _conv_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.ReLU(inplace=True))


class Autoencoder(nn.Module):
    """The paper's autoencoder: six strided 4x4 convolutions to a 64-channel 1 x 1 code; the decoder
    resizes (bilinear) to 3, 8, 15, 32, 63, 127 (at 256 px), each followed by a 4x4 convolution
    (padding 2), ReLU and dropout 0.2, then to the teacher's map size and two 3x3 convolutions.

    Other input sizes: the decoder sizes scale with the input, and the encoder's last feature is
    resized to the 8 x 8 its final 8x8 convolution expects (identity at 256 px)."""

    def __init__(self, out_channels: int = 384, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            _conv_relu(3, 32, 4, 2, 1), _conv_relu(32, 32, 4, 2, 1), _conv_relu(32, 64, 4, 2, 1),
            _conv_relu(64, 64, 4, 2, 1), _conv_relu(64, 64, 4, 2, 1),
        )  # fmt: skip
        self.bottleneck = nn.Conv2d(64, 64, 8)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64, 64, 4, 1, 2), nn.ReLU(inplace=True), nn.Dropout(dropout))
            for _ in DECODER_SIZES
        )
        self.head = nn.Sequential(_conv_relu(64, 64, 3, 1, 1), nn.Conv2d(64, out_channels, 3, 1, 1))

    def forward(self, x: Tensor, output_size: tuple[int, int]) -> Tensor:
        # Python numbers, also under tracing (the exported graph resizes its input to the training size first).
        scale = (int(x.shape[-2]) / 256, int(x.shape[-1]) / 256)
        code = self.encoder(x)
        if tuple(code.shape[-2:]) != (8, 8):
            code = F.interpolate(code, size=(8, 8), mode="bilinear", align_corners=False)
        y = self.bottleneck(code)
        for size, stage in zip(DECODER_SIZES, self.stages, strict=True):
            target = (max(1, round(size * scale[0])), max(1, round(size * scale[1])))
            y = stage(F.interpolate(y, size=target, mode="bilinear", align_corners=False))
        y = F.interpolate(y, size=output_size, mode="bilinear", align_corners=False)
        return self.head(y)


def hard_feature_loss(distance: Tensor, quantile: float = 0.999) -> Tensor:
    """Mean of the elements of ``distance`` at or above its ``quantile`` (linear interpolation)."""
    flat = distance.float().flatten()
    return flat[flat >= linear_quantile(flat, quantile)].mean()


def normalise_map(anomaly_map: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Linear map sending the quantile ``low`` to 0 and ``high`` to 0.1 (the paper's q_a, q_b)."""
    return 0.1 * (anomaly_map - low) / (high - low).clamp(min=1e-12)


def colour_jitter(images: Tensor) -> Tensor:
    """The autoencoder's augmentation: per image one of brightness, contrast, saturation, factor U(0.8, 1.2)."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    kinds = torch.randint(3, (len(images),)).tolist()
    factors = torch.empty(len(images)).uniform_(0.8, 1.2).tolist()
    return torch.stack([adjust[k](image, f) for image, k, f in zip(images, kinds, factors, strict=True)])


def ood_images(source: TextureSource, rng: np.random.Generator, count: int, size: int, grayscale: float,
               crop: bool) -> Tensor:  # fmt: skip
    """``count`` images (B, 3, size, size) in [0, 1] drawn at twice ``size``: the centre crop (the paper's
    penalty images) or the whole image (``crop=False``), grey with probability ``grayscale``."""
    images = []
    for _ in range(count):
        image = torch.from_numpy(source.sample(rng, (2 * size, 2 * size))).permute(2, 0, 1).float() / 255.0
        if crop:
            image = image[:, size // 2 : size // 2 + size, size // 2 : size // 2 + size]
        if rng.random() < grayscale:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        images.append(image)
    return torch.stack(images)


def texture_source(spec: str) -> TextureSource:
    """``make_texture_source(spec)``; a folder with a small decoded-image cache (drawn at 512 px)."""
    return make_texture_source(spec) if spec == "procedural" else FolderTextures(spec, cache_size=64)


# --------------------------------------------------------------------------- the teacher


def _imagenet(images: Tensor) -> Tensor:
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in IMAGENET_NORMALISATION)
    return (images - mean) / std


def distill_teacher(textures: str | os.PathLike[str], size: str = "small", out_channels: int = 384,
                    width: float = 1.0, backbone: str = "tf_efficientnet_lite0", weights: str = "auto",
                    weights_sha256: str | None = None, steps: int = 60000, batch_size: int = 16,
                    lr: float = 1e-4, image_size: int = 256, norm_images: int = 256,
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Pretrain a PDN on texture images to predict an ImageNet CNN's patch features (the paper's step,
    with ``backbone`` for WideResNet-101 and ``textures`` for ImageNet); returns a weights file's content.

    As the reference pretraining: the backbone sees the image at twice ``image_size``, the padded PDN at
    ``image_size``; targets are PatchCore's locally aware features of the backbone's stride-8 and
    stride-16 levels (its levels 2 and 3: stride 4 and 8 at the PDN's scale), pooled to
    ``out_channels``, normalised per channel over ``norm_images`` images; MSE loss, Adam (weight decay
    1e-5), images grey with probability 0.1. Seeded by ``seed`` alone, the global RNG untouched."""
    settings = {k: v for k, v in locals().items() if k not in ("textures", "weights_sha256")}
    source = texture_source(str(textures))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # Both built under the seed: the PDN's initial weights drawn from the caller's RNG (each benchmark
        # job's own) would give jobs that share a cache key different teachers, and the draws would shift
        # the caller's later ones (its batch order) by whether the teacher was distilled or cached.
        # NHWC, as AnomalyModule.memory_format: oneDNN's layout on the CPU.
        extractor = FeatureExtractor(backbone, (2, 3), weights, weights_sha256).to(memory_format=torch.channels_last)
        pdn = PDN(size, out_channels, width, padding=True).to(memory_format=torch.channels_last)
        rng = np.random.default_rng(seed)

        def batch() -> tuple[Tensor, Tensor]:
            big = ood_images(source, rng, batch_size, image_size, grayscale=0.1, crop=False)
            big = big.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                target, grid = locally_aware_patches(extractor(big), 1024, out_channels)
            small = F.interpolate(big, size=(image_size, image_size), mode="bilinear", antialias=True)
            return target.transpose(1, 2).reshape(len(big), out_channels, *grid), _imagenet(small)

        total, total_sq, seen = 0.0, 0.0, 0
        while seen < norm_images:
            target, _ = batch()
            total = total + target.double().sum(dim=(0, 2, 3))
            total_sq = total_sq + target.double().pow(2).sum(dim=(0, 2, 3))
            seen += len(target)
        count = seen * target.shape[-2] * target.shape[-1]
        mean = (total / count).float().view(1, -1, 1, 1)
        std = (total_sq / count - (total / count) ** 2).clamp(min=1e-12).sqrt().float().view(1, -1, 1, 1)
        optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=1e-5)
        for step in range(steps):
            target, images = batch()
            prediction = pdn(images)
            loss = F.mse_loss(prediction, (target - mean) / std)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == steps - 1:
                rank_zero_info(f"EfficientAD teacher distillation: step {step + 1}/{steps}, loss {loss.item():.4f}")
    settings["final_loss"] = float(loss.item()) if steps else float("nan")
    return {"state_dict": pdn.state_dict(), "settings": json.dumps({**settings, "textures": _describe(str(textures))},
                                                                   sort_keys=True)}


def load_teacher(path: str | os.PathLike[str], sha256: str | None = None) -> dict[str, Tensor]:
    """A PDN state dict from a teacher file (``distill_teacher``'s, or the reference's bare state dict).

    Raises :class:`WeightsUnavailableError` naming ``path`` when it does not exist and
    :class:`WeightsIntegrityError` when its SHA-256 does not start with ``sha256``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"EfficientAD teacher file {path} does not exist: give the pretrained teacher's path "
            "(teacher_weights), create one with `python -m adbench.models.efficientad distill --textures DTD_ROOT "
            f"--output {path}`, or leave teacher_weights empty to distil one when the fit starts")
    if sha256 is not None:
        actual = sha256_file(path)
        if len(sha256) < 8 or not actual.startswith(sha256.strip().lower()):
            raise WeightsIntegrityError(f"SHA-256 mismatch for EfficientAD teacher file {path}: expected "
                                        f"{sha256}, got {actual}")  # fmt: skip
    content = torch.load(path, map_location="cpu", weights_only=True)
    return content.get("state_dict", content) if isinstance(content, dict) else content


# --------------------------------------------------------------------------- the method


@register_model("efficientad")
class EfficientAD(AnomalyModule):
    # The paper's tables were not read here (aggregators quote 98.7 and 98.8 for EfficientAD-S's image AUROC):
    # nothing recorded; see docs/methods/efficientad.md.
    paper_results: dict[str, float] = {}

    def __init__(
        self,
        model_size: str = "small",
        out_channels: int = 384,
        width: float = 1.0,
        teacher_weights: str | None = None,
        teacher_sha256: str | None = None,
        backbone: str = "tf_efficientnet_lite0",
        weights: str = "auto",
        weights_sha256: str | None = None,
        distill_steps: int = 60000,
        distill_batch_size: int = 16,
        distill_lr: float = 1e-4,
        distill_norm_images: int = 256,
        distill_image_size: int = 256,
        teacher_cache: str | None = DEFAULT_CACHE,
        autoencoder: bool = True,
        penalty: bool = True,
        penalty_source: str | None = None,
        hard_quantile: float = 0.999,
        map_quantiles: tuple[float, float] = (0.9, 0.995),
        pad_raw_maps: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        lr_drop_at: float = 0.95,
        lr_drop_factor: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 < hard_quantile < 1.0:
            raise ValueError(f"hard_quantile must be in (0, 1), got {hard_quantile}")
        if not 0.0 <= map_quantiles[0] < map_quantiles[1] <= 1.0:
            raise ValueError(f"map_quantiles must be (q_a, q_b) with 0 <= q_a < q_b <= 1, got {map_quantiles}")
        self.save_hyperparameters()
        self.teacher = PDN(model_size, out_channels, width).requires_grad_(False).eval()
        self.student = PDN(model_size, out_channels * (2 if autoencoder else 1), width)
        self.autoencoder = Autoencoder(out_channels) if autoencoder else None
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        # (q_a, q_b) of the local map, then of the global map; 0 and 1 until measured (the map is then 0.1 x).
        self.register_buffer("quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        # What has been fitted, saved with checkpoints: teacher weights, teacher statistics, quantiles.
        self.register_buffer("fitted", torch.zeros(3, dtype=torch.bool))
        if teacher_weights is not None:
            self.teacher.load_state_dict(load_teacher(teacher_weights, teacher_sha256))
            self.fitted[0] = True
        self._ood_source: TextureSource | None = None
        self._validated = False
        self._quantiles_stale = False  # trained since the quantiles were last measured
        self._rng = np.random.default_rng(0)

    def train(self, mode: bool = True) -> EfficientAD:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    # ------------------------------------------------------------------ maps

    def teacher_features(self, x: Tensor) -> Tensor:
        """The teacher's channel-normalised features of ImageNet-normalised images, float32, no gradient."""
        with torch.no_grad():
            return (self.teacher(x).float() - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Local (teacher vs student) and global (autoencoder vs student) maps (B, 1, h, w), before
        normalisation: the squared differences averaged over channels, float32."""
        c = self.hparams.out_channels
        x = _imagenet(images)
        teacher = self.teacher_features(x)
        student = self.student(x).float()
        local = (teacher - student[:, :c]).pow(2).mean(dim=1, keepdim=True)
        if self.autoencoder is None:
            return local, None
        reconstruction = self.autoencoder(x, teacher.shape[-2:]).float()
        return local, (reconstruction - student[:, c:]).pow(2).mean(dim=1, keepdim=True)

    def _maps_to_normalise(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The raw maps, or with ``pad_raw_maps`` (anomalib 2.7's order) each padded and resized to the input."""
        local, global_ = self.raw_maps(images)
        if self.hparams.pad_raw_maps:
            local, global_ = (None if m is None else full_size_map(m, images.shape[-2:]) for m in (local, global_))
        return local, global_

    def forward(self, images: Tensor) -> AnomalyOutput:
        local, global_ = self._maps_to_normalise(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            q = self.quantiles
            combined = normalise_map(local, q[0], q[1])
            if global_ is not None:
                combined = 0.5 * combined + 0.5 * normalise_map(global_, q[2], q[3])
            # The paper pads the mean with 0 (q_a's level); padded raw maps' border is below almost every cell.
            anomaly_map = combined if self.hparams.pad_raw_maps else full_size_map(combined, images.shape[-2:])
        return AnomalyOutput(anomaly_map, max_score(anomaly_map))

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp, images = self.hparams, batch["image"]
        c, x = hp.out_channels, _imagenet(images)
        teacher = self.teacher_features(x)
        logged = {"hard": hard_feature_loss((teacher - self.student(x)[:, :c].float()).pow(2), hp.hard_quantile)}
        if hp.penalty:
            ood = ood_images(self._penalty_images(), self._rng, len(images), images.shape[-1], 0.3, crop=True)
            ood = _imagenet(ood.to(images.device).contiguous(memory_format=self.memory_format))
            logged["penalty"] = self.student(ood)[:, :c].float().pow(2).mean()
        if self.autoencoder is not None:
            x_aug = _imagenet(colour_jitter(images))
            teacher_aug = self.teacher_features(x_aug)
            reconstruction = self.autoencoder(x_aug, teacher_aug.shape[-2:]).float()
            logged["ae"] = (teacher_aug - reconstruction).pow(2).mean()
            logged["stae"] = (reconstruction - self.student(x_aug)[:, c:].float()).pow(2).mean()
        loss = sum(logged.values())
        for name, value in logged.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [*self.student.parameters(), *(self.autoencoder.parameters() if self.autoencoder else [])]
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        return draem_schedule(optimizer, self.trainer.estimated_stepping_batches, [hp.lr_drop_at], hp.lr_drop_factor)

    def on_train_start(self) -> None:
        self._rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        if not self.fitted[0]:
            self._obtain_teacher()
        if not self.fitted[1]:
            self.fit_teacher_statistics(self.trainer.train_dataloader)

    def on_fit_start(self) -> None:
        self._validated = False
        self._quantiles_stale = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._quantiles_stale = True  # the weights moved: the quantiles describe an older student

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.fit_map_quantiles(self.trainer.val_dataloaders)
            self._validated = True
            self._quantiles_stale = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved before this fit's first validation (or in a fit without any) still gets the
        # quantiles of its own weights. The state dict was taken already, so they are written into it too.
        if self._refresh_quantiles_from_training_images():
            state = checkpoint["state_dict"]
            state["quantiles"], state["fitted"] = self.quantiles.clone(), self.fitted.clone()

    def on_train_end(self) -> None:
        self._refresh_quantiles_from_training_images()

    def _refresh_quantiles_from_training_images(self) -> bool:
        """Without a validation in this fit, measure the quantiles on the training images, once per change of
        the weights (not after every epoch: each pass costs an epoch's forward passes). The student has seen
        these images, so their quantiles are lower than held-out ones (see the docs). True: measured now."""
        if self._validated or not self._quantiles_stale:
            return False
        with eval_mode([self]):
            self.fit_map_quantiles(self.trainer.train_dataloader)
        self._quantiles_stale = False
        return True

    # ------------------------------------------------------------------ fitted statistics

    def _batches(self, loader: Any) -> Any:
        """``(images, labels)`` of ``loader``'s batches, the images on this module's device."""
        for batch in loader:
            yield batch["image"].to(self.device).contiguous(memory_format=self.memory_format), batch["label"]

    @torch.no_grad()
    def fit_teacher_statistics(self, loader: Any) -> None:
        """Channel mean and standard deviation of the teacher's outputs over ``loader``'s images (all processes)."""
        total = total_sq = count = 0
        for images, _ in self._batches(loader):
            features = self.teacher(_imagenet(images)).double()
            total = total + features.sum(dim=(0, 2, 3))
            total_sq = total_sq + features.pow(2).sum(dim=(0, 2, 3))
            count += features[:, 0].numel()
        stats = torch.cat([total, total_sq, total.new_tensor([count])])
        if self._trainer is not None:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        c = self.hparams.out_channels
        mean = stats[:c] / stats[-1]
        self.teacher_mean.copy_(mean.view(1, -1, 1, 1))
        self.teacher_std.copy_((stats[c:2 * c] / stats[-1] - mean**2).clamp(min=1e-12).sqrt().view(1, -1, 1, 1))
        self.fitted[1] = True

    @torch.no_grad()
    def fit_map_quantiles(self, loader: Any) -> None:
        """q_a and q_b of the local and global maps over the normal images of ``loader`` (all processes)."""
        maps, normal = [], []
        for images, labels in self._batches(loader):
            local, global_ = self._maps_to_normalise(images)
            maps.append(torch.stack([local, local if global_ is None else global_]).flatten(1))
            normal.append((labels == 0).to(self.device).repeat_interleave(local[0].numel()))
        if not maps:
            return
        values, normal = torch.cat(maps, dim=1), torch.cat(normal)
        if self._trainer is not None and self.trainer.world_size > 1:  # equal counts: the sampler pads
            values = self.all_gather(values).transpose(0, 1).flatten(1)
            normal = self.all_gather(normal).flatten()
        if not normal.any():
            rank_zero_warn("EfficientAD: no normal image to measure the map quantiles on; kept as they were")
            return
        values = values[:, normal]
        low, high = self.hparams.map_quantiles
        q = [linear_quantile(v, p) for v in values for p in (low, high)]
        self.quantiles.copy_(torch.stack(q))
        self.fitted[2] = True

    # ------------------------------------------------------------------ the teacher and the OOD images

    def _textures(self) -> str:
        """The out-of-distribution image source: ``penalty_source``, else the DataModule's textures."""
        spec = self.hparams.penalty_source
        if spec is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            spec = getattr(datamodule, "texture_source", None)
        if spec in (None, "required", "self"):
            raise ValueError(
                f"EfficientAD needs out-of-distribution images (ImageNet in the paper) for its penalty and its "
                f"teacher distillation, got texture source {spec!r}: pass --data.texture_source=/path/to/dtd or "
                "--model.penalty_source=/path/to/images ('procedural' works offline; 'self' are training images)")
        return str(spec)

    def _penalty_images(self) -> TextureSource:
        if self._ood_source is None:
            self._ood_source = texture_source(self._textures())
        return self._ood_source

    def obtain_teacher(self) -> None:
        """The teacher's weights before a fit (distilled, or from ``teacher_cache``) unless it has them already."""
        if not self.fitted[0]:
            self._obtain_teacher()

    def _obtain_teacher(self) -> None:
        """Distil the teacher (or take it from the cache); the one-time substitute for the paper's."""
        hp = self.hparams
        settings = dict(textures=self._textures(), size=hp.model_size, out_channels=hp.out_channels,
                        width=hp.width, backbone=hp.backbone, weights=hp.weights, weights_sha256=hp.weights_sha256,
                        steps=hp.distill_steps, batch_size=hp.distill_batch_size, lr=hp.distill_lr,
                        norm_images=hp.distill_norm_images, image_size=hp.distill_image_size)  # fmt: skip
        path = None
        if hp.teacher_cache is not None:
            # "rule" 2: teachers distilled before the seed also drew the PDN's initial weights are not reused.
            key = hashlib.sha256(json.dumps({**settings, "textures": _describe(settings["textures"]), "rule": 2},
                                            sort_keys=True).encode()).hexdigest()[:16]  # fmt: skip
            path = Path(hp.teacher_cache).expanduser() / f"teacher-{hp.model_size}-{key}.pth"
        # Parallel first fits (a sweep's jobs, DDP ranks) distil once: the others wait for the file.
        with exclusive_file_lock(path) if path is not None else contextlib.nullcontext():
            if path is not None and path.is_file():
                rank_zero_info(f"EfficientAD: distilled teacher from the cache, {path}")
                state = load_teacher(path)
            else:
                rank_zero_info(f"EfficientAD: no teacher file; distilling one from {hp.backbone} on "
                               f"{settings['textures']} ({hp.distill_steps} steps)")  # fmt: skip
                content = distill_teacher(**settings)
                state = content["state_dict"]
                if path is not None:  # by whichever process holds the lock, so any rank may write it
                    path.parent.mkdir(parents=True, exist_ok=True)
                    partial = path.with_suffix(f".{os.getpid()}.tmp")
                    torch.save(content, partial)
                    partial.replace(path)
                    rank_zero_info(f"EfficientAD: distilled teacher cached in {path}")
        self.teacher.load_state_dict(state)
        self.teacher.to(self.device, memory_format=self.memory_format)
        self.fitted[0] = True


def full_size_map(cells: Tensor, size: tuple[int, int]) -> Tensor:
    """A map at the PDN's resolution zero-padded by :data:`MAP_PADDING` cells and resized (bilinear) to ``size``."""
    return F.interpolate(F.pad(cells, (MAP_PADDING,) * 4), size=size, mode="bilinear", align_corners=False)


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile`` (linear interpolation) for any number of elements."""
    flat = values.float().flatten()
    if flat.numel() <= 2**24:
        return torch.quantile(flat, q)
    position = q * (flat.numel() - 1)
    lower = flat.kthvalue(int(position) + 1).values
    upper = flat.kthvalue(min(int(position) + 2, flat.numel())).values
    return lower + (upper - lower) * (position - int(position))


def _describe(textures: str) -> str:
    """A texture source for the cache key: a folder by its resolved path and its number of images."""
    if textures == "procedural":
        return textures
    folder = Path(textures).expanduser().resolve()
    return f"{folder}:{sum(1 for p in folder.rglob('*') if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))}"


def main(argv: list[str] | None = None) -> None:
    """``python -m adbench.models.efficientad distill ...``: write a distilled teacher file."""
    parser = argparse.ArgumentParser(prog="python -m adbench.models.efficientad")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser("distill", help="pretrain a PDN teacher on texture images (DTD)")
    distill.add_argument("--textures", required=True, help="folder of images (DTD), or 'procedural'")
    distill.add_argument("--output", required=True, help="the teacher file to write")
    distill.add_argument("--size", default="small", choices=SIZES)
    distill.add_argument("--out-channels", type=int, default=384)
    distill.add_argument("--width", type=float, default=1.0)
    distill.add_argument("--backbone", default="tf_efficientnet_lite0")
    distill.add_argument("--steps", type=int, default=60000)
    distill.add_argument("--batch-size", type=int, default=16)
    distill.add_argument("--lr", type=float, default=1e-4)
    distill.add_argument("--norm-images", type=int, default=256)
    distill.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    content = distill_teacher(args.textures, args.size, args.out_channels, args.width, args.backbone,
                              steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              norm_images=args.norm_images, seed=args.seed)  # fmt: skip
    output = Path(args.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, output)
    print(f"{output}\nsha256 {sha256_file(output)}")

