"""Validation scores of an STPM training's successive checkpoints under the old and the new validation recipe.

    python -m adbench.benchmark.experiments.bench_validation_recipe MVTEC_ROOT DTD_ROOT CKPT [CKPT ...]
        [--category bottle] [--image-size 256] [--split-seed 0]

STPM trains on normal images only, so its checkpoints do not depend on the validation
anomalies: scoring each epoch's checkpoint under both recipes gives the validation history
each recipe would have recorded for the same training. ``old``: DRAEM's recipe on the
training textures (the suite's validation before 2026-12-06); ``new``: the defaults
(``validation_recipe="validation"`` on held-out texture classes). Prints one JSON line per
checkpoint and recipe, then each recipe's :func:`~adbench.benchmark.orchestration.records.selection_saturation`.
"""

from __future__ import annotations

import argparse
import json

import torch
from lightning import Trainer

from adbench.benchmark.orchestration.records import selection_saturation
from adbench.callbacks.evaluation import AnomalyEvaluator
from adbench.datamodules import MVTecDataModule
from adbench.models.stpm import STPM

RECIPES = {"old": {"validation_textures": "shared", "validation_recipe": "draem"}, "new": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("textures")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--split-seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = {}
    for name, options in RECIPES.items():
        data[name] = MVTecDataModule(root=args.root, category=args.category, image_size=args.image_size,
                                     split_seed=args.split_seed, texture_source=args.textures, **options)
        data[name].setup("fit")
    history: dict[str, list[dict]] = {name: [] for name in RECIPES}
    for path in args.checkpoints:
        epoch = torch.load(path, map_location="cpu", weights_only=False)["epoch"]
        model = STPM.load_from_checkpoint(path, map_location="cpu").eval()
        for name, datamodule in data.items():
            evaluator = AnomalyEvaluator()
            Trainer(callbacks=[evaluator], logger=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu").validate(model, datamodule=datamodule, verbose=False)
            metrics = {k: round(float(evaluator.val_metrics[k]), 4)
                       for k in ("image_auroc", "pixel_auroc", "selection_score")}  # fmt: skip
            history[name].append({"epoch": epoch, **metrics})
            print(json.dumps({"recipe": name, **history[name][-1]}), flush=True)
    for name, scores in history.items():
        best = max(h["selection_score"] for h in scores)
        print(json.dumps({"recipe": name, "saturation": selection_saturation(scores, best)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
