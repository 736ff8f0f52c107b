"""The comparison table (ours, anomalib, ours / anomalib per quantity) and ``compare.md``."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import math
import os
import platform
from typing import Any

from adbench.benchmark.orchestration.environment import cpu_model

from .pairs import METHODS

#: (result key, label, better, kinds it applies to or None for all)
ROWS: tuple[tuple[str, str, str, tuple[str, ...] | None], ...] = (
    ("fit_seconds", "fit time (s)", "lower", None),
    ("optimizer_steps", "optimizer steps", "", ("stpm", "draem", "fastflow", "efficientad", "glass")),
    ("steps_per_second", "training steps/s", "higher", ("stpm", "draem", "fastflow", "efficientad", "glass")),
    ("train_images_per_second", "feature collection images/s", "higher", ("patchcore", "padim")),
    ("test_images_per_second", "test images/s (predict loop)", "higher", None),
    ("predict_seconds", "test wall time incl. data setup (s)", "lower", None),
    ("peak_rss_mb", "peak RSS (MiB)", "lower", None),
    ("rss_before_fit_mb", "peak RSS before fit: imports + model (MiB)", "lower", None),
    ("cuda_peak_mb", "peak CUDA memory (MiB)", "lower", None),
    ("image_auroc", "image AUROC", "higher", None),
    ("pixel_auroc", "pixel AUROC", "higher", None),
    ("pro", "PRO (FPR <= 0.3)", "higher", None),
)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro")
#: A difference whose whole interval is this close to 0 is float rounding: the two sides are equal.
EQUAL_WITHIN = 1e-4


def _value(result: dict[str, Any] | None, key: str) -> float:
    if not result or result.get("status") != "ok":
        return math.nan
    value = result.get("metrics", {}).get(key) if key in METRIC_KEYS else result.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def build_table(results: list[dict[str, Any]]) -> Any:
    """Long table: one row per (method, quantity) with ours, anomalib and ours / anomalib.

    ``results`` are worker records (``method``, ``side``, ``status``, measured values and
    ``metrics``). Rows that apply to neither side (e.g. CUDA memory on a CPU) are dropped.
    """
    import pandas as pd

    by_key = {(r["method"], r["side"]): r for r in results}
    methods = list(dict.fromkeys(r["method"] for r in results))
    rows = []
    for method in methods:
        kind = METHODS[method].kind if method in METHODS else None
        ours, theirs = by_key.get((method, "ours")), by_key.get((method, "anomalib"))
        for key, label, better, kinds in ROWS:
            if kinds is not None and kind not in kinds:
                continue
            a, b = _value(ours, key), _value(theirs, key)
            if math.isnan(a) and math.isnan(b) and key == "cuda_peak_mb":
                continue
            ratio = a / b if not (math.isnan(a) or math.isnan(b)) and b != 0 else math.nan
            rows.append({"method": method, "quantity": label, "ours": a, "anomalib": b,
                         "ratio": ratio, "better": better, "key": key})  # fmt: skip
    return pd.DataFrame(
        rows, columns=["method", "quantity", "ours", "anomalib", "ratio", "better", "key"]
    )


def _format_value(value: float, key: str, status: str | None) -> str:
    if status is not None and status != "ok":
        return status
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in METRIC_KEYS:
        return f"{value:.4f}"
    if key == "optimizer_steps":
        return f"{value:.0f}"
    magnitude = abs(value)
    return (
        f"{value:.0f}"
        if magnitude >= 100
        else f"{value:.1f}"
        if magnitude >= 10
        else f"{value:.2f}"
    )


def format_table(table: Any, results: list[dict[str, Any]]) -> Any:
    """The table with formatted strings (``failed`` where a side failed), for printing."""
    status = {(r["method"], r["side"]): r.get("status") for r in results}
    shown = table.copy()
    shown["ours"] = [_format_value(v, k, status.get((m, "ours")))
                     for v, k, m in zip(table["ours"], table["key"], table["method"], strict=True)]  # fmt: skip
    shown["anomalib"] = [_format_value(v, k, status.get((m, "anomalib")))
                         for v, k, m in zip(table["anomalib"], table["key"], table["method"], strict=True)]  # fmt: skip
    shown["ratio"] = ["n/a" if math.isnan(r) else f"{r:.2f}x" for r in table["ratio"]]
    shown = shown.drop(columns=["key"]).rename(columns={"ratio": "ours / anomalib"})
    return shown


def table_markdown(table: Any, results: list[dict[str, Any]]) -> str:
    # disable_numparse: "0.9900" stays as formatted, not re-parsed into 0.99.
    return format_table(table, results).to_markdown(index=False, disable_numparse=True)


def machine_description() -> dict[str, str]:
    """CPU, cores, memory, GPU and the versions the report's header names."""
    info = {"cpu": cpu_model(), "cpu_cores": str(os.cpu_count()), "python": platform.python_version(),
            "host": platform.node()}  # fmt: skip
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    for package in ("torch", "lightning", "timm", "anomalib", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover
        pass
    return info


def deltas_markdown(deltas: dict[str, dict[str, dict[str, float]]]) -> str:
    """Ours - anomalib per metric, its paired interval, and whether ours is at least as good."""
    from adbench.callbacks.metrics import METRIC_LABELS

    rows = ["| method | metric | ours - anomalib | 95 % interval | ours at least as good? |", "|---|---|---|---|---|"]
    for method, by_metric in deltas.items():
        for key, d in by_metric.items():
            if math.isnan(d["low"]):
                verdict = "n/a"
            elif max(abs(d["low"]), abs(d["high"])) < EQUAL_WITHIN:
                verdict = "yes, equal"
            elif d["low"] > 0:
                verdict = "yes, better"
            elif d["high"] >= 0:
                verdict = "yes, within the interval"
            else:
                verdict = "**no**, worse"
            rows.append(f"| {method} | {METRIC_LABELS[key]} | {d['delta']:+.4f} | "
                        f"[{d['low']:+.4f}, {d['high']:+.4f}] | {verdict} |")  # fmt: skip
    return "\n".join(rows)


def markdown_report(table: Any, results: list[dict[str, Any]], args: argparse.Namespace, root: str,
                    category: str, n_train: int, n_test: int, command: str,
                    deltas: dict[str, dict[str, dict[str, float]]] | None = None) -> str:  # fmt: skip
    """``compare.md``: date, machine, software, data, budgets, command, the table, each run's notes."""
    machine = machine_description()
    lines = [
        f"# adbench vs anomalib {machine.get('anomalib')}: {category}",
        "",
        f"* date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
        + (" (report rebuilt with `--report-only` from the earlier runs' predictions and records; "
           "the speed figures are those runs')" if getattr(args, "report_only", False) else ""),
        f"* machine: {machine['cpu']}, {machine['cpu_cores']} CPU cores, {machine.get('memory', '?')} RAM"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else ", no GPU"),
        f"* software: Python {machine['python']}, torch {machine['torch']}, lightning {machine['lightning']}, "
        f"timm {machine['timm']}, anomalib {machine['anomalib']}",
        f"* data: `{root}` / {category}: {n_train} train/good images (all used for training by both, "
        f"no validation), {n_test} test images; {args.image_size} px, batch {args.batch_size} "
        f"(test {args.eval_batch_size}), {args.num_workers} DataLoader workers, seed {args.seed}, "
        f"torch threads {args.threads or 'default'}",
        f"* budgets: PatchCore and PaDiM 1 epoch; STPM {args.stpm_epochs} epoch(s); FastFlow "
        f"{args.fastflow_epochs} epoch(s); DRAEM {args.draem_steps} optimizer steps at widths "
        f"{args.draem_width[0]}/{args.draem_width[1]}; EfficientAD "
        f"{getattr(args, 'efficientad_steps', None) or 'the quick profile'} optimizer steps at batch 1 (both), teacher and "
        "penalty images shared (notes below), map quantiles from the training images (no validation split); "
        f"GLASS {args.glass_epochs} epoch(s), local-synthesis textures shared (notes below)",
        f"* command: `{command}`",
        "",
        "Metrics are ours (`callbacks/metrics.py`) on each side's raw scores and maps, against the "
        "same ground truth. Ratio = ours / anomalib; `better` says which direction is better.",
        "",
        table_markdown(table, results),
        "",
    ]
    if deltas:
        lines += [
            "## Metric differences, ours - anomalib",
            "",
            f"Paired bootstrap over the {n_test} test images ({args.bootstrap_resamples} resamples, stratified "
            f"by label, seed {args.seed}): each resample draws the images once and scores both sides on them "
            "(`callbacks/intervals.py`, `paired_bootstrap_deltas`). Ours is at least as good where the "
            "interval reaches 0 or above; equal where the whole interval is within 1e-4 of 0 (float rounding).",
            "",
            deltas_markdown(deltas),
            "",
        ]
    profiled = [r for r in results if r.get("profile")]
    if profiled:
        lines += [profile_markdown(profiled), ""]
    lines += [
        "## Settings and checks per run",
        "",
    ]
    for r in results:
        head = f"* **{r['method']} / {r['side']}**: {r.get('status')}"
        if r.get("status") == "ok":
            head += (f", device {r.get('device')}, {r.get('train_images')} train images in "
                     f"{r.get('train_batches')} batches, {r.get('test_images')} test images, worker "
                     f"{r.get('worker_seconds', math.nan):.0f} s")  # fmt: skip
        else:
            head += f": {r.get('error')}"
        lines.append(head)
        for key, value in (r.get("notes") or {}).items():
            lines.append(f"  * {key}: {value}")
        lines.append(f"  * log: `{r.get('log')}`")
    lines.append("")
    return "\n".join(lines)


