"""Where a training step's time goes, for either library: ``torch.profiler`` over a window of steps.

``make compare COMPARE_ARGS="--profile-steps 20"`` records, on both sides, training steps
``warmup + 1`` to ``warmup + steps`` of the first epoch (the first steps pay for oneDNN's kernel
selection and the allocator's first growth) and adds to each side's result its milliseconds per
step by operator (self CPU time: an operator's own time, without the operators it calls) and by
kind (:data:`KINDS`), with the profiler's full table in the worker's folder (``profile.txt``).
The report puts the two sides' kinds and largest operators side by side. The profiler's own cost
(a few microseconds per operator) is in both sides' figures alike; the window's wall time per
step is given beside the operators' sum, so what no operator accounts for (Python, Lightning's
loop) shows as the difference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning import Callback

#: Operator kinds by name prefix (first match wins); the rest is "other".
KINDS = (
    ("convolution", ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                     "aten::convolution", "aten::conv2d", "aten::_slow_conv2d", "aten::thnn_conv2d")),
    ("batch norm", ("aten::native_batch_norm", "aten::_batch_norm", "aten::batch_norm",
                    "aten::_native_batch_norm_legit")),
    ("optimiser", ("Optimizer.", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp")),
    ("data loading", ("enumerate(DataLoader)",)),
    ("layout copies", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy")),
)


def kind_of(name: str) -> str:
    return next((kind for kind, prefixes in KINDS if name.startswith(prefixes)), "other")


class StepProfiler(Callback):
    """Profile training steps ``warmup + 1 .. warmup + steps``; :attr:`summary` holds ms per step
    (per kind, and for the ``keep`` largest operators)."""

    def __init__(self, steps: int, out_dir: str | Path, warmup: int = 3, keep: int = 200) -> None:
        if steps < 1 or warmup < 0:
            raise ValueError(f"StepProfiler needs steps >= 1 and warmup >= 0, got {steps} and {warmup}")
        self.steps, self.warmup, self.keep, self.out_dir = steps, warmup, keep, Path(out_dir)
        self.summary: dict[str, Any] = {}
        self._profiler: Any = None
        self._seen = 0
        self._started = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._seen == self.warmup and self._profiler is None and not self.summary:
            import torch.profiler

            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._seen += 1
        if self._profiler is not None and self._seen == self.warmup + self.steps:
            self._finish(time.perf_counter() - self._started, self.steps)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._profiler is not None:  # fewer steps than asked: summarise those there were
            self._finish(time.perf_counter() - self._started, max(1, self._seen - self.warmup))

    def _finish(self, seconds: float, steps: int) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "profile.txt").write_text(
            averages.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=70))
        per_op = {e.key: e.self_cpu_time_total / 1000 / steps for e in averages}  # us -> ms per step
        kinds: dict[str, float] = {}
        for name, ms in per_op.items():
            kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
        largest = sorted(per_op.items(), key=lambda item: -item[1])[: self.keep]
        self.summary = {"steps": steps, "wall_ms_per_step": 1000 * seconds / steps,
                        "operators_ms_per_step": sum(per_op.values()), "kinds": kinds, "operators": dict(largest)}
