"""Job records -> a report a person reads: the answer first, tables with intervals, the maps of
every method on the same test images, published references, and tests that fit the design.

    python -m adbench.benchmark.reports.leaderboard RESULTS_DIR [--sweep-name NAME] [--output DIR]

Writes into RESULTS_DIR (or ``--output``):

* ``runs.csv``: one row per job (metrics in 0..1, their 95 % bootstrap intervals, status,
  warnings, commit, whether the record is stale, its per-image score file);
* ``leaderboard_<metric>.csv``: rows = method (profile), sorted by the metric's mean, per category
  the mean and std over seeds and the mean interval bounds, the mean over categories when complete;
* ``leaderboard.md`` / ``leaderboard.html``: the answer (``summary.py``: best per headline metric,
  margin over the runner-up, interval, paired test; each seed method against its baseline), the
  header (dataset names, profile, seeds, commits, environments, date), every metric table
  (sortable in the page, colour scale, best in bold, one note per row for stale, warned or
  other-environment records, the difference to the best row with its test), the gallery
  (``gallery.py``), the figures (``figures.py``), ours vs published, the tests across categories
  (categories as blocks, only with enough of them), and every failed, warned, stale or
  unreadable record. The HTML page embeds its pictures (``html.py``);
* ``leaderboard_bars.png``, ``leaderboard_speed.png``, ``leaderboard_heatmap.png``,
  ``leaderboard_cd_<metric>.png``.

What a table covers: the jobs of one sweep (those passed by the runner, or the records of
the sweep named by ``--sweep-name``, by default the one of the newest record); records of
other sweeps in the folder are counted in the header and left out. A mean over categories
is shown only when every job of the row finished; otherwise ``n/a (k of n)`` and the
partial mean, marked as such.
"""

from __future__ import annotations

import argparse
import html
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adbench.benchmark.orchestration import records as job_records
from adbench.benchmark.orchestration.environment import environment_differences, environment_key
from adbench.benchmark.orchestration.records import FINISHED, scan_records
from adbench.benchmark.orchestration.sweep import JobSpec
from adbench.benchmark.reports import figures, gallery, paired, published, statistics, summary
from adbench.benchmark.reports.html import Cell, Report, scan_table
from adbench.callbacks.metrics import METRIC_LABELS

#: Every metric a record may carry, in the order of the report's tables (a metric no record of the report has,
#: from before it existed, gets no table), and those every record has had since the first sweep (always a table).
METRICS, ALWAYS_SHOWN = METRIC_LABELS, ("image_auroc", "pixel_auroc", "pro", "image_f1max", "pixel_f1max")
EFFICIENCY = {
    "test_images_per_second": "img/s",
    "fit_seconds": "fit s",
    "peak_memory_mb": "peak MB",
    "parameters_m": "params M",
}
#: A row whose mean pixel AUROC is below this is flagged: its maps say little at its budget.
MEANINGFUL_PIXEL_AUROC = 0.70
RUN_COLUMNS = [
    "name", "method", "profile", "dataset", "setting", "shots", "category", "seed", "status", *METRICS,
    *(f"{m}_{end}" for m in METRICS for end in ("low", "high")), "val_saturated", "baseline", "warnings",
    "fit_seconds", "test_seconds", "test_images_per_second", "train_steps_per_second",
    "fit_peak_memory_mb", "test_peak_memory_mb", "parameters", "precision", "devices", "max_epochs",
    "error", "job_id", "sweep", "root", "git_commit", "environment", "stale", "device", "host", "finished",
    "image_scores",
]  # fmt: skip


# ----------------------------------------------------------------------------- records -> frame


