"""Wall-clock, throughput and peak-memory figures of a run, for the leaderboard."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def synchronized_now(pl_module: LightningModule) -> float:
    """``time.perf_counter()`` after the module's CUDA work has finished (asynchronous kernels)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
    return time.perf_counter()


class TimingCallback(Callback):
    """Measures fit time, test time and test throughput (images/s), and peak memory.

    ``train_step_seconds`` is the median time of one training step (batch start to end).
    Test throughput counts the model's work from the first test batch's start to
    the last batch's end (data already decoded and cached), not the metric
    computation that follows. On CUDA the device is synchronised before reading
    the clock, and peak memory is the device's; on CPU it is the peak RSS.
    """

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}
        self._start = 0.0
        self._test_images = 0
        self._test_first = None
        self._test_last = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start = synchronized_now(pl_module)
        self._train_steps = 0
        self._step_seconds: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._step_start = synchronized_now(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._train_steps += 1
        self._step_seconds.append(synchronized_now(pl_module) - self._step_start)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = synchronized_now(pl_module) - self._start
        self.stats.update(fit_seconds=seconds, train_steps=self._train_steps)
        self.stats["train_steps_per_second"] = self._train_steps / seconds if seconds > 0 else float("nan")
        # One step alone, without data loading, validation or epoch-end work; the median of the
        # steps after the first, which pays for warm-up (cuDNN autotuning, torch.compile's tracing).
        steps = self._step_seconds[1:] or self._step_seconds
        self.stats["train_step_seconds"] = statistics.median(steps) if steps else float("nan")
        self._record_memory(pl_module, "fit")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._test_images, self._test_first = 0, None

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, *args: Any) -> None:
        if self._test_first is None:
            self._test_first = synchronized_now(pl_module)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any) -> None:
        self._test_images += len(batch["image"])
        self._test_last = synchronized_now(pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = self._test_last - (self._test_first or self._test_last)
        self.stats.update(test_seconds=seconds, test_images=self._test_images)
        self.stats["test_images_per_second"] = self._test_images / seconds if seconds > 0 else float("nan")
        self._record_memory(pl_module, "test")

    def _record_memory(self, pl_module: LightningModule, stage: str) -> None:
        if pl_module.device.type == "cuda":
            self.stats[f"{stage}_peak_memory_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            self.stats[f"{stage}_peak_memory_mb"] = peak_rss_mb()
