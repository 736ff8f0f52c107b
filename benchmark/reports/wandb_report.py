"""Publish a sweep's leaderboard to Weights & Biases (one ``leaderboard`` run per sweep).

Offline mode writes everything under the results folder and needs no network
(``wandb sync`` uploads it later); with W&B disabled nothing here is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from adbench.benchmark.orchestration.sweep import SweepConfig


def log_leaderboard(results_dir: Path, sweep: SweepConfig, tables: dict[str, pd.DataFrame]) -> str:
    """Log runs.csv, every metric table and the heatmap; return the W&B run directory."""
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
        run.log({"runs": wandb.Table(dataframe=pd.read_csv(results_dir / "runs.csv"))})
        for metric, table in tables.items():
            run.log({f"leaderboard/{metric}": wandb.Table(dataframe=table.reset_index())})
        heatmap = results_dir / "leaderboard_heatmap.png"
        if heatmap.is_file():
            run.log({"leaderboard/heatmap": wandb.Image(str(heatmap))})
        return run.dir
    finally:
        run.finish()
