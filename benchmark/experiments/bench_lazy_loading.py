"""Peak memory and speed of a split decoded into memory (eager) or on access (lazy), by its size.

    python -m adbench.benchmark.experiments.bench_lazy_loading [--images 2000,20000] [--size 256]
        [--data-dir DIR] [--paths eager,lazy] [--workers N] [--batch-size 32]

Writes ``max(--images)`` JPEG files (quality 90, as VisA and Real-IAD ship JPEG) of ``--size`` px
into ``--data-dir`` once (reused by later runs; a temporary folder, removed at the end, when none
is given): cheap random content, a coarse 16 x 16 grid of random colours with pixel noise of a
few levels, about 4 ms a file (PNG with that noise took 28 ms), so 20,000 files take a minute or
two on 2 cores. Each N gets a folder of hard links to the first N files. The files are written
at the size they are read, so decoding costs no resizing (real datasets' larger originals cost
more per image, on either path). Then, in a fresh process per (path, N), the folder dataset's training split
(``val_fraction=0``) is set up with ``preload`` true or false and read once through its
DataLoader (``--batch-size``; workers: the datamodule's default, 0 eager and
``default_workers()`` lazy, or ``--workers``). Prints one row per run: setup seconds (decoding
everything, or the header check), the pass, images per second over both, and the peak RSS
(``getrusage`` maxrss) of the process after importing torch, at the end, and of its largest
DataLoader worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PATHS = ("eager", "lazy")


def _write_images(folder: Path, start: int, stop: int, size: int) -> None:
    from PIL import Image

    for index in range(start, stop):
        rng = np.random.default_rng(index)
        cell = size // 16
        coarse = rng.integers(0, 248, (16, 16, 3), dtype=np.uint8).repeat(cell, 0).repeat(cell, 1)
        image = coarse + rng.integers(0, 8, coarse.shape, dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{index:06d}.jpg", quality=90)


def make_images(data_dir: Path, count: int, size: int) -> Path:
    """``count`` JPEG files of ``size`` px in ``data_dir/images-<size>`` (those already there are kept)."""
    folder = data_dir / f"images-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    if have < count:
        start = time.perf_counter()
        workers = os.cpu_count() or 1
        bounds = np.linspace(have, count, workers + 1).astype(int)
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_images, [folder] * workers, bounds[:-1], bounds[1:], [size] * workers))
        print(f"wrote {count - have} images of {size} px in {time.perf_counter() - start:.0f} s into {folder}")
    return folder


def split_folder(data_dir: Path, images: Path, count: int) -> Path:
    """``data_dir/n<count>-<size>``: hard links to the first ``count`` files of ``images``."""
    folder = data_dir / f"n{count}-{images.name.split('-')[-1]}"
    if len(list(folder.glob("*.jpg"))) != count:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in sorted(images.glob("*.jpg"))[:count]:
            os.link(path, folder / path.name)
    return folder


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def run_one(folder: Path, path: str, size: int, batch_size: int, workers: int | None) -> dict[str, float]:
    """One pass over ``folder`` (in this process): the row's figures."""
    import gc

    from adbench.datamodules.folder import FolderDataModule

    after_import = _peak_mib(resource.RUSAGE_SELF)
    data = FolderDataModule(root=str(folder), category="bench", normal=".", image_size=size, batch_size=batch_size,
                            val_fraction=0.0, num_workers=workers, preload=path == "eager")  # fmt: skip
    start = time.perf_counter()
    data.setup("fit")
    setup = time.perf_counter() - start
    loader = data.train_dataloader()
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        seen += len(batch["image"])
    seconds = time.perf_counter() - start
    used_workers = loader.num_workers
    del loader, batch
    gc.collect()  # persistent workers exit with their iterator, so their peak is counted below
    return {"images": len(data.train_set), "seen": seen, "workers": used_workers, "setup_s": setup,
            "pass_s": seconds, "import_mib": after_import, "peak_mib": _peak_mib(resource.RUSAGE_SELF),
            "worker_peak_mib": _peak_mib(resource.RUSAGE_CHILDREN)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="2000,20000", help="comma-separated split sizes")
    parser.add_argument("--size", type=int, default=256, help="image side in px, on disk and decoded")
    parser.add_argument("--data-dir", help="where the generated images are kept for later runs")
    parser.add_argument("--paths", default=",".join(PATHS), help="eager, lazy or both")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the datamodule's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: folder,path of one run
    args = parser.parse_args(argv)
    if args.child:
        folder, path = args.child.rsplit(",", 1)
        print(json.dumps(run_one(Path(folder), path, args.size, args.batch_size, args.workers)))
        return
    counts = [int(v) for v in args.images.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    if set(paths) - set(PATHS):
        parser.error(f"--paths takes {', '.join(PATHS)}, got {args.paths!r}")
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bench-lazy-"))
    try:
        images = make_images(data_dir, max(counts), args.size)
        print(f"{args.size} px JPEG, batch {args.batch_size}, one pass, {os.cpu_count()} CPUs; peak RSS in MiB")
        print("| path  | images | workers | setup s | pass s | images/s | RSS after import | peak RSS | worker peak |")
        print("|:------|-------:|--------:|--------:|-------:|---------:|-----------------:|---------:|------------:|")
        for count in counts:
            folder = split_folder(data_dir, images, count)
            for path in paths:
                command = [sys.executable, "-m", __spec__.name, "--child", f"{folder},{path}", "--size", str(args.size),
                           "--batch-size", str(args.batch_size)]  # fmt: skip
                if args.workers is not None:
                    command += ["--workers", str(args.workers)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"| {path} | {count} | failed (exit {done.returncode}): {done.stderr.strip()[-300:]} |")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rate = row["images"] / (row["setup_s"] + row["pass_s"])
                worker = f"{row['worker_peak_mib']:.0f}" if row["workers"] else "-"
                print(f"| {path:<5} | {row['images']:>6,} | {row['workers']:>7} | {row['setup_s']:>7.1f} | "
                      f"{row['pass_s']:>6.1f} | {rate:>8.0f} | {row['import_mib']:>16.0f} | {row['peak_mib']:>8.0f} | "
                      f"{worker:>11} |", flush=True)  # fmt: skip
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
