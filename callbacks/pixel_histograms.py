"""Per-image pixel histograms of the test maps: what a paired test of pixel metrics needs, kept small.

For every test image, the counts of its normal and of its anomalous pixels in each of 256 score
bins (the bins' edges are quantiles of the test maps' normal pixels and of their anomalous ones).
Summed over any resample of the images they give that resample's pixel AUROC within about 0.001
and pixel AP within about 0.005 of the exact figures (``tests/test_statistics.py``), so the report
can bootstrap over the images two methods scored without keeping their maps: under 1 KB per image
compressed (0.6 KB measured for 256 x 256 maps). For PRO, each image's anomalous pixels are also
counted with the weight ``1 / |their region|`` (``region_histograms``): every region adds 1 in all, so
a resample's sum over bins is its number of regions and its cumulative sum from the top is the mean
region overlap at each threshold, times that number. Written next to the job's per-image scores
(``scores/<job>.pixels.npz``: ``paths``, ``labels``, ``histograms`` (n, 2, bins), ``region_histograms``
(n, bins; since 2026-12-06), ``edges``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lightning import Callback, LightningModule, Trainer

from adbench.callbacks.metrics import region_pixel_weights

BINS = 256
#: The file beside a job's per-image scores: ``scores/<job>.pixels.npz``.
HISTOGRAM_SUFFIX = ".pixels.npz"


def pixel_histograms(maps: np.ndarray, masks: np.ndarray, bins: int = BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 2, <= bins) int32 counts of normal (0) and anomalous (1) pixels per image; (n, <= bins)
    float32 region-weighted counts of the anomalous pixels (each pixel ``1 / |its region|``); the bin edges."""
    shape = np.shape(masks)[-2:]
    maps = np.asarray(maps, dtype=np.float32).reshape(len(maps), -1)
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    # Half the edges at quantiles of the normal pixels, half at those of the anomalous ones: the few
    # anomalous pixels decide pixel AP, and quantiles of all pixels would give their tail few bins.
    edges = []
    for side in (False, True):
        values = maps[masks == side]
        if values.size:
            values = values[:: max(1, values.size // 1_000_000)]  # quantiles of a million pixels suffice
            edges.append(np.quantile(values, np.linspace(0, 1, bins // 2 + 1)))
    edges = np.unique(np.concatenate(edges))
    bins = len(edges) - 1
    index = np.clip(np.searchsorted(edges[1:-1], maps, side="right"), 0, bins - 1)
    histograms = np.zeros((len(maps), 2, bins), np.int32)
    regions = np.zeros((len(maps), bins), np.float32)
    for i in range(len(maps)):
        for side in (0, 1):
            histograms[i, side] = np.bincount(index[i][masks[i] == bool(side)], minlength=bins)
        if histograms[i, 1].any():
            weights, _ = region_pixel_weights(masks[i].reshape(shape))
            regions[i] = np.bincount(index[i][masks[i]], weights=weights, minlength=bins)
    return histograms, regions, edges


class PixelHistograms(Callback):
    """Keep the test maps (float16) and masks per image; :meth:`save` writes their pixel histograms."""

    def __init__(self) -> None:
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._paths: list[str] = []
        self._labels: list[int] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maps, self._masks, self._paths, self._labels = [], [], [], []

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if "mask" not in batch or "path" not in batch:
            return
        maps = outputs["anomaly_map"].detach().to("cpu").float()
        self._maps += list(maps.reshape(len(maps), *maps.shape[-2:]).numpy().astype(np.float16))
        masks = (batch["mask"].detach() > 0.5).cpu()
        self._masks += list(masks.reshape(len(masks), *masks.shape[-2:]).numpy())
        self._paths += [str(p) for p in batch["path"]]
        self._labels += [int(v) for v in batch["label"]]

    def save(self, path: str | Path, root: str | None = None) -> Path | None:
        """Write ``path`` (npz) from the last test; paths relative to ``root`` as in the score file.
        None when there is nothing to write (no masks, no anomalous pixel)."""
        if not self._maps or not any(m.any() for m in self._masks):
            return None
        histograms, regions, edges = pixel_histograms(np.stack(self._maps), np.stack(self._masks))
        paths = [Path(p).relative_to(root).as_posix() if root and Path(p).is_relative_to(root) else Path(p).as_posix()
                 for p in self._paths]  # fmt: skip
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(temporary, paths=np.array(paths), labels=np.array(self._labels, np.int8),
                            histograms=histograms, region_histograms=regions, edges=edges.astype(np.float32))
        temporary.replace(path)
        return path
