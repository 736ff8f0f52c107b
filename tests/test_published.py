"""The published-figures file: every row says whether it is the paper's own figure or a
reproduction's, a bad kind is refused with its file and line, and the leaderboard shows
which kind each reference is."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import pytest

from adbench.benchmark.reports import published
from adbench.benchmark.reports.leaderboard import build_leaderboard

from .test_report import _write_records


def _copy_with(tmp_path: Path, change) -> Path:
    """The shipped file with ``change(row)`` applied to each row (a dict), written to tmp_path."""
    with published.PUBLISHED_FILE.open() as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [change(dict(row)) for row in reader]
    path = tmp_path / "mvtec_ad.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_published_rows_have_a_kind_and_a_bad_kind_names_file_and_line(tmp_path: Path) -> None:
    table = published.load_published()
    assert set(table.kind) == set(published.KINDS)
    assert not table.duplicated(["method", "category", "kind"]).any()
    assert (table[table.method.isin(["draem", "stpm", "patchcore"])].kind == "paper").all()

    bad = _copy_with(tmp_path, lambda r: {**r, "kind": "rerun"} if (r["method"], r["category"]) == ("stpm", "grid") else r)
    line = 1 + next(i for i, r in enumerate(csv.DictReader(bad.open()), 1) if (r["method"], r["category"]) == ("stpm", "grid"))
    with pytest.raises(ValueError, match=rf"mvtec_ad\.csv, line {line} \(stpm, grid\): kind 'rerun' is not one of"):
        published.load_published(bad)
    missing = _copy_with(tmp_path, lambda r: {**r, "kind": ""} if r["method"] == "draem" else r)
    with pytest.raises(ValueError, match=r"line 2 \(draem, bottle\): kind nan"):
        published.load_published(missing)


def test_published_reference_prefers_the_papers_figure_then_a_reproductions() -> None:
    table = published.load_published()
    pixel = published.reference(table, "rd4ad", "pixel_auroc")
    assert len(pixel) == 15 and pixel.at["carpet", "kind"] == "paper" and pixel.at["capsule", "kind"] == "reproduction"
    assert pixel.at["carpet", "pixel_auroc"] == pytest.approx(0.989)  # the paper's, not the re-run's
    image = published.reference(table, "rd4ad", "image_auroc")
    assert set(image.kind) == {"reproduction"}  # the paper's per-class image AUROC is not on file
    assert published.reference(table, "simplenet", "image_auroc").empty


def test_leaderboard_marks_a_reproductions_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped file with DRAEM's bottle row relabelled as a reproduction.
    relabelled = _copy_with(tmp_path, lambda r: {**r, "kind": "reproduction"}
                            if (r["method"], r["category"]) == ("draem", "bottle") else r)
    monkeypatch.setattr(published, "PUBLISHED_FILE", relabelled)
    root = tmp_path / "mvtec"
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    results = tmp_path / "results"
    _write_records(results, ["bottle"], [0], str(root))
    build_leaderboard(results)
    markdown = (results / "leaderboard.md").read_text()
    section = markdown.split("Ours vs published")[1].split("## Significance")[0]
    draem = next(row for row in section.splitlines() if row.startswith("| draem (quick)"))
    patchcore = next(row for row in section.splitlines() if row.startswith("| patchcore (quick)"))
    mark = published.REPRODUCTION_MARK
    assert f"vs 99.2{mark} (" in draem and f"{mark}reproduction: Zavrtanik" in draem
    assert mark not in patchcore and "paper: Roth" in patchcore
    assert published.LEGEND in section
    assert html.escape(published.LEGEND) in (results / "leaderboard.html").read_text()
