"""Peak memory and time of the pixel bootstrap, with and without thinning the sweep.

    python -m adbench.benchmark.experiments.bench_bootstrap_memory [--images 112] [--resamples 200] [--max-thresholds 65536]

A test split like a real category with large defects (e.g. transistor's missing parts):
``--images`` maps of 256 x 256 Gaussian noise, two thirds of them defective with one
rectangle of 60-190 px sides, raised inside. Large anomalous regions give millions of
distinct thresholds, which is what made the unthinned per-image counts take gigabytes.
Prints the intervals, the seconds and the process' peak RSS (run it once per setting:
the peak is the process').
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from adbench.callbacks.intervals import BOOTSTRAP_MAX_THRESHOLDS, bootstrap_intervals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=112)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--max-thresholds", type=int, default=BOOTSTRAP_MAX_THRESHOLDS)
    args = parser.parse_args(argv)
    rng, size, n = np.random.default_rng(0), 256, args.images
    labels = np.r_[np.zeros(n // 3), np.ones(n - n // 3)].astype(bool)
    masks = np.zeros((n, size, size), bool)
    maps = rng.normal(0, 1, (n, size, size)).astype(np.float32)
    for i in np.flatnonzero(labels):
        (top, left), (height, width) = rng.integers(0, 60, 2), rng.integers(60, 190, 2)
        masks[i, top : top + height, left : left + width] = True
        maps[i][masks[i]] += rng.normal(1.5, 1, masks[i].sum())
    scores = maps.reshape(n, -1).max(axis=1)
    start = time.perf_counter()
    intervals = bootstrap_intervals(scores, labels, maps, masks, n_resamples=args.resamples,
                                    max_thresholds=args.max_thresholds)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} images x {size}^2 px, {int(masks.sum())} anomalous px, {args.resamples} resamples, "
          f"max_thresholds {args.max_thresholds}: {seconds:.1f} s, peak RSS {peak:.0f} MiB")
    for metric, (low, high) in intervals.items():
        print(f"  {metric:<12s} [{low:.6f}, {high:.6f}]")


if __name__ == "__main__":
    main()
