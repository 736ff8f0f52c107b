"""Is FastFlow's gap to anomalib in the initial weights or in the training loop?

    .venv-compare/bin/python -m adbench.benchmark.experiments.fastflow_init_swap SPEC_DIR \\
        --seeds 0,1,2,3,4 --variant ours-init-in-anomalib --out-dir DIR

``SPEC_DIR`` is the ``runs/specs`` folder of a ``make compare ... COMPARE_METHODS=fastflow`` run
(its ``fastflow__ours.json`` and ``fastflow__anomalib.json``: data, budget, settings). Per seed,
one side is trained as the compare's worker trains it, with one change:

* ``ours-init-in-anomalib``: anomalib's ``Fastflow`` starts from our model's initial weights at
  that seed (every norm, coupling subnet, global scale and offset, and the channel permutations),
  then trains with anomalib's loop: its loss, batch order and step count;
* ``anomalib-init-in-ours``: the reverse, our ``FastFlow`` from anomalib's initial weights;
* ``ours-keep-last-batch``: ours, keeping each epoch's incomplete last batch as anomalib does;
* ``ours-torch-permutations``: ours, its blocks' channel permutations drawn with ``torch.randperm``
  (as anomalib's vendored block draws them) instead of NumPy's generator (FrEIA's); as there, every
  later torch draw (the later blocks' weights, the batch order) shifts with them.

The donor model is built as its own worker builds it (``seed_everything(seed)``, then the
model), inside Lightning's ``isolate_rng``, so the trained side draws its batches exactly as in
the compare. The copy is checked: the two models' flow outputs agree on a random image. Prints
our metrics per seed (``scoring.metrics_from_predictions``). Needs the compare environment
(anomalib) and its offline timm weights (``offline_weights``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

VARIANTS = ("ours-init-in-anomalib", "anomalib-init-in-ours", "ours-keep-last-batch", "ours-torch-permutations")
METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "pro_fpr05")


def flow_parts(model: Any) -> list[tuple[Any, Any]]:
    """``(norm, flow)`` per level of our ``FastFlow`` or of anomalib's ``FastflowModel``."""
    flows = model.fast_flow_blocks if hasattr(model, "fast_flow_blocks") else model.flows
    return list(zip(model.norms, flows, strict=True))


def copy_flow_weights(source: Any, target: Any) -> int:
    """Every norm and coupling-block tensor of ``source`` into ``target``; the number copied.

    Either model may be ours or anomalib's: the blocks are the same ``AllInOneBlock`` computation,
    their subnets the same two convolutions (anomalib pads with a ``ZeroPad2d`` layer, ours in the
    convolution), and the norms the same scale and shift (ours with a leading batch axis).
    """
    import torch

    copied = 0
    with torch.no_grad():
        for (norm_s, flow_s), (norm_t, flow_t) in zip(flow_parts(source), flow_parts(target), strict=True):
            for name in ("weight", "bias"):
                to = getattr(norm_t, name)
                to.copy_(getattr(norm_s, name).reshape(to.shape))
                copied += 1
            for block_s, block_t in zip(flow_s.module_list, flow_t.module_list, strict=True):
                for name in ("global_scale", "global_offset", "w_perm", "w_perm_inv"):
                    getattr(block_t, name).copy_(getattr(block_s, name))
                    copied += 1
                convs_s = [m for m in block_s.subnet if isinstance(m, torch.nn.Conv2d)]
                convs_t = [m for m in block_t.subnet if isinstance(m, torch.nn.Conv2d)]
                for conv_s, conv_t in zip(convs_s, convs_t, strict=True):
                    conv_t.weight.copy_(conv_s.weight)
                    conv_t.bias.copy_(conv_s.bias)
                    copied += 2
    return copied


def flow_output_difference(a: Any, b: Any, features: list[Any]) -> float:
    """Largest |z_a - z_b| over the levels for the same (unnormalised) ``features``, both in eval mode.

    The modules' train/eval modes are restored afterwards (Lightning keeps what it finds).
    """
    import torch

    modes = {m: m.training for model in (a, b) for m in model.modules()}
    a.eval()
    b.eval()
    try:
        with torch.no_grad():
            outputs = [[flow(norm(f))[0] for (norm, flow), f in zip(flow_parts(m), features, strict=True)]
                       for m in (a, b)]  # fmt: skip
    finally:
        for module, mode in modes.items():
            module.training = mode
    return max(float((za - zb).abs().max()) for za, zb in zip(*outputs, strict=True))


