"""Eager PyTorch vs exported ONNX (onnxruntime) images/s for every registered method.

    python -m adbench.benchmark.experiments.bench_export [--size 256] [--batch 8] [--repeats 5] [--methods stpm,draem]

Each method is built from its quick profile (untrained: speed does not depend on the
weights; PatchCore gets a random memory bank of ``--bank`` patches), wrapped with its
preprocessing (:class:`adbench.export.ExportedDetector`), exported to ONNX, and both are
timed on the same random batch (best of ``--repeats`` after one warm-up).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch
import yaml

from adbench import models
from adbench.api import Detector
from adbench.export import ExportedDetector, export
from adbench.project import config_dir


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bank", type=int, default=16384, help="PatchCore memory-bank patches")
    parser.add_argument("--methods", help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    names = args.methods.split(",") if args.methods else models.list_models()
    images = torch.rand(args.batch, 3, args.size, args.size)
    print(f"batch {args.batch} x {args.size}px, torch threads {torch.get_num_threads()}")
    print(f"{'method':<12s} {'eager img/s':>12s} {'onnx img/s':>12s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            config = yaml.safe_load((config_dir() / name / "quick.yaml").read_text())["model"].get("init_args", {})
            model = models.get_model_class(name)(**config).eval()
            if name == "patchcore":
                model.build_memory_bank(torch.randn(args.bank, model.memory_bank.shape[1]))
            detector = Detector(model, args.size)
            path = export(detector, Path(folder) / f"{name}.onnx")
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            batch = images[:1] if session.get_inputs()[0].shape[0] == 1 else images  # torch.export: batch 1
            wrapper = ExportedDetector(model, args.size)
            with torch.inference_mode():
                eager = _best(lambda w=wrapper, b=batch: w(b), args.repeats)
            exported = _best(lambda s=session, b=batch: s.run(None, {"images": b.numpy()}), args.repeats)
            n = batch.shape[0]
            print(f"{name:<12s} {n / eager:12.1f} {n / exported:12.1f} {eager / exported:7.2f}"
                  + ("  (exported with batch 1)" if n == 1 and args.batch > 1 else ""))


if __name__ == "__main__":
    main()
