"""The report a reviewer reads: honest about failures, staleness and seeds, tests across
categories, published figures per category, the HTML page in a real browser, its gallery, W&B."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adbench.benchmark.orchestration.records import write_json_atomic
from adbench.benchmark.orchestration.runner import device_slots, execution_of
from adbench.benchmark.orchestration.sweep import SweepConfig
from adbench.benchmark.reports.leaderboard import build_leaderboard
from adbench.benchmark.reports.published import load_published

from .conftest import REPO

METHODS = ("stpm", "patchcore", "draem")


def _write_records(results: Path, categories: list[str], seeds: list[int], root: str | None,
                   fail: tuple[str, str] | None = None, sweep_name: str = "trust") -> None:
    """Records as the job writes them, with figures drawn so that the methods differ."""
    rng = np.random.default_rng(0)
    sweep = SweepConfig(name=sweep_name, methods=list(METHODS), categories=categories, seeds=seeds, root=root)
    execution = execution_of(device_slots(1, None)[0])
    for job in sweep.jobs():
        job = replace(job, execution=execution)
        base = {"stpm": 0.90, "patchcore": 0.97, "draem": 0.80}[job.method]
        metrics = {m: float(np.clip(base + rng.normal(0, 0.01), 0, 1)) for m in
                   ("image_auroc", "pixel_auroc", "pro", "image_f1max", "pixel_f1max")}
        record = {**asdict(job), "job_id": job.job_id, "fingerprint": job.fingerprint(), "status": "ok",
                  "error": None, "metrics": metrics, "finished_unix": 1.0,
                  "intervals": {m: [v - 0.02, min(1.0, v + 0.02)] for m, v in metrics.items()},
                  "environment": {"git_commit": "a" * 40, "host": "ci", "device": "cpu"},
                  "timing": {"fit_seconds": 1.0, "test_images_per_second": 10.0}, "parameters": 1000}
        if fail == (job.method, job.category):
            record.update(status="failed", error="RuntimeError: injected", metrics={}, intervals={})
        write_json_atomic(results / "runs" / f"{job.job_id}.json", record)


def test_leaderboard_is_honest_about_failures_commits_staleness_and_other_sweeps(
    tmp_path: Path, embedded_root: Path
) -> None:
    results = tmp_path / "results"
    _write_records(results, ["weave", "marble", "disc"], [0, 1, 2], str(embedded_root), fail=("draem", "disc"))
    first = json.loads((results / "runs" / "stpm__quick__weave__seed0.json").read_text())
    write_json_atomic(results / "runs" / "x_other.json", {**first, "sweep": "elsewhere", "job_id": "other"})
    # One record from another commit, one whose config no longer matches, one torn file.
    path = results / "runs" / "stpm__quick__weave__seed1.json"
    write_json_atomic(path, {**json.loads(path.read_text()), "environment": {"git_commit": "b" * 40}})
    path = results / "runs" / "patchcore__quick__marble__seed2.json"
    write_json_atomic(path, {**json.loads(path.read_text()), "fingerprint": "0000"})
    (results / "runs" / "torn.json").write_text('{"status": "o')

    tables = build_leaderboard(results, sweep_name="trust", sort_by="image_auroc")
    markdown = (results / "leaderboard.md").read_text()
    image = tables["image_auroc"]
    assert list(image.index) == ["patchcore (quick)", "stpm (quick)", "draem (quick)"], "sorted, incomplete last"
    assert pd.isna(image.at["draem (quick)", "mean"]) and not image.at["draem (quick)", "complete"]
    assert "n/a (6 of 9) partial" in markdown
    assert image.at["stpm (quick)", "mean"] == pytest.approx(
        pd.read_csv(results / "runs.csv").query("method == 'stpm'").image_auroc.mean())
    assert "records from different commits" in markdown and "aaaaaaaaaa (26 jobs), bbbbbbbbbb (1 jobs)" in markdown
    assert "1 record(s) of sweep 'elsewhere'" in markdown
    assert "## Stale records" in markdown and "patchcore__quick__marble__seed2" in markdown.split("## Stale")[1]
    assert "## Unreadable records" in markdown and "torn.json" in markdown
    assert "## Failed jobs" in markdown and "injected" in markdown
    assert " [" in markdown.split("## Image AUROC (%)")[1].split("##")[0], "intervals in the cells"

    # One note per row instead of a tag in every cell; three categories are too few blocks for a test across them.
    table = [line for line in markdown.split("## Image AUROC (%)")[1].split("##")[0].splitlines() if line.startswith("|")]
    assert len(table) == 5 and not any("stale" in line or "(!)" in line for line in table), table
    assert "patchcore (quick): 1 of 9 records stale" in markdown
    significance = markdown.split("## Significance")[1]
    assert "Wilcoxon signed-rank test not run: needs >= 6 categories as blocks, has 3" in significance


def test_six_categories_are_the_blocks_of_wilcoxon_and_cd_and_seeds_never_are(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    categories = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut"]
    for category in categories:
        (root / category / "train" / "good").mkdir(parents=True)
    results = tmp_path / "results"
    _write_records(results, categories, [0, 1], str(root))
    build_leaderboard(results, n_resamples=200)
    significance = (results / "leaderboard.md").read_text().split("## Significance")[1]
    assert "Wilcoxon signed-rank, two-sided, 6 blocks (category, each method's mean over its seeds)" in significance
    # patchcore is 7 points above stpm in every category: the lowest exact p with 6 blocks, 0.031, times 3 (Holm).
    pair = next(line for line in significance.splitlines() if line.startswith("1. patchcore (quick)"))
    assert "vs 2 +7." in pair and "(p=0.094)" in pair, pair
    assert "Friedman chi2" in significance and "leaderboard_cd_image_auroc.png" in significance
    assert (results / "leaderboard_cd_image_auroc.png").stat().st_size > 1000


def test_too_few_blocks_say_why_the_tests_are_absent(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    _write_records(results, ["weave", "marble"], [0], str(embedded_root))
    build_leaderboard(results)
    markdown = (results / "leaderboard.md").read_text()
    assert "Wilcoxon signed-rank test not run: needs >= 6 categories as blocks, has 2" in markdown
    assert "critical-difference diagram not drawn: needs >= 6 categories as blocks" in markdown
    assert not list(results.glob("leaderboard_cd_*.png"))


def test_a_row_with_fewer_seeds_is_compared_but_not_ranked_as_best(tmp_path: Path, embedded_root: Path) -> None:
    """A one-seed arm beside three-seed methods: the most extreme of noisier means is no winner."""
    results = tmp_path / "results"
    _write_records(results, ["weave", "marble"], [0, 1, 2], str(embedded_root))
    for seed in (1, 2):  # patchcore, the highest row, keeps seed 0 only
        for category in ("weave", "marble"):
            (results / "runs" / f"patchcore__quick__{category}__seed{seed}.json").unlink()
    tables = build_leaderboard(results, n_resamples=200)
    assert tables["image_auroc"]["mean"].idxmax() == "patchcore (quick)"  # in the table, with its own mean
    findings = pd.read_csv(results / "leaderboard_summary.csv")
    assert set(findings.query("kind == 'headline'").a) == {"stpm (quick)"}
    assert not findings.b.str.contains("patchcore").any()
    markdown = (results / "leaderboard.md").read_text()
    assert "Not ranked, run with fewer seeds: patchcore (quick) (0)" in markdown
    assert "patchcore (quick): seeds 0 only, of 0, 1, 2: not ranked as best" in markdown
    image = markdown.split("## Image AUROC (%)")[1].split("##")[0]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in image.splitlines()
             if line.startswith("| ") and "(quick)" in line}  # fmt: skip
    assert "best" in cells["stpm (quick)"] and cells["patchcore (quick)"][5].startswith("+")  # vs best, compared
    # Only one row with every seed: the answer says there is no best yet.
    for path in (results / "runs").glob("stpm__quick__marble__seed*.json"):
        path.unlink()
    build_leaderboard(results, n_resamples=200)
    assert "No best method yet: fewer than two rows" in (results / "leaderboard.md").read_text()
    # Every row with every seed again: patchcore is ranked and best.
    _write_records(results, ["weave", "marble"], [0, 1, 2], str(embedded_root))
    build_leaderboard(results, n_resamples=200)
    assert set(pd.read_csv(results / "leaderboard_summary.csv").query("kind == 'headline'").a) == {"patchcore (quick)"}
    assert "Not ranked" not in (results / "leaderboard.md").read_text()


def test_published_figures_are_per_category_with_source(tmp_path: Path) -> None:
    published = load_published()
    assert set(published.method) >= {"draem", "stpm", "patchcore"}
    # Each method's file rows give back the 15-category means the papers print.
    means = published.groupby("method")[["image_auroc", "pixel_auroc"]].mean() * 100
    assert means.at["draem", "image_auroc"] == pytest.approx(98.0, abs=0.06)
    assert means.at["draem", "pixel_auroc"] == pytest.approx(97.3, abs=0.06)
    assert means.at["patchcore", "image_auroc"] == pytest.approx(99.0, abs=0.1)

    # A bottle sweep: each method beside its published bottle figure, not a 15-category mean.
    root = tmp_path / "mvtec"
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    results = tmp_path / "results"
    _write_records(results, ["bottle"], [0], str(root))
    build_leaderboard(results)
    section = (results / "leaderboard.md").read_text().split("Ours vs published")[1].split("## Significance")[0]
    bottle = published[published.kind == "paper"].set_index(["method", "category"])
    for method in ("patchcore", "draem"):
        line = next(row for row in section.splitlines() if row.startswith(f"| {method} (quick)"))
        assert f"vs {100 * bottle.at[(method, 'bottle'), 'image_auroc']:.1f}" in line and "over 1" in line
        assert "Tab." in line or "Roth" in line or "Zavrtanik" in line
    assert "stpm (quick), image_auroc: only the paper's 15-category mean is on file (95.5)" in section


# --------------------------------------------------------------------------- the report in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Set by .ci/run, which installs Chromium: there the browser test must run, never skip.
REQUIRE_BROWSER = os.environ.get("ADBENCH_REQUIRE_BROWSER") == "1"


#: Where the browser test leaves its screenshot of the report's first screen (kept after the run).
TEST_OUTPUT = Path(os.environ.get("ADBENCH_TEST_OUTPUT", REPO / ".test-output"))


def _write_evidence(results: Path) -> None:
    """Per-image scores, pixel histograms and anomaly-map pictures for every record, as a job leaves them:
    patchcore separates best, then stpm, then draem; 8 anomalous ('crack') and 8 good images."""
    from adbench.callbacks.pixel_histograms import HISTOGRAM_SUFFIX, pixel_histograms
    from adbench.callbacks.visualization import compose, render_panels

    rng = np.random.default_rng(1)
    names = [f"crack_{i:03d}" for i in range(8)] + [f"good_{i:03d}" for i in range(8)]
    labels = np.array([1] * 8 + [0] * 8)
    masks = np.zeros((16, 16, 16), bool)
    masks[:8, 4:10, 5:11] = True
    for path in sorted((results / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if record["status"] != "ok":
            continue
        gap = {"patchcore": 3.0, "stpm": 1.0, "draem": 0.3}[record["method"]]
        scores = rng.normal(0, 1, 16) + gap * labels
        csv = results / "scores" / f"{record['job_id']}.csv"
        csv.parent.mkdir(exist_ok=True)
        pd.DataFrame({"path": [f"{record['categories'][0]}/test/{n}.png" for n in names], "label": labels,
                      "score": scores}).to_csv(csv, index=False)
        maps = rng.normal(0, 1, masks.shape) + gap * masks
        histograms, regions, _ = pixel_histograms(maps, masks)
        np.savez(csv.with_suffix(HISTOGRAM_SUFFIX), paths=np.array(list(pd.read_csv(csv).path)),
                 labels=labels, histograms=histograms, region_histograms=regions)
        write_json_atomic(path, {**record, "image_scores": f"scores/{csv.name}"})
        folder = results / "jobs" / record["job_id"] / "anomaly_maps"
        folder.mkdir(parents=True)
        image = np.full((16, 16, 3), 128, np.uint8)
        for name, m, mask in zip(names, maps, masks, strict=True):
            panels = render_panels(image, mask, m, -3, 4, 1.0)
            from PIL import Image

            Image.fromarray(compose([panels[:, k * 16:(k + 1) * 16] for k in range(4)], ["a", "b", "c", "d"],
                                    name, -3, 4)).save(folder / f"{name}.png")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None and not REQUIRE_BROWSER, reason="chromium not installed (Debian package chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path: Path, embedded_root: Path) -> None:
    assert CHROMIUM is not None, "ADBENCH_REQUIRE_BROWSER=1 but no chromium on PATH"
    from playwright import sync_api as playwright
    results = tmp_path / "results"
    _write_records(results, ["weave", "marble", "disc"], [0, 1, 2], str(embedded_root))
    _write_evidence(results)
    build_leaderboard(results, n_resamples=300)
    page_file = results / "leaderboard.html"
    assert str(embedded_root) not in page_file.read_text(), "no machine paths on the page"
    moved = tmp_path / "elsewhere.html"  # self-contained: it must render away from its PNG files
    shutil.copy(page_file, moved)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(moved.as_uri())
        assert "Leaderboard" in page.title()
        # The answer first: every headline metric, best method, margin, interval and verdict, above the tables.
        headlines = page.locator("#answer li.headline").all_inner_texts()
        assert len(headlines) == 3, headlines
        image = next(h for h in headlines if h.startswith("Image AUROC"))
        assert "patchcore (quick) is best" in image and "over stpm (quick)" in image and "95 % CI" in image
        assert "significant (p < 0.001" in image and "not significant" not in image, image
        pro = next(h for h in headlines if h.startswith("PRO"))  # PRO too: the region-weighted histograms
        assert "paired bootstrap over test images" in pro and "region histograms" in pro, pro
        assert page.locator("#answer").bounding_box()["y"] < page.locator("#table-image_auroc").bounding_box()["y"]
        # Each table sorted by its own mean, best first.
        for metric in ("image_auroc", "pixel_auroc", "pro"):
            means = page.eval_on_selector_all(f"table[data-metric={metric}] tbody tr",
                                              "rows => rows.map(r => parseFloat(r.cells[1].dataset.v))")
            assert means == sorted(means, reverse=True) and len(means) == 3, (metric, means)
        # A click on a header sorts by that column; a second click reverses it.
        table = "table[data-metric=image_auroc]"
        header = page.locator(f"{table} thead th", has_text="fit s")
        before = page.eval_on_selector_all(f"{table} tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
        page.locator(f"{table} thead th", has_text="weave").click()
        weave = page.eval_on_selector_all(f"{table} tbody tr", "rows => rows.map(r => parseFloat(r.cells[3].dataset.v))")
        assert weave == sorted(weave, reverse=True)
        page.locator(f"{table} thead th", has_text="weave").click()
        after = page.eval_on_selector_all(f"{table} tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
        assert after == before[::-1] and header.count() == 1
        # The gallery: the same images in every method's column, each picture decoded.
        rows = page.locator("table.gallery[data-category=weave] tbody tr")
        assert rows.count() == 3, "2 per defect type (crack) + 1 good, by file name"
        assert rows.first.locator("td").first.inner_text() == "crack_000"
        widths = page.eval_on_selector_all("table.gallery img", "els => els.map(e => e.complete && e.naturalWidth)")
        assert len(widths) == 3 * 3 * (2 + 3) and all(w and w >= 16 for w in widths)
        images = page.eval_on_selector_all("img.figure", "els => els.map(e => [e.alt, e.complete && e.naturalWidth])")
        assert {"per-category bars", "speed against quality"} <= {alt for alt, _ in images}
        assert all(width and width > 100 for _, width in images), images
        page.evaluate("window.scrollTo(0, 0)")
        TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(TEST_OUTPUT / "leaderboard_first_screen.png"))
        browser.close()
    assert (TEST_OUTPUT / "leaderboard_first_screen.png").stat().st_size > 10_000


def test_a_report_rebuilt_without_jobs_keeps_its_gallery_until_a_record_changes(
    tmp_path: Path, embedded_root: Path
) -> None:
    import re

    results = tmp_path / "results"
    _write_records(results, ["weave", "marble"], [0], str(embedded_root))
    _write_evidence(results)

    def cells() -> list[str]:
        page = (results / "leaderboard.html").read_text()
        return re.findall(r"<table class='gallery'.*?</table>", page, flags=re.S)

    build_leaderboard(results, n_resamples=50)
    built = cells()
    index = pd.read_csv(results / "leaderboard_gallery.csv")
    assert len(built) == 2 and len(index) == 2 * 3 * (2 + 3)  # categories x images x (input, truth, 3 methods)
    shutil.rmtree(results / "jobs")  # what a committed folder looks like
    build_leaderboard(results, n_resamples=50)
    assert cells() == built, "the same thumbnails, the same order, from gallery/"
    assert "Kept from an earlier build" in (results / "leaderboard.html").read_text()
    # A rerun job (a new finish time) no longer matches its kept pictures: its column goes, the rest stay.
    path = results / "runs" / "stpm__quick__weave__seed0.json"
    write_json_atomic(path, {**json.loads(path.read_text()), "finished": "2026-12-06T12:00:00+0000"})
    build_leaderboard(results, n_resamples=50)
    weave = next(t for t in cells() if "data-category='weave'" in t)
    assert "<th>stpm (quick)</th>" not in weave and "<th>patchcore (quick)</th>" in weave
    assert "No pictures for: stpm (quick)" in (results / "leaderboard.html").read_text()
    assert "<th>stpm (quick)</th>" in next(t for t in cells() if "data-category='marble'" in t)


def test_a_report_built_without_its_gallery_carries_no_picture_of_the_data(
    tmp_path: Path, embedded_root: Path
) -> None:
    results = tmp_path / "results"
    _write_records(results, ["weave"], [0], str(embedded_root))
    _write_evidence(results)
    build_leaderboard(results, n_resamples=50, with_gallery=False)
    page = (results / "leaderboard.html").read_text()
    assert "data:image/jpeg" not in page and "<table class='gallery'" not in page
    assert "Left out of this build (--no-gallery)" in page
    assert not (results / "gallery").exists() and not (results / "leaderboard_gallery.csv").exists()
    build_leaderboard(results, n_resamples=50)  # the same folder had pictures to show
    assert "<table class='gallery'" in (results / "leaderboard.html").read_text()


def test_wandb_leaderboard_run_logs_the_summary_tables_gallery_and_page(
    tmp_path: Path, embedded_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    from adbench.benchmark.reports.wandb_report import log_leaderboard

    results = tmp_path / "results"
    _write_records(results, ["weave", "marble"], [0], str(embedded_root))
    _write_evidence(results)
    tables = build_leaderboard(results, n_resamples=100)
    logged: dict[str, object] = {}

    class Table:
        def __init__(self, dataframe=None, columns=None, data=None):
            self.columns = list(dataframe.columns) if dataframe is not None else columns
            self.data = dataframe.to_numpy().tolist() if dataframe is not None else data

    class Run:
        dir, summary = str(tmp_path / "wandb"), {}

        def log(self, entries: dict) -> None:
            logged.update(entries)

        def finish(self) -> None:
            logged["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Table=Table, Image=lambda x: ("image", x),
                                 Html=lambda text: ("html", text))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log_leaderboard(results, SweepConfig(name="trust", methods=list(METHODS), categories=["weave"]), tables)
    summary = logged["summary"]
    rows = [dict(zip(summary.columns, r, strict=True)) for r in summary.data]
    image = next(r for r in rows if r["metric"] == "image_auroc" and r["kind"] == "headline")
    assert image["a"] == "patchcore (quick)" and image["b"] == "stpm (quick)" and image["margin"] > 0
    assert 0 <= image["p_value"] <= 1 and "paired bootstrap over test images" in image["verdict"]
    assert Run.summary["best/image_auroc"] == "patchcore (quick)"
    assert {"leaderboard/image_auroc", "leaderboard/pixel_auroc", "runs", "figures/leaderboard_bars"} <= set(logged)
    gallery = logged["gallery/weave"]
    assert gallery.columns[:3] == ["image", "input", "ground truth"] and len(gallery.columns) == 3 + 3
    assert [row[0] for row in gallery.data] == ["crack_000", "crack_001", "good_000"]
    assert all(cell[0] == "image" and cell[1].size[0] == 16 for row in gallery.data for cell in row[1:])
    assert logged["report"][0] == "html" and "The answer" in logged["report"][1] and logged["finished"]


def test_rows_whose_maps_are_near_chance_are_flagged_with_their_budget() -> None:
    from adbench.benchmark.reports.leaderboard import weak_rows

    table = pd.DataFrame({"mean": [0.95, np.nan, 0.62], "partial_mean": [np.nan, 0.55, np.nan]},
                         index=["patchcore (quick)", "draem (quick)", "pouta (quick)"])
    runs = pd.DataFrame({"row": ["patchcore (quick)", "draem (quick)", "pouta (quick)", "pouta (quick)"],
                         "max_epochs": [1, 2, 3, 3]})
    lines = weak_rows(table, runs)
    assert len(lines) == 2
    assert lines[0].startswith("Read with care: draem (quick) has a mean pixel AUROC of 55.0 %") and "2 epoch(s)" in lines[0]
    assert "pouta (quick)" in lines[1] and "62.0 %" in lines[1] and "3 epoch(s)" in lines[1]