def _is_stale(record: dict[str, Any]) -> bool | None:
    """Whether the record was made by other code or config than today's (None: cannot tell)."""
    try:
        spec = JobSpec(**{k: record[k] for k in JobSpec.__dataclass_fields__ if k in record})
        return spec.fingerprint() != record.get("fingerprint")
    except Exception:  # noqa: BLE001 - a record of a method or field that no longer exists
        return None


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per job and category, flat (a unified job tested on n categories gives n rows)."""
    rows = []
    for r in records:
        timing, env, intervals = r.get("timing") or {}, r.get("environment") or {}, r.get("intervals") or {}
        row = {
            "name": r.get("name") or r.get("method"),
            **{k: r.get(k) for k in ("method", "seed", "status", "precision", "sweep",
                                     "devices", "error", "job_id", "finished", "parameters", "image_scores",
                                     "root", "shots")},
            "dataset": r.get("dataset") or "mvtec",
            "setting": r.get("setting") or "per-category",
            # Which protocol, dataset, setting and shots produced the row is part of its name.
            "profile": _profile_label(r.get("profile") or "", r.get("protocol"), r.get("dataset"),
                                      r.get("shots"), r.get("setting")),
            "val_saturated": job_records.record_saturated(r),
            "baseline": r.get("baseline"),  # the row it is compared with (summary.declared_baselines)
            "warnings": "; ".join(r.get("warnings") or []) or None,
            **{m: (r.get("metrics") or {}).get(m) for m in METRICS},
            **{f"{m}_{end}": (intervals.get(m) or [None, None])[i]
               for m in METRICS for i, end in enumerate(("low", "high"))},
            **{k: timing.get(k) for k in ("fit_seconds", "test_seconds", "test_images_per_second",
                                          "train_steps_per_second", "fit_peak_memory_mb",
                                          "test_peak_memory_mb")},
            "max_epochs": ((r.get("config") or {}).get("trainer") or {}).get("max_epochs"),
            "git_commit": env.get("git_commit"),
            "environment": environment_key(env),
            "stale": _is_stale(r),
            "device": env.get("device"),
            "host": env.get("host"),
        }  # fmt: skip
        # Records before 2026-12-05 name their categories in one comma-joined "category".
        categories = r.get("categories") or str(r.get("category") or "").split(",")
        if len(categories) == 1:
            rows.append({**row, "category": categories[0]})
            continue
        # Unified: the job's own metrics and intervals are over all categories; each category's row
        # gets that category's metrics (no interval: the bootstrap resampled the union).
        by_category = r.get("metrics_by_category") or {}
        for category in categories:
            rows.append({**row, "category": category,
                         **{m: (by_category.get(category) or {}).get(m) for m in METRICS},
                         **{f"{m}_{end}": None for m in METRICS for end in ("low", "high")}})
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    frame["row"] = [_row_name(m, p) for m, p in zip(frame.name, frame.profile, strict=True)]
    return frame.sort_values(["name", "profile", "category", "seed"], ignore_index=True)


def _profile_label(profile: str, protocol: str | None, dataset: str | None = None, shots: int | None = None,
                   setting: str | None = None) -> str:
    parts = [profile]
    if protocol == "paper":
        parts.append("paper protocol")
    if setting == "unified":
        parts.append("unified")
    if shots is not None:
        parts.append(f"{shots}-shot")
    label = ", ".join(parts)
    return label if dataset in (None, "mvtec") else f"{label}; {dataset}"


def _row_name(method: str, profile: str) -> str:
    return f"{method} ({profile})"


def select_sweep(records: list[dict[str, Any]], jobs: Sequence[JobSpec] | None, sweep_name: str | None
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records of one sweep, and how many records of other sweeps were left out (by name)."""
    if jobs is not None:
        wanted = {j.job_id for j in jobs}
        chosen = [r for r in records if r.get("job_id") in wanted]
    else:
        if sweep_name is None and records:
            sweep_name = max(records, key=lambda r: r.get("finished_unix") or 0).get("sweep")
        chosen = [r for r in records if r.get("sweep") == sweep_name]
    left: dict[str, int] = {}
    for r in records:
        if r not in chosen:
            left[str(r.get("sweep"))] = left.get(str(r.get("sweep")), 0) + 1
    return chosen, left


