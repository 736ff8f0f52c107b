"""Pictures of what a method sees: input | ground truth | anomaly-map overlay | prediction.

One PNG per test image (``<defect>_<name>.png``), composed with numpy and PIL
(no figure per image, so a full category renders in a second or two), and a
sample grid logged to Weights & Biases when it is the logger.

All images of a run share one colour scale (the range of the test maps), so
colours are comparable across images. The prediction panel thresholds the map
at the pixel F1-optimal threshold found on the *validation* split when the
evaluator has one; without validation the threshold is the test-optimal one,
and the file says so (``threshold: test-optimal, display only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from matplotlib import colormaps
from PIL import Image, ImageDraw

from adbench.callbacks.evaluation import AnomalyEvaluator
from adbench.callbacks.metrics import f1_optimal_threshold

_JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
_RED = np.array([255, 0, 0], dtype=np.float32)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_panels(
    image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, threshold: float
) -> np.ndarray:
    """Four panels side by side (uint8 H x 4W x 3) for one image (uint8 HxWx3), mask (bool), map (float)."""
    normalised = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = _JET[(normalised * 255).astype(np.uint8)]
    overlay = (0.5 * image + 0.5 * heat).astype(np.uint8)
    truth = image.astype(np.float32)
    truth[mask] = 0.5 * truth[mask] + 0.5 * _RED
    prediction = image.astype(np.float32)
    predicted = anomaly_map >= threshold
    prediction[predicted] = 0.5 * prediction[predicted] + 0.5 * _RED
    prediction[_boundary(mask)] = (0, 255, 0)  # ground-truth outline on the prediction
    return np.concatenate([image, truth.astype(np.uint8), overlay, prediction.astype(np.uint8)], axis=1)


TITLE_HEIGHT = 26  # two text lines: the caption, then one title per panel
BAR_WIDTH = 44


def compose(panels: list[np.ndarray], titles: list[str], caption: str, vmin: float, vmax: float) -> np.ndarray:
    """Panels (each uint8 H x W x 3) side by side under their titles and ``caption``, with the
    colour bar of the heat map (``vmin`` .. ``vmax``) on the right: uint8 (H + 26, n W + 44, 3)."""
    height, width = panels[0].shape[:2]
    canvas = Image.new("RGB", (len(panels) * width + BAR_WIDTH, height + TITLE_HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), caption, fill=(255, 255, 0))
    for k, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        canvas.paste(Image.fromarray(panel), (k * width, TITLE_HEIGHT))
        draw.text((k * width + 2, 13), title, fill=(255, 255, 255))
    bar = np.repeat(_JET[::-1][np.linspace(0, 255, height).astype(int)][:, None], 10, axis=1)
    left = len(panels) * width + 2
    canvas.paste(Image.fromarray(bar.astype(np.uint8)), (left, TITLE_HEIGHT))
    draw.text((left + 12, TITLE_HEIGHT), f"{vmax:.3g}", fill=(255, 255, 255))
    draw.text((left + 12, TITLE_HEIGHT + height - 11), f"{vmin:.3g}", fill=(255, 255, 255))
    return np.asarray(canvas)


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, caption: str) -> np.ndarray:
    """Input | heat-map overlay (white contour where the map reaches ``threshold``, if finite),
    titled, with a colour bar and ``caption``; the map's own range sets the colours."""
    vmin, vmax = float(anomaly_map.min()), float(anomaly_map.max())
    panels = render_panels(image, np.zeros(anomaly_map.shape, bool), anomaly_map, vmin, vmax,
                           threshold if np.isfinite(threshold) else np.inf)
    width = image.shape[1]
    overlay = panels[:, 2 * width : 3 * width].copy()
    if np.isfinite(threshold):
        overlay[_boundary(anomaly_map >= threshold)] = (255, 255, 255)
    return compose([image, overlay], ["input", "anomaly map"], caption, vmin, vmax)


class AnomalyMapVisualizer(Callback):
    """Save a four-panel PNG per test image and log a sample grid to W&B.

    Args:
        output_dir: folder for the PNGs (default: ``<trainer.log_dir>/anomaly_maps``).
        max_images: render at most this many test images (``None``: all).
        wandb_samples: images in the W&B grid.
    """

    def __init__(self, output_dir: str | Path | None = None, max_images: int | None = None, wandb_samples: int = 8):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_images = max_images
        self.wandb_samples = wandb_samples
        self._items: list[dict[str, Any]] = []
        self.saved: list[Path] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._items, self.saved = [], []

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        for i in range(len(batch["image"])):
            if self.max_images is not None and len(self._items) >= self.max_images:
                return
            self._items.append({
                "image": (batch["image"][i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8),
                "mask": batch["mask"][i, 0].detach().cpu().numpy() > 0.5,
                "map": outputs["anomaly_map"][i, 0].detach().float().cpu().numpy(),
                "score": float(outputs["image_score"][i]),
                "name": f"{batch['defect_type'][i]}_{Path(batch['path'][i]).stem}",
            })  # fmt: skip

    def _threshold(self, trainer: Trainer) -> tuple[float, str]:
        evaluator = next((c for c in trainer.callbacks if isinstance(c, AnomalyEvaluator)), None)
        threshold = getattr(evaluator, "val_pixel_threshold", None)
        if threshold is not None and np.isfinite(threshold):
            return float(threshold), "validation F1-optimal"
        maps = torch.from_numpy(np.stack([item["map"] for item in self._items]))
        masks = torch.from_numpy(np.stack([item["mask"] for item in self._items]))
        return f1_optimal_threshold(maps.flatten(), masks.flatten()), "test-optimal, display only"

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.log_dir broadcasts under DDP: every rank must ask, before rank 0 alone renders.
        folder = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "anomaly_maps"
        if not self._items or not trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        all_maps = np.stack([item["map"] for item in self._items])
        vmin, vmax = float(all_maps.min()), float(all_maps.max())
        threshold, origin = self._threshold(trainer)
        panels = []
        width = self._items[0]["image"].shape[1]
        titles = ["input", "ground truth", "anomaly map", "map >= thr. (green: truth)"]
        for item in self._items:
            panel = render_panels(item["image"], item["mask"], item["map"], vmin, vmax, threshold)
            picture = Image.fromarray(compose(
                [panel[:, k * width : (k + 1) * width] for k in range(4)], titles,
                f"{item['name']}  score {item['score']:.4g}  pixel threshold {threshold:.4g} ({origin})", vmin, vmax,
            ))
            path = folder / f"{item['name']}.png"
            picture.save(path)
            self.saved.append(path)
            panels.append(np.asarray(picture))
        self._log_wandb(trainer, panels)
        self._items = []

    def _log_wandb(self, trainer: Trainer, panels: list[np.ndarray]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not panels:
            return
        step = max(1, len(panels) // self.wandb_samples)
        for logger in loggers:
            logger.log_image(key="test/anomaly_maps", images=panels[::step][: self.wandb_samples])