def profile_markdown(results: list[dict[str, Any]]) -> str:
    """Per method: each side's ms per training step by operator kind and for the largest operators
    (``--profile-steps``: ``step_profiler.py``)."""
    lines = ["## Where a training step's time goes (torch.profiler, self CPU ms per step)", ""]
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["side"]] = r["profile"]
    for method, sides in by_method.items():
        names = [side for side in ("ours", "anomalib") if side in sides]
        steps = ", ".join(f"{side} {sides[side]['steps']}" for side in names)
        lines += [f"### {method} (steps profiled: {steps})", "",
                  "| | " + " | ".join(names) + (" | ours / anomalib |" if len(names) == 2 else " |"),
                  "|:--|" + "--:|" * (len(names) + (len(names) == 2))]  # fmt: skip

        def row(label: str, values: list[float]) -> str:
            ratio = f" | {values[0] / values[1]:.2f}" if len(values) == 2 and values[1] > 0 else (
                " | -" if len(values) == 2 else "")
            return f"| {label} | " + " | ".join(f"{v:.1f}" for v in values) + ratio + " |"

        lines.append(row("wall time per step", [sides[s]["wall_ms_per_step"] for s in names]))
        lines.append(row("operators' sum", [sides[s]["operators_ms_per_step"] for s in names]))
        kinds = sorted({k for s in names for k in sides[s]["kinds"]},
                       key=lambda k: -max(sides[s]["kinds"].get(k, 0.0) for s in names))
        lines += [row(f"kind: {k}", [sides[s]["kinds"].get(k, 0.0) for s in names]) for k in kinds]
        operators = sorted({o for s in names for o in sides[s]["operators"]},
                           key=lambda o: -max(sides[s]["operators"].get(o, 0.0) for s in names))[:15]
        lines += [row(f"`{o}`", [sides[s]["operators"].get(o, 0.0) for s in names]) for o in operators]
        lines.append("")
    return "\n".join(lines)
