"""Export a trained method to ONNX or TorchScript with its preprocessing inside.

The exported graph takes a float32 batch ``(B, 3, H, W)`` in ``[0, 1]`` of any size, resizes
it to the training size as :class:`adbench.Detector` does, runs the method, and returns the
anomaly map at the input's size ``(B, 1, H, W)`` and one score per image ``(B,)``.

    adbench export --ckpt_path runs/stpm/bottle/seed0/checkpoints/best.ckpt --format onnx
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import Detector, load

FORMATS = ("onnx", "torchscript")


class ExportedDetector(nn.Module):
    """Resize -> method -> map back at the input's size."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model, self.image_size = model.eval(), image_size

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        size = images.shape[-2:]
        resized = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        anomaly_map, score = self.model(resized)
        return F.interpolate(anomaly_map.float(), size=size, mode="bilinear", align_corners=False), score.float()


def export(detector: Detector, path: str | Path, fmt: str = "onnx", example_size: int | None = None) -> Path:
    """Write ``detector`` to ``path`` as ONNX (opset 18) or TorchScript (traced).

    ONNX: the TorchScript-based exporter, with dynamic batch and image size. A method it
    cannot trace (TSDN: torchmetrics' SSIM builds its kernel at run time) goes through
    ``torch.export`` instead, whose graph keeps the image size dynamic but fixes the batch
    at 1 (a warning says so).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportedDetector(detector.model.to(memory_format=torch.contiguous_format), detector.image_size).eval()
    side = example_size or detector.image_size
    example = torch.rand(1, 3, side, side)
    with torch.inference_mode(False), torch.no_grad():
        if fmt == "torchscript":
            # Tracing visits the module's properties; Lightning's `trainer` raises outside a Trainer unless scripting.
            detector.model._jit_is_scripting = True
            try:
                torch.jit.trace(wrapper, example, check_trace=False).save(str(path))
            finally:
                detector.model._jit_is_scripting = False
        else:
            names = {"input_names": ["images"], "output_names": ["anomaly_map", "image_score"]}
            try:
                torch.onnx.export(
                    wrapper, (example,), str(path), **names, opset_version=18, dynamo=False,
                    dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                  "anomaly_map": {0: "batch", 2: "height", 3: "width"}, "image_score": {0: "batch"}},
                )
            except Exception as error:  # noqa: BLE001 - retried with the other exporter, reported if both fail
                warnings.warn(f"TorchScript-based ONNX export failed ({type(error).__name__}); exporting through "
                              "torch.export: dynamic image size, batch fixed at 1", stacklevel=2)
                side_dim = {"min": 32, "max": 4096}
                torch.onnx.export(
                    wrapper, (example,), str(path), **names, opset_version=18, dynamo=True,
                    dynamic_shapes={"images": {2: torch.export.Dim("height", **side_dim),
                                               3: torch.export.Dim("width", **side_dim)}},
                )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adbench export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", help="file to write (default: beside the checkpoint, <checkpoint name>.onnx / .pt)")
    args = parser.parse_args(argv)
    checkpoint = Path(args.ckpt_path)
    output = Path(args.output) if args.output else checkpoint.with_name(
        checkpoint.stem + (".onnx" if args.format == "onnx" else ".pt"))
    export(load(checkpoint), output, args.format)
    print(f"[adbench] exported: {output}")