def _donor(spec: dict[str, Any], work_dir: Path) -> Any:
    """The other side's model, built as its worker builds it for ``spec['seed']``."""
    from lightning import seed_everything
    from lightning.pytorch.utilities.seed import isolate_rng

    from adbench.benchmark.compare.build_anomalib import build_anomalib
    from adbench.benchmark.compare.build_ours import build_ours

    with isolate_rng():  # the trained side's batches and draws stay as in the compare
        seed_everything(spec["seed"], workers=True, verbose=False)
        if spec["side"] == "ours":
            return build_ours(spec)[0]
        return build_anomalib(spec, work_dir)[0].model


def run_seed(specs: dict[str, dict[str, Any]], seed: int, variant: str, out_dir: Path) -> Path:
    """Train one side of the pair at ``seed`` with the variant's change; the file of its predictions."""
    import numpy as np
    import torch

    import adbench.benchmark.compare.build_anomalib as anomalib_side
    import adbench.benchmark.compare.build_ours as our_side
    from adbench.benchmark.compare.worker import run_worker
    from adbench.models.fastflow import FastFlow

    trained = "anomalib" if variant == "ours-init-in-anomalib" else "ours"
    run_dir = out_dir / f"{variant}_seed{seed}"
    spec = {**specs[trained], "seed": seed, "threads": 1, "work_dir": str(run_dir / "work"),
            "predictions": str(run_dir / "predictions.npz")}  # fmt: skip
    donor_spec = {**specs["ours" if trained == "anomalib" else "anomalib"], "seed": seed}
    builders = {"ours": (our_side, "build_ours"), "anomalib": (anomalib_side, "build_anomalib")}
    module, name = builders[trained]
    original = getattr(module, name)

    def build_with_donor_weights(*args: Any) -> Any:
        model, data, notes = original(*args)
        target = model.model if trained == "anomalib" else model
        donor = _donor(donor_spec, run_dir / "donor")
        copied = copy_flow_weights(donor, target)
        ours = donor if trained == "anomalib" else target
        with torch.no_grad():
            features = ours.feature_extractor(torch.randn(2, 3, spec["image_size"], spec["image_size"]))
        diff = flow_output_difference(donor, target, features)
        if diff > 1e-4:
            raise RuntimeError(f"after copying {copied} tensors the flows still differ by {diff:.2e}")
        print(f"[{variant}] seed {seed}: {copied} tensors copied from the {donor_spec['side']} side; "
              f"flow outputs agree to {diff:.1e}", flush=True)  # fmt: skip
        return model, data, notes

    def build_with_torch_permutations(*args: Any) -> Any:
        numpy_permutation = np.random.permutation  # FrEIA's AllInOneBlock calls it once per block
        np.random.permutation = lambda n: torch.randperm(n).numpy()
        try:
            return original(*args)
        finally:
            np.random.permutation = numpy_permutation

    keep_last = FastFlow.drop_incomplete_batches
    try:
        if variant == "ours-keep-last-batch":
            FastFlow.drop_incomplete_batches = False
        elif variant == "ours-torch-permutations":
            setattr(module, name, build_with_torch_permutations)
        else:
            setattr(module, name, build_with_donor_weights)
        run_worker(spec)
    finally:
        setattr(module, name, original)
        FastFlow.drop_incomplete_batches = keep_last
    return Path(spec["predictions"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec_dir", type=Path, help="runs/specs of a FastFlow `make compare` run")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2,3,4")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--hf-cache", default=None, help="timm weights cache (default: the compare's)")
    args = parser.parse_args(argv)

    from adbench.benchmark.compare.offline_weights import DEFAULT_HF_CACHE, offline_hf_env

    os.environ.update(offline_hf_env(args.hf_cache or DEFAULT_HF_CACHE))  # as the compare's workers
    from adbench.benchmark.compare.scoring import load_ground_truth, metrics_from_predictions

    specs = {side: json.loads((args.spec_dir / f"fastflow__{side}.json").read_text()) for side in ("ours", "anomalib")}
    ours = specs["ours"]  # both sides test on the same images
    truth = load_ground_truth(ours["root"], ours["category"], ours["image_size"], ours["test_paths"])
    print("| variant | seed | " + " | ".join(METRICS) + " |\n|:--|--:|" + "--:|" * len(METRICS), flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        metrics = metrics_from_predictions(run_seed(specs, seed, args.variant, args.out_dir), truth)
        print(f"| {args.variant} | {seed} | " + " | ".join(f"{100 * metrics[k]:.1f}" for k in METRICS) + " |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
