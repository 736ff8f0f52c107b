"""Publish a sweep's leaderboard to Weights & Biases (one ``leaderboard`` run per sweep): what the
HTML report shows, so that a dashboard answers the same question.

* ``summary``: the answer (best per headline metric, margin, interval, test; seed methods against
  their baselines) as a table, from ``leaderboard_summary.csv``, and the run's summary fields
  ``best/<metric>`` and ``margin/<metric>``;
* ``leaderboard/<metric>``: every metric table, sorted by its own metric; ``runs``: runs.csv;
* ``gallery/<category>``: one row per chosen test image, one column per method, each cell the
  method's map at its validation threshold (the thumbnails listed in ``leaderboard_gallery.csv``);
* ``report``: the self-contained HTML page itself, and the figures.

Offline mode writes everything under the results folder and needs no network
(``wandb sync`` uploads it later); with W&B disabled nothing here is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image

from adbench.benchmark.reports.gallery import INDEX

if TYPE_CHECKING:
    from adbench.benchmark.orchestration.sweep import SweepConfig

FIGURES = ("leaderboard_bars.png", "leaderboard_speed.png", "leaderboard_heatmap.png")


def log_leaderboard(results_dir: Path, sweep: SweepConfig, tables: dict[str, pd.DataFrame]) -> str:
    """Log the summary, runs.csv, every metric table, the gallery, the figures and the page; return the
    W&B run directory."""
    import wandb

    settings = sweep.wandb
    run = wandb.init(
        project=settings.get("project", "adbench"),
        group=sweep.name,
        job_type="leaderboard",
        name=f"{sweep.name}-leaderboard",
        mode=settings.get("mode", "offline"),
        dir=str(settings.get("dir", results_dir)),
        reinit=True,
    )
    try:
        summary = results_dir / "leaderboard_summary.csv"
        if summary.is_file():
            findings = pd.read_csv(summary)
            run.log({"summary": wandb.Table(dataframe=findings)})
            for f in findings[findings.kind == "headline"].itertuples():
                run.summary[f"best/{f.metric}"] = f.a
                run.summary[f"margin/{f.metric}"] = f.margin
        run.log({"runs": wandb.Table(dataframe=pd.read_csv(results_dir / "runs.csv"))})
        for metric, table in tables.items():
            run.log({f"leaderboard/{metric}": wandb.Table(dataframe=table.reset_index())})
        cells = results_dir / INDEX
        if cells.is_file():
            for category, part in pd.read_csv(cells, dtype=str).groupby("category", sort=False):
                columns = list(dict.fromkeys(part.column))  # input, ground truth, then the methods
                rows = []
                for image, group in part.groupby("image", sort=False):
                    pictures = dict(zip(group.column, group.picture, strict=True))
                    rows.append([image, *(wandb.Image(Image.open(results_dir / pictures[c])) for c in columns)])
                run.log({f"gallery/{category}": wandb.Table(columns=["image", *columns], data=rows)})
        for name in FIGURES:
            if (results_dir / name).is_file():
                run.log({f"figures/{Path(name).stem}": wandb.Image(str(results_dir / name))})
        page = results_dir / "leaderboard.html"
        if page.is_file():
            run.log({"report": wandb.Html(page.read_text())})
        return run.dir
    finally:
        run.finish()