# ----------------------------------------------------------------------------- tables


def metric_table(runs: pd.DataFrame, metric: str, expected: pd.DataFrame) -> pd.DataFrame:
    """Rows = method (profile); per category mean/std over seeds and mean interval bounds; the
    mean over categories (complete rows only) and its seed-to-seed std; efficiency."""
    done = runs[runs.status.isin(FINISHED)]
    categories = list(dict.fromkeys(expected.category))
    rows = list(dict.fromkeys(expected.row))
    table = pd.DataFrame(index=pd.Index(rows, name="method"))
    grouped = done.groupby(["row", "category"])
    means, stds = grouped[metric].mean().unstack(), grouped[metric].std(ddof=1).unstack()
    lows, highs = grouped[f"{metric}_low"].mean().unstack(), grouped[f"{metric}_high"].mean().unstack()
    for category in categories:
        table[category] = means.get(category)
        table[f"{category}_std"] = stds.get(category)
        table[f"{category}_low"] = lows.get(category)
        table[f"{category}_high"] = highs.get(category)
    finished = done.dropna(subset=[metric]).groupby("row").size()
    table["jobs_finished"] = finished.reindex(table.index).fillna(0).astype(int)
    table["jobs_expected"] = expected.groupby("row").size().reindex(table.index).fillna(0).astype(int)
    table["complete"] = table.jobs_finished == table.jobs_expected
    # Mean over categories per seed, then mean/std across seeds: the std is the seed-to-seed spread.
    per_seed = done.groupby(["row", "seed"])[metric].mean().groupby("row")
    table["mean"] = per_seed.mean().where(table.complete)
    table["mean_std"] = per_seed.std(ddof=1).where(table.complete)
    table["partial_mean"] = means.mean(axis=1).reindex(table.index).where(~table.complete)
    efficiency = done.assign(
        peak_memory_mb=done[["fit_peak_memory_mb", "test_peak_memory_mb"]].max(axis=1),
        parameters_m=done.parameters / 1e6,
    ).groupby("row")[list(EFFICIENCY)].mean()
    return table.join(efficiency)


