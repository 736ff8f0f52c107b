"""The answer first: per headline metric the best method, its margin over the runner-up with an
interval, and whether the margin is significant by a test that fits the design; then whether each
seed method beats the baseline it builds on.

Which test fits (in this order):

* the metric has per-image evidence for both rows (image AUROC: the score files; pixel AUROC and
  pixel AP: the per-image pixel histograms): the paired bootstrap over test images of
  :mod:`paired` (seeds averaged inside each resample, categories resampled on their own);
* otherwise, with at least :data:`statistics.MIN_BLOCKS` categories: the Wilcoxon signed-rank test
  over categories (seed-averaged), no interval;
* otherwise: no test, and the line says why.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from scipy import stats

from adbench.benchmark.orchestration.records import FINISHED
from adbench.benchmark.reports import paired, statistics
from adbench.benchmark.reports.html import Report
from adbench.callbacks.metrics import METRIC_LABELS
from adbench.project import config_dir


@functools.cache
def _sweep_baselines() -> dict[str, dict[str, str]]:
    """``baselines:`` of every sweep YAML of the checkout, by sweep name."""
    found = {}
    for path in sorted((config_dir() / "sweeps").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        found[str(data.get("name", path.stem))] = dict(data.get("baselines") or {})
    return found


def declared_baselines(records: list[dict[str, Any]]) -> dict[str, str]:
    """Row -> the row it is compared with on the same footing (same encoder, same budget: POUTA vs
    DRAEM on POUTA's frozen encoder), as the records' jobs declare it (``baseline``, from their
    sweep's ``baselines:``); a record that declares none takes its sweep's YAML (records from before
    2026-12-06). The ablation table and the summary compare these pairs; the first declaration wins."""
    pairs: dict[str, str] = {}
    for r in records:
        baseline = r.get("baseline")
        declared = {r.get("name") or r.get("method"): baseline} if isinstance(baseline, str) and baseline \
            else _sweep_baselines().get(str(r.get("sweep")), {})
        for row, other in declared.items():
            pairs.setdefault(row, other)
    return pairs
#: The metrics the summary answers for, where the sweep has them.
HEADLINE = ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "pro_fpr05", "mad")
#: Why a headline metric has no paired test over images.
NO_EVIDENCE = {
    "mad": "mAD averages seven metrics, image F1-max and AP among them, which have no paired test here",
}


@dataclass
class Finding:
    """Row a against row b on one metric: a - b in 0..1, its interval and p, or why untested."""

    metric: str
    a: str
    b: str
    value_a: float
    value_b: float
    test: str  # which test, or "" when none ran
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    reason: str = ""
    subset: str = ""  # where the test saw only some jobs: which, and the difference there
    kind: str = "headline"  # or "baseline": a seed method against the method it builds on

    @property
    def margin(self) -> float:
        return self.value_a - self.value_b

    @property
    def significant(self) -> bool | None:
        return None if self.p_value is None else self.p_value < paired.ALPHA

    def verdict(self) -> str:
        if self.p_value is None:
            return f"not tested: {self.reason}"
        interval = "" if self.interval is None else f", 95 % CI [{_points(self.interval[0])}, {_points(self.interval[1])}]"
        word = "significant" if self.significant else "not significant"
        return f"{word} ({format_p(self.p_value)}, {self.test}{interval}{self.subset})"


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


class Evidence:
    """The resampled figures per metric, computed once and shared by the summary and the tables."""

    def __init__(self, runs: pd.DataFrame, results_dir: Path, n_resamples: int = paired.N_RESAMPLES) -> None:
        self.runs, self.results_dir, self.n_resamples = runs, results_dir, n_resamples
        self._cache: dict[str, tuple[pd.Series, pd.DataFrame, dict[str, tuple[int, int]]]] = {}

    def figures(self, metric: str) -> tuple[pd.Series, pd.DataFrame, dict[str, tuple[int, int]]] | None:
        """(point, replicates, per row: jobs with evidence and finished jobs) of ``metric``, or None when the
        metric has no per-image evidence."""
        if metric not in paired.RESAMPLED:
            return None
        if metric not in self._cache:
            gathered = paired.gather(self.runs, self.results_dir, metric)
            point, replicates = paired.resampled_figures(gathered, self.n_resamples)
            self._cache[metric] = (point, replicates, gathered.coverage)
        return self._cache[metric]

    def compare(self, table: pd.DataFrame, metric: str, a: str, b: str) -> Finding:
        """Row ``a`` against row ``b`` of ``table`` (a metric table with per-category columns and ``mean``)."""
        finding = Finding(metric, a, b, float(table.at[a, "mean"]), float(table.at[b, "mean"]), "")
        figures = self.figures(metric)
        kind = {"scores": "per-image scores", "pixels": "per-image pixel histograms",
                "regions": "per-image region histograms"}[paired.RESAMPLED[metric][0]] \
            if metric in paired.RESAMPLED else "per-image evidence"
        if figures is not None and {a, b} <= set(figures[1].columns):
            result = paired.compare(figures[0], figures[1], a, b)
            finding.test = "paired bootstrap over test images"
            finding.interval, finding.p_value = result.interval, result.p_value
            partial = [figures[2][r] for r in (a, b) if figures[2][r][0] < figures[2][r][1]]
            if partial:
                seen = sum(figures[2][r][0] for r in (a, b))
                total = sum(figures[2][r][1] for r in (a, b))
                finding.subset = (f"; only {seen} of the {total} jobs have {kind}: there the difference is "
                                  f"{_points(result.difference)} points")
            elif abs(result.difference - finding.margin) > 5e-4:  # files and records of different runs
                finding.subset = f"; the {kind} give {_points(result.difference)} points"
            return finding
        categories = [c[: -len("_low")] for c in table.columns if c.endswith("_low")]
        if len(categories) >= statistics.MIN_BLOCKS:
            x, y = table.loc[a, categories].astype(float), table.loc[b, categories].astype(float)
            finding.test = f"Wilcoxon over {len(categories)} categories"
            finding.p_value = 1.0 if (x == y).all() else float(stats.wilcoxon(x, y).pvalue)
            return finding
        lacking = [r for r in (a, b) if figures is None or r not in figures[1].columns]
        why = (NO_EVIDENCE.get(metric, "the job files keep no per-image evidence for this metric") if figures is None
               else f"{' and '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no {kind}")
        finding.reason = (f"{why}, and {len(categories)} categories are too few (< {statistics.MIN_BLOCKS}) "
                          "for a test across them")
        return finding


@dataclass(frozen=True)
class Ranking:
    """The rows the answer ranks: those finished with every seed that any row has. A mean over fewer
    seeds is noisier, and among noisy means the most extreme one tends to come out on top, so a
    one-seed arm is not raced against three-seed methods. Fewer than two such rows: every row."""

    seeds: dict[str, tuple[int, ...]]  # row -> the seeds of its finished jobs
    ranked: list[str]

    @classmethod
    def of(cls, runs: pd.DataFrame) -> Ranking:
        done = runs[runs.status.isin(FINISHED) & runs.seed.notna()]
        seeds = {str(row): tuple(sorted({int(s) for s in part.seed})) for row, part in done.groupby("row", sort=False)}
        every = tuple(sorted({s for row_seeds in seeds.values() for s in row_seeds}))
        full = [row for row, row_seeds in seeds.items() if row_seeds == every]
        return cls(seeds, full if len(full) >= 2 else list(seeds))

    @property
    def unranked(self) -> list[str]:
        return [row for row in self.seeds if row not in self.ranked]

    def seed_list(self, row: str) -> str:
        return ", ".join(str(s) for s in self.seeds[row])

    def note(self, row: str) -> str:
        """The per-row note of an unranked row."""
        return (f"seeds {self.seed_list(row)} only, of {self.seed_list(self.ranked[0])}: not ranked as best "
                "(a mean over fewer seeds is noisier)")


def headline_findings(tables: dict[str, pd.DataFrame], evidence: Evidence, ranking: Ranking) -> list[Finding]:
    """Best against runner-up for each headline metric the tables have, among the complete ranked rows."""
    findings = []
    for metric in HEADLINE:
        if metric not in tables:
            continue
        means = tables[metric]["mean"].dropna()
        means = means[means.index.isin(ranking.ranked)].sort_values(ascending=False)
        if len(means) >= 2:
            findings.append(evidence.compare(tables[metric], metric, means.index[0], means.index[1]))
    return findings


def baseline_findings(tables: dict[str, pd.DataFrame], runs: pd.DataFrame, evidence: Evidence, ranking: Ranking
                      ) -> list[Finding]:
    """Each seed method against its declared baseline (:func:`declared_baselines`) on image AUROC, where both
    rows are complete."""
    table = tables["image_auroc"]
    complete = set(table.index[table["mean"].notna()])
    findings = []
    for row, other in _baseline_rows(runs):
        if row in complete and other in complete:
            findings.append(evidence.compare(table, "image_auroc", row, other))
            findings[-1].kind = "baseline"
            if ranking.seeds[row] != ranking.seeds[other]:
                findings[-1].subset += (f"; on different seeds: {row} {ranking.seed_list(row)}, "
                                        f"{other} {ranking.seed_list(other)}")
    return findings


def _baseline_rows(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(seed method's row, its declared baseline's row in the same profile) for every row of ``runs``."""
    rows_of = runs.groupby("name").row.unique()
    return [(row, row.replace(f"{method} (", f"{baseline} (", 1))
            for method, baseline in declared_baselines(runs.to_dict("records")).items()
            for row in rows_of.get(method, [])]  # fmt: skip


def missing_baselines(tables: dict[str, pd.DataFrame], runs: pd.DataFrame) -> list[str]:
    """A sentence per seed method row whose declared baseline has no complete row here (never silently dropped)."""
    table = tables["image_auroc"]
    complete = set(table.index[table["mean"].notna()])
    return [f"{row} against its baseline {other}: not compared, the baseline has "
            f"{'no finished records' if other not in table.index else 'not every job finished'} in this sweep."
            for row, other in _baseline_rows(runs) if row in complete and other not in complete]  # fmt: skip


def headline_sentence(finding: Finding) -> str:
    label = "mAD (mean of seven metrics)" if finding.metric == "mad" else METRIC_LABELS[finding.metric]
    return (f"{label}: {finding.a} is best with {100 * finding.value_a:.1f} %, "
            f"{_points(finding.margin)} points over {finding.b} ({100 * finding.value_b:.1f} %); {finding.verdict()}.")


def baseline_sentence(finding: Finding) -> str:
    if finding.significant:
        word = "beats" if finding.margin > 0 else "is worse than"
    else:
        word = "does not significantly differ from" if finding.p_value is not None else "is not shown to beat"
    return (f"{finding.a} {word} its baseline {finding.b} on image AUROC "
            f"({100 * finding.value_a:.1f} vs {100 * finding.value_b:.1f} %, {_points(finding.margin)} points; "
            f"{finding.verdict()}).")


def answer_section(report: Report, tables: dict[str, pd.DataFrame], runs: pd.DataFrame, evidence: Evidence,
                   ranking: Ranking) -> list[Finding]:
    """The answer first: best per headline metric among the ranked rows (:class:`Ranking`), margin, interval,
    significance; seed methods vs baselines. Returns the findings shown (headline ones first)."""
    findings = headline_findings(tables, evidence, ranking)
    baselines = baseline_findings(tables, runs, evidence, ranking)
    categories = runs.category.nunique()
    seeds = sorted(set(runs.seed.dropna().astype(int)))
    items, lines = [], []
    for finding in findings:
        sentence = headline_sentence(finding)
        word = {True: "sig", False: "nsig", None: "untested"}[finding.significant]
        head, rest = sentence.split(": ", 1)
        items.append(f"<li class='headline' data-metric='{finding.metric}'><b>{html.escape(head)}</b>: "
                     f"{html.escape(rest.split('; ')[0])}; <span class='{word}'>"
                     f"{html.escape(rest.split('; ', 1)[1])}</span></li>")
        lines.append(f"- **{head}**: {rest}")
    if not findings:
        empty = "No best method yet: fewer than two rows have finished every job with every seed of the report."
        items.append(f"<li class='headline'>{html.escape(empty)}</li>")
        lines.append(f"- {empty}")
    base_sentences = [baseline_sentence(f) for f in baselines] + missing_baselines(tables, runs)
    base_items = [f"<li class='baseline'>{html.escape(sentence)}</li>" for sentence in base_sentences]
    lines += [f"- {sentence}" for sentence in base_sentences]
    design = (f"{len(seeds)} seed(s) x {categories} categor{'y' if categories == 1 else 'ies'}: best = highest "
              "mean over categories of each method's seed mean (complete rows); margin over the runner-up in points; "
              "95 % interval and p from a paired bootstrap over the test images (both methods on the same resampled "
              "images, seeds averaged inside each resample), where the per-image data exist.")
    if ranking.unranked:
        design += (f" Ranked: the {len(ranking.ranked)} rows with seeds {ranking.seed_list(ranking.ranked[0])}. Not "
                   "ranked, run with fewer seeds: "
                   f"{', '.join(f'{row} ({ranking.seed_list(row)})' for row in ranking.unranked)}.")
    page = (f"<div class='answer' id='answer'><h2>The answer</h2><ul>{''.join(items)}</ul>"
            + (f"<p><b>Methods against their baselines</b></p><ul>{''.join(base_items)}</ul>" if base_items else "")
            + f"<p class='notes'>{html.escape(design)}</p></div>")
    report.markdown += ["## The answer", ""]
    report.raw(page, "\n".join(lines) + f"\n\n{design}")
    return findings + baselines


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    """One row per finding (values in 0..1): what ``leaderboard_summary.csv`` and W&B hold."""
    return pd.DataFrame([{
        "metric": f.metric, "kind": f.kind, "a": f.a, "b": f.b,
        "value_a": f.value_a, "value_b": f.value_b, "margin": f.margin,
        "low": None if f.interval is None else f.interval[0], "high": None if f.interval is None else f.interval[1],
        "p_value": f.p_value, "test": f.test, "verdict": f.verdict(),
    } for f in findings], columns=["metric", "kind", "a", "b", "value_a", "value_b", "margin", "low",
                                                 "high", "p_value", "test", "verdict"])
