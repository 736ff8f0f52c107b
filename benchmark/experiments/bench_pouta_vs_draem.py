"""POUTA vs DRAEM at the same widths: parameters and CPU inference time per image.

    python -m adbench.benchmark.experiments.bench_pouta_vs_draem [--recon-width 128] [--disc-width 64] [--size 256]
        [--batch-sizes 1,8] [--runs 7] [--warmup 2] [--threads N]

POUTA's claim (Wang et al., TCSVT 2024) is that reusing the reconstructive
network's features removes the discriminative encoder, so the model is smaller
and faster than DRAEM. Both models are built with the same reconstructive
network (``recon_base_width``) and the same discriminative base width, in eval
mode, and timed on random images under ``torch.inference_mode`` through their
``forward`` (the full method: networks, sigmoid, image score). Each batch size
gets ``--warmup`` untimed calls, then the median over ``--runs`` timed calls,
divided by the batch size; the models take turns call by call, so that drifts in
the machine's load fall on all of them alike. Forward FLOPs per image are counted
too (``torch.utils.flop_counter`` on the meta device): a figure no load changes.
The POUTA ablation with image-level input (its own discriminative encoder) is
timed too, to show where the difference comes from.

DRAEM is built with ``decoder_layout="symmetric"``: POUTA's reconstructive network
mirrors its encoder (its discrepancy modules compare encoder and decoder stage by
stage), so this is the setting in which both methods share the same
reconstructive network, the premise of the comparison. DRAEM with the reference
implementation's narrower decoders (its default) is listed as a fourth row.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adbench.models.draem import DRAEM
from adbench.models.pouta import POUTA


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def interleaved_ms_per_image(
    models: dict[str, nn.Module], batch_size: int, size: int, runs: int, warmup: int
) -> dict[str, float]:
    """Median wall time of ``model(images)`` per image, in ms, for each model.

    The models take turns call by call (A, B, C, A, B, C, ...), so a change in the machine's
    load or clock during the measurement falls on all of them alike instead of on whichever
    model happened to be timed at that moment.
    """
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for index in range(warmup + runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                if index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) / batch_size for name, t in times.items()}


def gflops_per_image(model: nn.Module, size: int) -> float:
    """Forward FLOPs of one image (counted on the meta device: no computation, exact for convs)."""
    meta = copy.deepcopy(model).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 1e9


def build_models(recon_width: int, disc_width: int) -> dict[str, nn.Module]:
    builders: dict[str, Callable[[], nn.Module]] = {
        "DRAEM": lambda: DRAEM(
            recon_base_width=recon_width, disc_base_width=disc_width, decoder_layout="symmetric"
        ),
        "POUTA": lambda: POUTA(recon_base_width=recon_width, disc_base_width=disc_width),
        "POUTA (image-level input)": lambda: POUTA(
            recon_base_width=recon_width, disc_base_width=disc_width, disc_input="image"
        ),
        "DRAEM (reference decoders)": lambda: DRAEM(recon_base_width=recon_width, disc_base_width=disc_width),
    }
    return {name: build().eval() for name, build in builders.items()}


def discriminative_parameters(model: nn.Module) -> int:
    """Everything outside the reconstructive network (shared by construction between the two methods)."""
    return count_parameters(model) - count_parameters(model.reconstructive)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recon-width", type=int, default=128, help="reconstructive base width (paper: 128)")
    parser.add_argument("--disc-width", type=int, default=64, help="discriminative base width (DRAEM paper: 64)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    torch.manual_seed(0)
    models = build_models(args.recon_width, args.disc_width)

    print(f"widths: reconstructive {args.recon_width}, discriminative {args.disc_width}; "
          f"{args.size} px, CPU, {torch.get_num_threads()} thread(s), median of {args.runs} interleaved "
          f"runs after {args.warmup} warm-up")  # fmt: skip
    header = f"{'model':<28}{'params (M)':>12}{'disc. (M)':>12}{'GFLOP/img':>12}" + "".join(
        f"{f'ms/img b={b}':>14}" for b in batch_sizes
    )
    print(header)
    print("-" * len(header))
    results: dict[str, dict[str, float]] = {
        name: {"params": count_parameters(m), "disc": discriminative_parameters(m),
               "gflops": gflops_per_image(m, args.size)}
        for name, m in models.items()
    }  # fmt: skip
    # The reconstructive network alone (the same in every model) is timed in the same rounds, so
    # the part each method adds on top of it can be read off: where POUTA and DRAEM differ.
    shared = "reconstructive net (shared)"
    timed = {**models, shared: models["DRAEM"].reconstructive}
    for b in batch_sizes:
        for name, ms in interleaved_ms_per_image(timed, b, args.size, args.runs, args.warmup).items():
            results.setdefault(name, {})[f"b{b}"] = ms
    recon = results.pop(shared)
    recon["gflops"] = gflops_per_image(models["DRAEM"].reconstructive, args.size)
    columns = ["params", "disc", "gflops"] + [f"b{b}" for b in batch_sizes]
    for name, row in results.items():
        print(f"{name:<28}{row['params'] / 1e6:>12.2f}{row['disc'] / 1e6:>12.2f}{row['gflops']:>12.1f}"
              + "".join(f"{row[f'b{b}']:>14.1f}" for b in batch_sizes))  # fmt: skip
    pouta, draem = results["POUTA"], results["DRAEM"]
    print("-" * len(header))
    print(f"{'POUTA / DRAEM':<28}" + "".join(
        f"{pouta[c] / draem[c]:>{12 if i < 3 else 14}.2f}" for i, c in enumerate(columns)))  # fmt: skip
    print(f"\nbeyond the shared reconstructive network ({recon['gflops']:.1f} GFLOP/img, "
          + ", ".join(f"{recon[f'b{b}']:.1f} ms/img at b={b}" for b in batch_sizes) + "):")  # fmt: skip
    for name in ("DRAEM", "POUTA"):
        row = results[name]
        print(f"{name:<28}{'':>24}{row['gflops'] - recon['gflops']:>12.1f}"
              + "".join(f"{row[f'b{b}'] - recon[f'b{b}']:>14.1f}" for b in batch_sizes))  # fmt: skip
    extra = {c: (pouta[c] - recon[c]) / (draem[c] - recon[c]) for c in columns[2:]}
    print(f"{'POUTA / DRAEM':<28}{'':>24}" + "".join(
        f"{extra[c]:>{12 if i == 0 else 14}.2f}" for i, c in enumerate(columns[2:])))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
