"""Does the resolution at which EfficientAD's map quantiles are measured move its test metrics?

    python -m adbench.benchmark.experiments.efficientad_quantiles JOB_DIR [JOB_DIR ...]

Each ``JOB_DIR`` is a finished benchmark job of ``efficientad`` (its ``config.yaml`` and
``checkpoints/best.ckpt``). The fitted model is evaluated on its test set four ways, all with the
same weights and the same normal validation images:

* ``ours``: q_a, q_b of the raw maps at the PDN's resolution (what the job did; its metrics must
  equal the record's, which is checked with ``--records``);
* ``anomalib``: the quantiles of the maps after zero-padding by 4 cells and resizing to the input,
  as anomalib 2.7 measures them (``map_norm_quantiles`` on ``get_maps(normalize=False)``);
* ``anomalib pad first``: anomalib 2.7's whole order (``compute_maps``): each raw map zero-padded
  and resized, then normalised by those quantiles, so the padded border sits at
  ``-0.1 q_a / (q_b - q_a)``, below almost every image cell; ours (and the reference code's)
  normalises first and pads the combined map with 0, the level of ``q_a``;
* ``local only`` / ``global only``: one map alone, to show how far the weighting can move a metric.

Prints one table row per job and variant. No training: a minute per job on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from adbench.callbacks.metrics import compute_anomaly_metrics
from adbench.models.efficientad import EfficientAD, full_size_map, linear_quantile, normalise_map

METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "pro_fpr05")


def _model_and_data(job_dir: Path) -> tuple[EfficientAD, Any]:
    from adbench.cli import AnomalyCLI

    config = yaml.safe_load((job_dir / "config.yaml").read_text())
    cli = AnomalyCLI(args=config, run=False, save_config_callback=None)
    model, data = cli.model, cli.datamodule
    if not isinstance(model, EfficientAD):
        raise SystemExit(f"{job_dir}: not an EfficientAD job ({type(model).__name__})")
    checkpoint = job_dir / "checkpoints" / "best.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(f"{job_dir}: no checkpoint at {checkpoint}")
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    data.setup("fit")
    data.setup("test")
    return model.eval(), data


def _raw_maps(model: EfficientAD, loader: Any) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Local and global raw maps (N, 1, h, w), labels (N,) and masks (N, H, W) of a loader's images."""
    local, global_, labels, masks = [], [], [], []
    for batch in loader:
        lo, gl = model.raw_maps(batch["image"])
        local.append(lo)
        global_.append(gl)
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return torch.cat(local), torch.cat(global_), np.concatenate(labels), np.concatenate(masks)


def _quantiles(maps: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_quantile(maps, low), linear_quantile(maps, high)  # it flattens


@torch.no_grad()
def evaluate(job_dir: Path) -> list[dict[str, Any]]:
    model, data = _model_and_data(job_dir)
    low, high = model.hparams.map_quantiles
    val_local, val_global, val_labels, _ = _raw_maps(model, data.val_dataloader())
    normal = torch.from_numpy(val_labels == 0)
    val_local, val_global = val_local[normal], val_global[normal]
    test_local, test_global, labels, masks = _raw_maps(model, data.test_dataloader())
    size = masks.shape[-2:]
    ours = (*_quantiles(val_local, low, high), *_quantiles(val_global, low, high))
    anomalib = (*_quantiles(full_size_map(val_local, size), low, high), *_quantiles(full_size_map(val_global, size), low, high))
    rows = []
    for name, q, weights in (("ours", ours, (0.5, 0.5)), ("anomalib", anomalib, (0.5, 0.5)),
                             ("local only", ours, (1.0, 0.0)), ("global only", ours, (0.0, 1.0))):  # fmt: skip
        combined = weights[0] * normalise_map(test_local, q[0], q[1]) + weights[1] * normalise_map(test_global, q[2], q[3])
        rows.append(_row(job_dir, name, q, full_size_map(combined, size)[:, 0].numpy(), labels, masks))
    padded_first = 0.5 * (normalise_map(full_size_map(test_local, size), anomalib[0], anomalib[1])
                          + normalise_map(full_size_map(test_global, size), anomalib[2], anomalib[3]))
    rows.append(_row(job_dir, "anomalib pad first", anomalib, padded_first[:, 0].numpy(), labels, masks))
    return rows


def _row(job_dir: Path, variant: str, q: tuple[torch.Tensor, ...], maps: np.ndarray, labels: np.ndarray,
         masks: np.ndarray) -> dict[str, Any]:
    metrics = compute_anomaly_metrics(maps.reshape(len(maps), -1).max(axis=1), labels, maps, masks)
    return {"job": job_dir.name, "variant": variant, "quantiles": [round(float(v), 4) for v in q],
            **{k: metrics[k] for k in METRICS}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_dirs", nargs="+", type=Path)
    parser.add_argument("--records", type=Path, help="the sweep's runs/ folder: check 'ours' against each record")
    args = parser.parse_args(argv)
    print("| job | variant | q_a / q_b local | q_a / q_b global | " + " | ".join(METRICS) + " |")
    print("|---|---|---|---|" + "---|" * len(METRICS))
    for job_dir in args.job_dirs:
        rows = evaluate(job_dir)
        for row in rows:
            q = row["quantiles"]
            cells = " | ".join(f"{100 * row[k]:.1f}" for k in METRICS)
            print(f"| {row['job']} | {row['variant']} | {q[0]} / {q[1]} | {q[2]} / {q[3]} | {cells} |", flush=True)
        if args.records is not None:
            record = json.loads((args.records / f"{job_dir.name}.json").read_text())["metrics"]
            gaps = {k: abs(rows[0][k] - record[k]) for k in METRICS}
            if max(gaps.values()) > 1e-6:
                raise SystemExit(f"{job_dir.name}: 'ours' does not reproduce the record: {gaps}")


if __name__ == "__main__":
    main()
