"""PatchCore at scale: fit time and peak memory against the number of training images.

    python -m adbench.benchmark.experiments.bench_patchcore [--images 100,200,500,1000] [--methods greedy,partitioned]
        [--max-greedy-images 200] [--work DIR]

For each training-set size N the embedded ``weave`` category is rendered with N normal
training images at 256 px (the quick profile's size; about 1,000 patches per image) beside
the embedded test split. Every (N, coreset method) pair runs ``adbench fit`` and then
``adbench test --ckpt_path last`` in separate processes, so that each phase's peak resident
memory is its own (``os.wait4``'s ``ru_maxrss``). Printed per row: patches in the bank, the
coreset's seconds (from PatchCore's log line), fit and test wall-clock seconds (process start
to exit, imports included), fit and test peak RSS, and the test's image / pixel AUROC.
The exact greedy coreset grows as N^2 and is skipped beyond ``--max-greedy-images``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from adbench.datamodules.embedded import ensure_embedded_dataset
from adbench.datamodules.embedded_render import render_sample

CATEGORY = "weave"
IMAGE_SIZE = 256
CONFIG = "configs/patchcore/quick.yaml"
_CORESET_LINE = re.compile(r"PatchCore: memory bank of (\d+) patches -> \w+ coreset of (\d+) .* in ([0-9.]+) s")
# Lightning prints test metrics as a table, plain or with box-drawing borders (rich).
_METRIC_LINE = re.compile(r"test/(image_auroc|pixel_auroc)[\s│┃|]+([0-9.]+)")


def make_category(root: Path, count: int) -> Path:
    """``root/weave`` with ``count`` rendered training images and the embedded test split (linked)."""
    folder = root / CATEGORY
    train = folder / "train" / "good"
    if len(list(train.glob("*.png"))) == count:
        return root
    train.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _, image, _ = render_sample(CATEGORY, None, [0, 1000, i], IMAGE_SIZE)
        Image.fromarray(image).save(train / f"{i:04d}.png", compress_level=1)
    embedded = ensure_embedded_dataset(image_size=IMAGE_SIZE) / CATEGORY
    for split in ("test", "ground_truth"):
        if not (folder / split).exists():
            (folder / split).symlink_to(embedded / split)
    return root


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; return (wall seconds, peak RSS in MiB, combined output)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, output


def printed_test_metrics(output: str) -> dict[str, str]:
    """The image and pixel AUROC that ``adbench test`` printed in ``output``."""
    return dict(_METRIC_LINE.findall(output))


def measure(root: Path, method: str, run_dir: Path) -> dict[str, float]:
    common = [sys.executable, "-m", "adbench"]
    data = ["--config", CONFIG, f"--data.root={root}", f"--data.category={CATEGORY}",
            f"--model.init_args.coreset_method={method}", f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false"]
    fit_s, fit_mib, fit_out = run_measured([*common, "fit", *data])
    test_s, test_mib, test_out = run_measured([*common, "test", *data, "--ckpt_path=last"])
    coreset = _CORESET_LINE.search(fit_out)
    metrics = printed_test_metrics(test_out)
    return {
        "patches": int(coreset.group(1)) if coreset else np.nan,
        "bank": int(coreset.group(2)) if coreset else np.nan,
        "coreset_s": float(coreset.group(3)) if coreset else np.nan,
        "fit_s": fit_s, "fit_mib": fit_mib, "test_s": test_s, "test_mib": test_mib,
        "image_auroc": float(metrics.get("image_auroc", "nan")),
        "pixel_auroc": float(metrics.get("pixel_auroc", "nan")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="100,200,500,1000", help="training-set sizes")
    parser.add_argument("--methods", default="greedy,partitioned", help="coreset methods")
    parser.add_argument("--max-greedy-images", type=int, default=200)
    parser.add_argument("--work", default="/tmp/adbench_bench_patchcore", help="scratch folder")
    args = parser.parse_args(argv)
    work = Path(args.work)
    print(f"PatchCore quick profile ({CONFIG}), {IMAGE_SIZE} px, embedded {CATEGORY}; "
          f"CPU threads {os.cpu_count()}, host {os.uname().nodename}")
    header = (f"{'images':>6} {'method':<11} {'patches':>8} {'bank':>7} {'coreset s':>9} {'fit s':>7} "
              f"{'fit MiB':>8} {'test s':>7} {'test MiB':>8} {'img AUROC':>9} {'pix AUROC':>9}")
    print(header, flush=True)
    for count in (int(v) for v in args.images.split(",")):
        root = make_category(work / f"data{count}", count)
        for method in args.methods.split(","):
            if method == "greedy" and count > args.max_greedy_images:
                print(f"{count:>6} {method:<11} skipped (> --max-greedy-images)", flush=True)
                continue
            row = measure(root, method, work / f"run{count}_{method}")
            print(f"{count:>6} {method:<11} {row['patches']:>8} {row['bank']:>7} {row['coreset_s']:>9.1f} "
                  f"{row['fit_s']:>7.1f} {row['fit_mib']:>8.0f} {row['test_s']:>7.1f} {row['test_mib']:>8.0f} "
                  f"{row['image_auroc']:>9.3f} {row['pixel_auroc']:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
