"""Checkpoint -> :class:`Detector`: the preprocessing of training, the thresholds chosen on
validation, and scoring of single images or whole folders (CSV + maps)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from adbench import models
from adbench.callbacks.visualization import heat_overlay
from adbench.checkpoints import CHECKPOINT_KEY, check_not_legacy, metadata
from adbench.datamodules.base import IMAGE_SUFFIXES, DatasetError, read_image


@dataclass
class Prediction:
    """One scored image: the map at the image's own size, its score and the decision."""

    anomaly_map: np.ndarray  # (H, W) float32, larger = more anomalous
    score: float
    anomalous: bool | None  # score >= the image threshold chosen on validation; None without one


class Detector:
    """A trained method with the preprocessing it was trained with (resize, [0, 1] scaling)."""

    def __init__(self, model: models.AnomalyModule, image_size: int, image_threshold: float = math.nan,
                 pixel_threshold: float = math.nan, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.image_size = image_size
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold
        self.device = torch.device(device)

    def _tensor(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, 3, S, S) in [0, 1], and the image's own (H, W)."""
        if isinstance(image, str | Path):
            with Image.open(image) as opened:
                size = opened.size[::-1]
            array = read_image(Path(image), self.image_size)
        elif isinstance(image, Image.Image | np.ndarray):
            if isinstance(image, np.ndarray):  # uint8 HxW or HxWxC
                image = Image.fromarray(image.astype(np.uint8))
            size = image.size[::-1]
            array = np.asarray(image.convert("RGB").resize((self.image_size,) * 2, Image.Resampling.BILINEAR))
        elif isinstance(image, torch.Tensor):  # CHW or BCHW float in [0, 1]
            batch = image[None] if image.dim() == 3 else image
            size = tuple(batch.shape[-2:])
            batch = F.interpolate(batch.float(), size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
            return batch.to(self.device), size
        else:
            raise TypeError(f"cannot score a {type(image).__name__}: pass a path, PIL image, array or tensor")
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div(255.0)
        return tensor[None].to(self.device), size

    @torch.inference_mode()
    def predict(self, image: Any) -> Prediction:
        """Score one image (path, PIL image, uint8 HxW(xC) array, or float CHW tensor in [0, 1])."""
        batch, size = self._tensor(image)
        anomaly_map, score = self.model(batch.contiguous(memory_format=self.model.memory_format))
        full = F.interpolate(anomaly_map.float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        value = float(score[0])
        decided = None if math.isnan(self.image_threshold) else value >= self.image_threshold
        return Prediction(full.cpu().numpy(), value, decided)


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Detector:
    """The method in ``checkpoint`` (written by ``adbench fit`` or a sweep job), ready to score."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_not_legacy(state, path)
    meta = metadata(state)
    if not meta or "model" not in meta:
        raise ValueError(f"checkpoint {str(path)!r} has no {CHECKPOINT_KEY!r} entry: it was not written by "
                         "adbench's fit (or by a version before the entry existed); refit it")
    model_class = models.get_model_class(meta["model"])
    # LightningCLI adds its own keys ("_class_path", "_instantiator") beside the constructor arguments.
    model = model_class(**{k: v for k, v in state.get("hyper_parameters", {}).items() if not k.startswith("_")})
    model.load_state_dict(state["state_dict"])
    return Detector(model, int(meta.get("image_size") or 256), float(meta.get("image_threshold", math.nan)),
                    float(meta.get("pixel_threshold", math.nan)), device)


def _inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no image file or folder at {str(path)!r}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(path)!r}")
    return files


def predict_folder(detector: Detector, source: str | Path, output_dir: str | Path) -> Path:
    """Score every image under ``source`` (a file or a folder, recursively); write into ``output_dir``:
    ``predictions.csv`` (path, score, decision at the saved threshold), and per image
    ``maps/<name>.png`` (heat-map overlay, colour bar and score) and ``maps/<name>.npy`` (raw map)."""
    source, output_dir = Path(source), Path(output_dir)
    files = _inputs(source)
    maps = output_dir / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    rows = []
    for file in tqdm(files, desc="predict", unit="img"):
        result = detector.predict(file)
        relative = file.relative_to(source) if source.is_dir() else Path(file.name)
        stem = "__".join(relative.with_suffix("").parts)
        np.save(maps / f"{stem}.npy", result.anomaly_map)
        with Image.open(file) as opened:
            image = np.asarray(opened.convert("RGB"))
        Image.fromarray(heat_overlay(image, result.anomaly_map, detector.pixel_threshold,
                                     f"score {result.score:.4g}" + _decision(detector, result))).save(maps / f"{stem}.png")
        rows.append([relative.as_posix(), repr(result.score),
                     "" if result.anomalous is None else int(result.anomalous)])
    with open(output_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "anomalous"])
        writer.writerows(rows)
    return output_dir


def _decision(detector: Detector, result: Prediction) -> str:
    if result.anomalous is None:
        return " (no saved threshold)"
    verdict = "anomalous" if result.anomalous else "normal"
    return f" {'>=' if result.anomalous else '<'} threshold {detector.image_threshold:.4g}: {verdict}"


def predict_main(argv: list[str] | None = None) -> None:
    """``adbench predict --ckpt_path X --data.path P [--output DIR] [--device cpu]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="adbench predict", description="Score a folder (or one image) with a checkpoint.")
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--data.path", dest="path", required=True, help="an image file or a folder (searched recursively)")
    parser.add_argument("--output", help="output folder (default: <checkpoint's run folder>/predictions/<input name>)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    checkpoint = Path(args.ckpt_path)
    output = Path(args.output) if args.output else checkpoint.parent.parent / "predictions" / Path(args.path).stem
    predict_folder(load(checkpoint, device=args.device), args.path, output)
    print(f"[adbench] predictions: {output / 'predictions.csv'}; maps: {output / 'maps'}")
