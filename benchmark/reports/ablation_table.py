"""The ablation study's table: each arm beside its full method, paired by category and seed.

    python -m adbench.benchmark.reports.ablation_table results/ablations_quick [more results folders]
                                       [--metrics image_auroc,pixel_auroc,pro] [--rows rstpm,stpm]
                                       [--plot results/ablations_quick/ablation_deltas.png]

For every row (a method, a variant of it, or a baseline) and category: mean +- std
over seeds of each metric (in %), and for a variant its delta to the full method
it ablates, computed seed by seed (same seed, same category) with the std of
those paired deltas. A baseline row gets the delta of the method compared with it,
so "full minus baseline" reads the same way as "full minus ablation": positive =
the full method is better. Which baseline a method is compared with is declared by
its sweep (``baselines:`` in the sweep YAML: the row on the same footing, e.g. POUTA
vs DRAEM on POUTA's frozen encoder) and recorded by each job; records from before
jobs recorded it take it from their sweep's YAML. The pairs are printed under the table. Rows come from the records of one results
or several folders (``runs/*.json``; where two hold the same name, category and
seed, the first folder's record counts); only ``ok`` records count, and the seeds
each mean covers are printed. A delta whose two records ran in different environments (another CPU
instruction set, other packages: the records' environment keys) is marked † and what differs is
printed: on a CPU whose instruction set the sweep does not pin (``cpu_isa``) that alone can move a
model trained from scratch by several points (``results/README.md``). ``--rows`` keeps the named rows only. ``--plot`` draws the same paired deltas as a forest plot, one
panel per metric: each seed as a dot, the mean with its std as a bar, per category.

The sweep YAMLs (``configs/sweeps/*.yaml``, or ``--sweeps``) say more about an arm: its
``partner``, a second row it is compared with the same way (partner minus arm; kind
"partner"), where the switch cannot keep the full method's map rule (``tsdn-one-stream``
against ``tsdn-map-reconstruction``); and its ``note``, a caveat numbered in the ``note``
column and printed under the table. Arms renamed since their records were written keep
their old name, with a note (``RENAMED``).

A job of the unified setting (one model for all categories, ``--setting unified``) gives one row
per category named ``<row> (unified)``, from its per-category metrics. It is compared with the
row of the same name trained per category, where there is one (per-category minus unified, by
category and seed), and its arms and baseline are its own unified rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from adbench.benchmark.orchestration.environment import environment_differences, environment_key  # noqa: E402
from adbench.benchmark.orchestration.records import FINISHED, iter_records, saturation_rate  # noqa: E402
from adbench.benchmark.reports.leaderboard import METRICS, runs_frame  # noqa: E402
from adbench.benchmark.reports.summary import declared_baselines  # noqa: E402  (one place: the summary uses them too)
from adbench.project import config_dir  # noqa: E402

#: Arms renamed after their records were written (committed results keep the old name): old name -> note.
RENAMED = {
    "rstpm-no-discriminator": "renamed rstpm-pairs-fusion-map (final map = the two pairs' maps fused) on "
    "2026-12-06; these records also built no discriminator and stopped after the students' 10 epochs, so "
    "they switch two things, the map and the discriminator",
}
#: The suffix of a unified-setting row's name.
UNIFIED = " (unified)"


def sweep_variants(paths: list[Path] | None = None) -> dict[str, dict[str, Any]]:
    """Every named variant of the sweep YAMLs (default: ``configs/sweeps/*.yaml``): name -> its definition."""
    paths = sorted((config_dir() / "sweeps").glob("*.yaml")) if paths is None else paths
    variants: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        for name, variant in (data.get("variants") or {}).items():
            variants.setdefault(name, variant)
    return variants


def partners(variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Arm -> the second row it is compared with (its variant's ``partner``)."""
    return {name: v["partner"] for name, v in variants.items() if v.get("partner")}


def notes(variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Row -> the caveat printed beside it: its variant's ``note``, or a renamed arm's."""
    return {**RENAMED, **{name: " ".join(str(v["note"]).split()) for name, v in variants.items() if v.get("note")}}


def unified_rows(runs: pd.DataFrame, baselines: dict[str, str]) -> tuple[pd.DataFrame, dict[str, str], dict[str, str]]:
    """The unified setting's rows renamed ``<name> (unified)`` (their method too, so that a unified arm
    is paired with the unified full method); returns them, each unified row's per-category namesake
    (its partner, where that row exists) and ``baselines`` extended to the unified rows."""
    unified = runs.setting == "unified"
    if not unified.any():
        return runs, {}, baselines
    runs = runs.copy()
    for column in ("name", "method"):
        runs.loc[unified, column] = runs.loc[unified, column] + UNIFIED
    present = set(runs.name)  # a per-category name never ends in UNIFIED
    namesakes = {name: name.removesuffix(UNIFIED) for name in set(runs.name[unified])
                 if name.removesuffix(UNIFIED) in present}  # fmt: skip
    unified_baselines = {method + UNIFIED: baseline + UNIFIED for method, baseline in baselines.items()
                         if {method + UNIFIED, baseline + UNIFIED} <= present}  # fmt: skip
    return runs, namesakes, {**baselines, **unified_baselines}


def _finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.status.isin(FINISHED)]


def paired_deltas(runs: pd.DataFrame, metrics: list[str], baselines: dict[str, str] | None = None,
                  partner_of: dict[str, str] | None = None) -> pd.DataFrame:  # fmt: skip
    """Long form, one row per comparison, category, seed and metric: ``delta`` = full minus other, in points;
    ``crossed``: the two records' environment keys are both known and differ.

    ``row`` is the other side: an arm of ``vs`` (``kind`` "ablation"), ``vs``'s baseline
    (``kind`` "baseline", from ``baselines``: :func:`declared_baselines`), or an arm whose
    partner is ``vs`` (``partner_of``: arm -> partner row, :func:`partners`; ``kind``
    "partner"). Only seeds both sides ran are paired.
    """
    ok = _finished(runs)
    baselines = baselines or {}
    # A variant that is a baseline (DRAEM on POUTA's encoder) is compared with what it is the baseline of, not
    # taken for an ablation of its method.
    pairs = [(name, method, "ablation") for name, method in ok[["name", "method"]].drop_duplicates().itertuples(
        index=False) if name != method and name not in baselines.values()]  # fmt: skip
    pairs += [(arm, partner, "partner") for arm, partner in (partner_of or {}).items()]
    pairs += [(baseline, method, "baseline") for method, baseline in baselines.items()]
    out = []
    for row, full_name, kind in pairs:
        for category in sorted(ok.category.unique()):
            full = ok[(ok.name == full_name) & (ok.category == category)].set_index("seed")
            other = ok[(ok.name == row) & (ok.category == category)].set_index("seed")
            for metric in metrics:
                delta = full[metric].sub(other[metric]).dropna() * 100
                for seed, value in delta.items():
                    envs = (full.environment.get(seed), other.environment.get(seed))
                    crossed = all(isinstance(e, str) for e in envs) and envs[0] != envs[1]
                    out.append({"category": category, "row": row, "vs": full_name, "kind": kind, "seed": seed,
                                "metric": metric, "delta": value, "crossed": crossed, "environments": envs})
    return pd.DataFrame(out, columns=["category", "row", "vs", "kind", "seed", "metric", "delta", "crossed",
                                     "environments"])


def baselines_line(runs: pd.DataFrame, baselines: dict[str, str]) -> str:
    """Which baseline each method's delta is against (and where the baseline has no records, so no delta)."""
    present = set(_finished(runs).name)
    shown = [f"{row} vs {baseline}" + ("" if baseline in present else " (no records: no delta)")
             for row, baseline in baselines.items() if row in present]
    return ("Baselines (same encoder and budget; the sweeps' `baselines:`): " + ", ".join(shown) + "."
            if shown else "No method of these records declares a baseline.")


def _cell(values: pd.Series) -> str:
    values = values.dropna() * 100
    if values.empty:
        return "-"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def _delta(paired: pd.Series, crossed: bool = False) -> str:
    if paired.empty:
        return "-"
    mark = " †" if crossed else ""
    if len(paired) == 1:
        return f"{paired.iloc[0]:+.1f}{mark}"
    return f"{paired.mean():+.1f} ± {paired.std(ddof=1):.1f}{mark}"


def crossed_line(deltas: pd.DataFrame, environments: dict[str, dict[str, Any]]) -> str | None:
    """The † footnote: how many deltas pair records of different environments and what differs between
    them (``environments``: environment key -> a record's environment); None when none do."""
    crossed = deltas[deltas.crossed.astype(bool)]
    if crossed.empty:
        return None
    keys = sorted({key for pair in crossed.environments for key in pair})
    differing = environment_differences([environments[k] for k in keys if k in environments])
    return (f"† {len(crossed)} of {len(deltas)} paired deltas compare records of different environments "
            f"({', '.join(differing) or 'environment keys'} differ): a CPU's instruction set alone can move a "
            "model trained from scratch by several points; read those deltas as across machines, not across ideas.")


def ablation_table(runs: pd.DataFrame, metrics: list[str], deltas: pd.DataFrame | None = None,
                   baselines: dict[str, str] | None = None, row_notes: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (category, row name): mean ± std per metric and the paired delta to the full method.

    ``deltas``: :func:`paired_deltas` of the same runs, metrics and ``baselines``, where the caller already has them.
    ``row_notes`` (row -> caveat, :func:`notes`): a ``note`` column numbers the rows that have one;
    :func:`footnotes` gives the texts.
    """
    ok = _finished(runs)
    if deltas is None:
        deltas = paired_deltas(runs, metrics, baselines)
    numbers = _note_numbers(ok, row_notes or {})
    rows = []
    for (category, name), group in ok.groupby(["category", "name"], sort=True):
        row = {"category": category, "row": name, "seeds": ",".join(str(s) for s in sorted(group.seed))}
        if name in numbers:
            row["note"] = f"[{numbers[name]}]"
        for metric in metrics:
            row[metric] = _cell(group[metric])
        mine = deltas[(deltas.category == category) & (deltas.row == name)]
        if not mine.empty:
            # An arm has its full method (and maybe a partner); a baseline lists every method built on it
            # ("pouta: ..., tsdn: ..."). Where a row has several sides, each delta names its side.
            named = (mine.kind == "baseline").all() or mine.vs.nunique() > 1
            row["vs"] = ",".join(dict.fromkeys(mine.vs))
            for metric in metrics:
                cells = [(f"{vs}: " if named else "") + _delta(g.delta, g.crossed.astype(bool).any())
                         for vs, g in mine[mine.metric == metric].groupby("vs", sort=False)]  # fmt: skip
                row[f"Δ {metric}"] = ", ".join(cells)
        rows.append(row)
    columns = ["category", "row", "seeds", *metrics, "vs", *(f"Δ {m}" for m in metrics)]
    if numbers:
        columns.insert(2, "note")
    return pd.DataFrame(rows).reindex(columns=columns).fillna("")


def _note_numbers(runs: pd.DataFrame, row_notes: dict[str, str]) -> dict[str, int]:
    """Footnote numbers of the rows present that have a note, in row-name order."""
    present = sorted(name for name in set(runs.name) if name in row_notes)
    return {name: i for i, name in enumerate(present, start=1)}


def footnotes(runs: pd.DataFrame, row_notes: dict[str, str]) -> list[str]:
    """The texts behind the table's ``note`` column: ``[n] row: note``."""
    numbers = _note_numbers(_finished(runs), row_notes)
    return [f"[{i}] {name}: {row_notes[name]}" for name, i in numbers.items()]


def plot_deltas(deltas: pd.DataFrame, path: Path) -> Path:
    """Forest plot of the paired deltas: one panel per metric, one line per comparison, one colour per category."""
    metrics = list(dict.fromkeys(deltas.metric))
    label_of = {
        (vs, row): f"{vs} vs {row} (baseline)" if kind == "baseline" else f"{vs} vs {row.removeprefix(vs + '-')}"
        for vs, row, kind in deltas[["vs", "row", "kind"]].drop_duplicates().itertuples(index=False)
    }
    # Each method's comparisons together, its baseline first.
    order = sorted(label_of.values(), key=lambda label: (label.split(" vs ")[0], "(baseline)" not in label, label))
    y_of = {label: i for i, label in enumerate(order)}
    categories = sorted(deltas.category.unique())
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 2.5, 0.32 * len(order) + 1.5),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.axvline(0, color="0.4", lw=0.8)
        for k, category in enumerate(categories):
            offset = (k - (len(categories) - 1) / 2) * 0.3
            part = deltas[(deltas.metric == metric) & (deltas.category == category)]
            for (vs, row), group in part.groupby(["vs", "row"], sort=False):
                y = y_of[label_of[(vs, row)]] + offset
                std = group.delta.std(ddof=1) if len(group) > 1 else 0.0
                ax.errorbar(group.delta.mean(), y, xerr=std, fmt="o", ms=4, color=colours(k), capsize=2)
                crossed = group.crossed.astype(bool)
                ax.scatter(group.delta[~crossed], [y] * int((~crossed).sum()), s=6, color=colours(k), alpha=0.45, lw=0)
                # A delta across environments (another CPU, other packages) is drawn as a cross.
                ax.scatter(group.delta[crossed], [y] * int(crossed.sum()), s=18, color=colours(k), marker="x", lw=0.8)
        ax.set_title(f"Δ {METRICS.get(metric, metric)} (points)", fontsize=9)
        ax.grid(axis="x", lw=0.3)
    axes[0, 0].set_yticks(range(len(order)), order, fontsize=8)
    axes[0, 0].invert_yaxis()
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours(k)) for k in range(len(categories))]
    fig.legend(handles, categories, loc="upper right", fontsize=8)
    fig.suptitle("full method minus ablation or baseline, paired by seed (> 0: the full method is better); "
                 "dot: one seed (cross: the two sides ran in different environments), bar: mean ± std",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", metavar="results_dir")
    parser.add_argument("--metrics", default="image_auroc,pixel_auroc,pro")
    parser.add_argument("--rows", help="comma-separated row names to keep (default: all)")
    parser.add_argument("--plot", type=Path, help="also write the paired deltas as a forest plot (PNG)")
    parser.add_argument("--sweeps", type=Path, nargs="+", metavar="SWEEP_YAML",
                        help="sweep YAMLs whose variants give partners and notes (default: configs/sweeps/*.yaml)")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        parser.error(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    records: dict[tuple, dict] = {}
    for folder in args.results_dirs:  # the same job in two folders: the first folder's record wins
        for r in iter_records(Path(folder)):
            categories = r.get("categories") or str(r.get("category") or "").split(",")  # older records: "category"
            records.setdefault((r.get("name") or r.get("method"), tuple(categories), r.get("seed")), r)
    runs = runs_frame(list(records.values()))
    if args.rows:
        runs = runs[runs.name.isin(args.rows.split(","))]
    kept = set(runs.name)
    variants = sweep_variants(args.sweeps)
    runs, namesakes, baselines = unified_rows(runs, declared_baselines(list(records.values())))
    deltas = paired_deltas(runs, metrics, baselines, {**partners(variants), **namesakes})
    row_notes = notes(variants)
    row_notes.update({name + UNIFIED: text for name, text in row_notes.items()})  # a unified arm's caveat is its arm's
    print(ablation_table(runs, metrics, deltas, row_notes=row_notes).to_markdown(index=False))
    texts = footnotes(runs, row_notes)
    if texts:
        print("\n" + "\n".join(texts))
    environments = {environment_key(r.get("environment")): r.get("environment") for r in records.values()}
    crossed = crossed_line(deltas, {key: env for key, env in environments.items() if key is not None})
    if crossed:
        print("\n" + crossed)
    print("\n" + baselines_line(runs, baselines))
    saturated, validated = saturation_rate([r for r in records.values() if (r.get("name") or r.get("method"))
                                            in kept])  # fmt: skip
    print(f"Validation saturated in {saturated} of {validated} jobs (records.selection_saturation).")
    if args.plot:
        if deltas.empty:
            parser.error(f"no arm or baseline in {' '.join(args.results_dirs)} shares a category and seed with its full method")
        print(f"\nforest plot: {plot_deltas(deltas, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