def by_dataset(runs: pd.DataFrame, table: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """The table split by dataset (rows and category columns of each), or ``[(None, table)]``
    when the sweep covers one dataset: a mean over categories never mixes datasets."""
    datasets = runs.groupby("row").dataset.first()
    names = list(dict.fromkeys(datasets.reindex(table.index).fillna("mvtec")))
    if len(names) < 2:
        return [(None, table)]
    parts = []
    for name in names:
        others = set(runs.category[runs.dataset != name]) - set(runs.category[runs.dataset == name])
        drop = [f"{c}{suffix}" for c in others for suffix in ("", "_std", "_low", "_high")]
        rows = [r for r in table.index if datasets.get(r, "mvtec") == name]
        parts.append((name, table.loc[rows].drop(columns=[c for c in drop if c in table.columns])))
    return parts


def weak_rows(pixel_auroc: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """A warning per row whose (partial) mean pixel AUROC is below MEANINGFUL_PIXEL_AUROC, with its budget."""
    lines = []
    mean = pixel_auroc["mean"].fillna(pixel_auroc["partial_mean"])
    for row, value in mean[mean < MEANINGFUL_PIXEL_AUROC].items():
        epochs = sorted({int(e) for e in runs.loc[runs.row == row, "max_epochs"].dropna()})
        budget = f"{'/'.join(map(str, epochs))} epoch(s)" if epochs else "this sweep's budget"
        lines.append(f"Read with care: {row} has a mean pixel AUROC of {_percent(value)} % (< "
                     f"{_percent(MEANINGFUL_PIXEL_AUROC)}): at {budget} its maps are far from what "
                     "the method reaches with training: the row checks the pipeline, not the method.")
    return lines


def sort_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Complete rows by their mean (best first), then incomplete ones by their partial mean."""
    key = table["mean"].fillna(table["partial_mean"] - 10.0)
    return table.loc[key.sort_values(ascending=False, na_position="last").index]


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(mean: float, std: float = np.nan, low: float = np.nan, high: float = np.nan) -> Cell:
    """A value in % with ``± std`` over seeds and ``[low, high]`` small beside it."""
    if pd.isna(mean):
        return Cell("-")
    small = ("" if pd.isna(std) else f"± {_percent(std)} ") + (
        "" if pd.isna(low) or pd.isna(high) else f"[{_percent(low)}, {_percent(high)}]")
    return Cell(_percent(mean), float(mean), small.strip())


def row_notes(runs: pd.DataFrame, ranking: summary.Ranking) -> dict[str, list[str]]:
    """Per row, what a reader must know about its records: failed, warned or stale jobs, jobs from another
    environment or commit than most, fewer seeds than the ranked rows. One note per row, not a tag in every cell."""
    notes: dict[str, list[str]] = {}
    usual_env = runs.environment.mode().iloc[0] if runs.environment.notna().any() else None
    usual_commit = runs.git_commit.mode().iloc[0] if runs.git_commit.notna().any() else None
    for row, part in runs.groupby("row", sort=False):
        items, n = [], len(part)
        failed = int((~part.status.isin(FINISHED)).sum())
        if failed:
            items.append(f"{failed} of {n} jobs failed")
        warned = int((part.status == "warning").sum())
        if warned:
            items.append(f"{warned} of {n} jobs finished with a warning")
        stale = int(part.stale.fillna(False).astype(bool).sum())
        if stale:
            items.append(f"{stale} of {n} records stale: made by other code or config than today's")
        if usual_env is not None and (part.environment != usual_env).any():
            items.append(f"{int((part.environment != usual_env).sum())} of {n} jobs from another environment")
        if usual_commit is not None and (part.git_commit != usual_commit).any():
            items.append(f"{int((part.git_commit != usual_commit).sum())} of {n} jobs from another commit")
        if str(row) in ranking.unranked:
            items.append(ranking.note(str(row)))
        if items:
            notes[str(row)] = items
    return notes


def metric_columns(table: pd.DataFrame, versus: dict[str, summary.Finding | None] | None = None
                   ) -> tuple[dict[str, list[Cell]], set[str], dict[str, bool]]:
    """The cells of one metric table: mean over categories, each category, the difference to the best
    row with its interval and test (``versus``: row -> best against that row), and efficiency."""
    categories = [c[: -len("_low")] for c in table.columns if c.endswith("_low")]
    columns: dict[str, list[Cell]] = {"mean": []}
    for row in table.index:
        if table.at[row, "complete"]:
            columns["mean"].append(_cell(table.at[row, "mean"], table.at[row, "mean_std"]))
        else:
            partial = table.at[row, "partial_mean"]
            columns["mean"].append(Cell(f"n/a ({table.at[row, 'jobs_finished']} of {table.at[row, 'jobs_expected']})",
                                        np.nan, "" if pd.isna(partial) else f"partial {_percent(partial)}"))
    for category in categories:
        columns[category] = [
            _cell(*(table.at[row, f"{category}{s}"] for s in ("", "_std", "_low", "_high"))) for row in table.index
        ]
    if versus is not None:
        columns["vs best"] = [_versus_cell(versus.get(row), row in versus) for row in table.index]
    for column, label in EFFICIENCY.items():
        columns[label] = [Cell("-" if pd.isna(v) else f"{v:.1f}" if v < 100 else f"{v:.0f}", v) for v in table[column]]
    return columns, {"mean", *categories}, {label: column == "test_images_per_second" for column, label in EFFICIENCY.items()}


def _versus_cell(finding: summary.Finding | None, compared: bool) -> Cell:
    if finding is None:  # the best row itself, or a row without every job (never compared)
        return Cell("best", np.inf) if compared else Cell("-", np.nan)
    if finding.p_value is None:
        return Cell(f"{-100 * finding.margin:+.1f}", -finding.margin, "untested", title=finding.reason)
    interval = "" if finding.interval is None else f"[{-100 * finding.interval[1]:+.1f}, {-100 * finding.interval[0]:+.1f}] "
    style = "background:#f6c8c8" if finding.significant else "background:#eeeeee"
    return Cell(f"{-100 * finding.margin:+.1f}", -finding.margin, f"{interval}{summary.format_p(finding.p_value).replace(' ', '')}", style,
                f"{finding.b} minus {finding.a}: {finding.verdict()}")


LEGEND = ("Each table is sorted by its own mean over categories (best first; click a header to sort by it). Cells: "
          "mean in %, small: ± std over seeds and [95 % bootstrap interval of the test set: the job's own with one "
          "seed, the mean of the seeds' bounds with several]. Best per column in bold. 'vs best': the row minus the "
          "best row in points, with the paired test of the summary (red: significantly worse). Superscripts: the "
          "notes under the first table.")


# ----------------------------------------------------------------------------- the report


def header(runs: pd.DataFrame, left_out: dict[str, int], errors: list[dict[str, str]]) -> list[str]:
    commits = runs.git_commit.fillna("unknown").map(lambda c: c[:10]).value_counts()
    # Dataset names only: a machine's folder says nothing to a reader and leaks its layout.
    datasets = sorted({str(d) for d, r in zip(runs.dataset, runs.root, strict=True) if r is not None and not pd.isna(r)})
    lines = [
        f"Sweep: {', '.join(sorted({str(s) for s in runs.sweep.dropna()})) or '-'}; "
        f"dataset: {', '.join(datasets) or 'embedded procedural dataset'}; "
        f"profile: {', '.join(sorted(set(runs.profile)))}; "
        f"seeds: {', '.join(str(s) for s in sorted(set(runs.seed.dropna().astype(int))))}; "
        f"categories: {runs.category.nunique()}.",
        f"Commits: {', '.join(f'{c} ({n} jobs)' for c, n in commits.items())}"
        + (" -- WARNING: records from different commits in one table." if len(commits) > 1 else "."),
        _environments_line(runs),
        f"Machine(s): {', '.join(sorted({f'{h} / {d}' for h, d in zip(runs.host.fillna('?'), runs.device.fillna('?'), strict=True)}))}; "
        f"built {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()}.",
    ]
    if left_out:
        lines.append("Not shown: " + ", ".join(f"{n} record(s) of sweep {s!r}" for s, n in sorted(left_out.items()))
                     + " in the same folder.")
    if errors:
        lines.append(f"{len(errors)} unreadable record file(s), listed below.")
    return lines


def _environments_line(runs: pd.DataFrame) -> str:
    keys = runs.environment.fillna("not recorded").value_counts()
    line = f"Environments: {', '.join(f'{k} ({n} jobs)' for k, n in keys.items())}"
    if len(keys) > 1:
        return line + " -- WARNING: records from different environments in one table (what differs: below)."
    return line + " (packages, Python, CPU, threads and numeric flags as recorded; see runs/<job>.json)."


def environments_table(records: list[dict[str, Any]]) -> pd.DataFrame | None:
    """What differs between the environments of ``records`` (one column per environment key), or
    None when they were all made in one environment."""
    by_key: dict[str, dict[str, Any]] = {}
    for r in records:
        env = r.get("environment") or {}
        by_key.setdefault(environment_key(env) or "not recorded", env)
    if len(by_key) < 2:
        return None
    differences = environment_differences(list(by_key.values()))
    return pd.DataFrame({key: [values[i] for values in differences.values()] for i, key in enumerate(by_key)},
                        index=pd.Index(list(differences), name="entry"))


def _published_section(report: Report, tables: dict[str, pd.DataFrame], runs: pd.DataFrame) -> None:
    plain = runs[runs.name == runs.method]
    row_methods = dict(zip(plain.row, plain.method, strict=True))
    report.heading("Ours vs published, per category")
    any_shown = False
    for metric in published.COMPARED:
        table = tables[metric]
        categories = [c[: -len("_low")] for c in table.columns if c.endswith("_low")]
        compared, notes = published.comparison(table[categories], row_methods, metric)
        if not compared.empty:
            any_shown = True
            shown = pd.DataFrame({"method": compared.method})
            for category in [*categories, "mean"]:
                if (category, "ours") not in compared:
                    continue
                shown[category] = [
                    "-" if pd.isna(o) or pd.isna(p) else f"{_percent(o)} vs {_percent(p)}{m} ({100 * (o - p):+.1f})"
                    for o, p, m in zip(*(compared[(category, k)] for k in ("ours", "published", "mark")), strict=True)
                ]
            shown["mean"] = [f"{cell} over {n}" for cell, n in zip(shown["mean"], compared[("mean", "categories")], strict=True)]
            shown["source"] = compared.source
            report.heading(f"{METRICS[metric]}: ours vs published (Δ)", 3)
            report.table(shown, index=False)
        for note in notes:
            report.text(note)
    if any_shown:
        report.text("Published: benchmark/reports/published/mvtec_ad.csv (figures as printed per category; the mean "
                    "column is over the categories both have, never the paper's 15-category mean). Settings "
                    "differ from ours (backbone, resolution, training budget): see each row's source. " + published.LEGEND)
    else:
        report.text("No row of this sweep is a method with published per-category MVTec AD figures "
                    "in benchmark/reports/published/mvtec_ad.csv for these categories.")


def _significance_section(report: Report, runs: pd.DataFrame, tables: dict[str, pd.DataFrame],
                          output_dir: Path) -> None:
    report.heading("Significance")
    report.text("Per category, paired by test image: the summary's and the tables' 'vs best' tests (a paired "
                "bootstrap over the test images, each method's seeds averaged inside every resample). Across "
                f"categories: Wilcoxon signed-rank and Friedman / Nemenyi with categories as blocks (each method's "
                f"seed mean), only with >= {statistics.MIN_BLOCKS} categories: with 5 the exact two-sided Wilcoxon "
                "p-value cannot go below 0.05. Seeds share a category's test images, so they never count as blocks.")
    done = runs[runs.status.isin(FINISHED)]
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        if metric not in tables:
            continue
        block = statistics.blocks(done, metric)
        report.heading(METRICS[metric], 3)
        wilcoxon, note = statistics.wilcoxon_table(block)
        report.text(note)
        if wilcoxon is not None:
            order = [r for r in tables[metric].index if r in block.values.columns]
            report.raw(*statistics.pairwise_matrix(wilcoxon, order))
        friedman, note = statistics.friedman_nemenyi(block)
        report.text(note)
        if friedman is not None:
            path = statistics.cd_diagram(
                friedman, f"{METRICS[metric]}: average rank (1 = best), Nemenyi CD at {statistics.ALPHA}",
                output_dir / f"leaderboard_cd_{metric}.png",
            )
            report.image(path, f"critical-difference diagram, {metric}")


def _problems_section(report: Report, runs: pd.DataFrame, errors: list[dict[str, str]]) -> None:
    failed = runs[~runs.status.isin(FINISHED)][["job_id", "error"]]
    if len(failed):
        report.heading("Failed jobs")
        report.table(failed, index=False)
    warned = runs[runs.status == "warning"][["job_id", "warnings"]]
    if len(warned):
        report.heading("Jobs with warnings")
        report.table(warned, index=False)
    stale = runs[runs.stale.fillna(False).astype(bool)][["job_id", "git_commit", "finished"]]
    if len(stale):
        report.heading("Stale records")
        report.text("Made by other code, config or machine than today's (their fingerprint differs): "
                    "a resumed sweep reruns them.")
        report.table(stale, index=False)
    if errors:
        report.heading("Unreadable records")
        report.table(pd.DataFrame(errors), index=False)


def build_leaderboard(
    results_dir: str | Path,
    jobs: Sequence[JobSpec] | None = None,
    sweep_name: str | None = None,
    sort_by: str = "image_auroc",
    output_dir: str | Path | None = None,
    n_resamples: int = paired.N_RESAMPLES,
    with_gallery: bool = True,
) -> dict[str, pd.DataFrame]:
    """Write every leaderboard file into ``output_dir`` (default ``results_dir``); return the numeric
    tables, each sorted by its own metric.

    ``with_gallery=False`` leaves the gallery out: its cells are pictures of the dataset's test
    images, which a folder that will be shared (committed, published) must not carry when the
    dataset's licence forbids copies.

    ``jobs``: the sweep's jobs (from the runner): the table covers exactly them, and a job
    without a record counts as missing. Otherwise the records of ``sweep_name`` (default:
    the sweep of the newest record).
    """
    if sort_by not in METRICS:
        raise ValueError(f"sort_by {sort_by!r} is not one of {list(METRICS)}")
    results_dir = Path(results_dir)
    records, errors = scan_records(results_dir)
    if not records and not errors:
        raise FileNotFoundError(f"no job records under {str(results_dir / 'runs')!r}")
    chosen, left_out = select_sweep(records, jobs, sweep_name)
    runs = runs_frame(chosen)
    output_dir = results_dir if output_dir is None else Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["row"]).to_csv(output_dir / "runs.csv", index=False)
    if jobs is not None:
        expected = pd.DataFrame(
            [{"row": _row_name(j.name, _profile_label(j.profile, j.protocol, j.dataset, j.shots, j.setting)),
              "category": category} for j in jobs for category in j.categories],
            columns=["row", "category"],
        )
    else:  # every row is expected in every category of its dataset in the sweep, with the seeds it was run with
        categories = runs.groupby("dataset", sort=False).category.unique()
        seeds, datasets = runs.groupby("row").seed.unique(), runs.groupby("row").dataset.first()
        expected = pd.DataFrame(
            [{"row": row, "category": c} for row in dict.fromkeys(runs.row)
             for c in categories[datasets[row]] for _ in seeds[row]],
            columns=["row", "category"],
        )
    present = [m for m in METRICS if m in ALWAYS_SHOWN or runs[m].notna().any()]
    # Each table sorted by its own metric; figures and the gallery follow ``sort_by``'s order.
    tables = {metric: sort_rows(metric_table(runs, metric, expected)) for metric in present}
    order = list(tables[sort_by].index)
    for metric, table in tables.items():
        table.to_csv(output_dir / f"leaderboard_{metric}.csv", float_format="%.6f")

    evidence = summary.Evidence(runs, results_dir, n_resamples)
    report = Report(f"Leaderboard: {', '.join(sorted({str(s) for s in runs.sweep.dropna()})) or 'sweep'}")
    ranking = summary.Ranking.of(runs)
    notes = row_notes(runs, ranking)
    done = int(runs.status.isin(FINISHED).sum())
    if done:
        findings = summary.answer_section(report, tables, runs, evidence, ranking)
        summary.findings_frame(findings).to_csv(output_dir / "leaderboard_summary.csv", index=False)
    for line in header(runs, left_out, errors):
        report.text(line, "meta")
    report.text(LEGEND, "meta")
    note_number = {row: k + 1 for k, row in enumerate(notes)}
    for k, (metric, table) in enumerate(tables.items()):
        report.heading(f"{METRICS[metric]} (%)", anchor=f"table-{metric}")
        complete = table["mean"].dropna()
        contenders = complete[complete.index.isin(ranking.ranked)]  # the answer's: fewer seeds are compared, not ranked
        versus = None
        if len(complete) >= 2 and len(contenders) and metric in summary.HEADLINE:
            best = contenders.index[0]
            versus = {row: None if row == best else evidence.compare(table, metric, best, row) for row in complete.index}
        for dataset, part in by_dataset(runs, table):
            if dataset is not None:
                report.text(f"Dataset: {dataset}")
            columns, scaled, higher = metric_columns(part, versus)
            labels = {row: html.escape(row) + (f"<sup>{note_number[row]}</sup>" if row in note_number else "")
                      for row in part.index}
            page, markdown = scan_table(list(part.index), columns, labels, scaled, higher)
            report.raw(page.replace("<table class='sortable metric'>",
                                    f"<table class='sortable metric' data-metric='{metric}'>"),
                       markdown.replace("\n| ", "\n| ").replace("|:", "|:"))
        if k == 0 and notes:
            lines = [f"{note_number[row]}. {row}: {'; '.join(items)}." for row, items in notes.items()]
            report.raw("<ol class='notes'>" + "".join(f"<li>{html.escape(line.split('. ', 1)[1])}</li>"
                                                      for line in lines) + "</ol>", "\n".join(lines))
    footer = f"{done} of {len(expected)} jobs finished ({int((runs.status == 'warning').sum())} with warnings)."
    saturated, validated = job_records.saturation_rate(chosen)
    if validated:  # definition: adbench.benchmark.orchestration.records.selection_saturation
        rows = sorted(set(runs[runs.val_saturated.fillna(False).astype(bool)].row))
        footer += (f" Validation saturated in {saturated} of {validated} jobs (best score 1, or first validation"
                   f" never beaten: checkpoint selection could not rank)" + (f": {', '.join(rows)}." if rows else "."))
    report.text(footer)
    for line in weak_rows(tables["pixel_auroc"], runs):
        report.text(line)
    if done:
        _pictures_section(report, tables, runs, results_dir, output_dir, order, with_gallery)
    if chosen:
        _published_section(report, tables, runs)
        _significance_section(report, runs, tables, output_dir)
    _problems_section(report, runs, errors)
    differences = environments_table(chosen)
    if differences is not None:
        report.heading("Environments that differ")
        report.text("Rows of one table were made in these environments (column: environment key, as in runs.csv); "
                    "each entry below differs between them, so their numbers may too.")
        report.table(differences.astype(str))
    scores = runs.dropna(subset=["image_scores"])
    if len(scores):
        report.heading("Per-image scores")
        report.links("One CSV per job (path, defect type, label, score, validation F1 threshold), relative to the "
                     "results folder:", list(zip(scores.job_id, scores.image_scores, strict=True)))
    report.write(output_dir / "leaderboard.md", output_dir / "leaderboard.html")
    return tables


def _pictures_section(report: Report, tables: dict[str, pd.DataFrame], runs: pd.DataFrame, results_dir: Path,
                      output_dir: Path, order: list[str], with_gallery: bool) -> None:
    ordered = {metric: table.loc[order] for metric, table in tables.items()}
    gallery.section(report, runs, results_dir, order, output_dir, with_gallery)
    report.heading("Pictures")
    report.image(figures.bars(ordered, output_dir / "leaderboard_bars.png"), "per-category bars")
    speed = figures.speed_quality(ordered, output_dir / "leaderboard_speed.png")
    if speed is not None:
        report.image(speed, "speed against quality")
    report.image(figures.heatmap(ordered, output_dir / "leaderboard_heatmap.png"), "heatmap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--sweep-name", help="the sweep whose records to show (default: the newest record's)")
    parser.add_argument("--sort-by", default="image_auroc", choices=list(METRICS),
                        help="the metric whose order the figures and the gallery follow")
    parser.add_argument("--output", type=Path, help="write the report here instead of into results_dir")
    parser.add_argument("--no-gallery", dest="with_gallery", action="store_false",
                        help="leave out the gallery of test images (for a folder to be committed or published "
                             "when the dataset's licence forbids copies)")
    args = parser.parse_args()
    build_leaderboard(args.results_dir, sweep_name=args.sweep_name, sort_by=args.sort_by, output_dir=args.output,
                      with_gallery=args.with_gallery)
    print((args.output or Path(args.results_dir)) .joinpath("leaderboard.md").read_text())


if __name__ == "__main__":
    main()
