"""Exported models (ONNX through onnxruntime, TorchScript) give the eager model's maps and scores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

from adbench import models
from adbench.api import Detector
from adbench.export import ExportedDetector, export

from .conftest import REPO

IMAGE_SIZE = 64


def _detector(name: str) -> Detector:
    """The method's quick profile at 64 px, untrained but deterministic (PatchCore: a random bank)."""
    torch.manual_seed(0)
    config = yaml.safe_load((REPO / "configs" / name / "quick.yaml").read_text())["model"].get("init_args", {})
    model = models.get_model_class(name)(**config).eval()
    if name == "patchcore":
        model.build_memory_bank(torch.randn(300, model.memory_bank.shape[1]))
    return Detector(model, IMAGE_SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_models())
def test_onnx_export_matches_the_eager_model(name: str, tmp_path: Path, one_thread: None) -> None:
    detector = _detector(name)
    path = export(detector, tmp_path / f"{name}.onnx", "onnx")
    images = torch.rand(1, 3, 80, 96, generator=torch.Generator().manual_seed(1))  # not the training size
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported_map, exported_score = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        eager_map, eager_score = ExportedDetector(detector.model, IMAGE_SIZE)(images)
    assert exported_map.shape == (1, 1, 80, 96)
    scale = np.abs(eager_map.numpy()).max()
    assert np.abs(exported_map - eager_map.numpy()).max() <= 1e-4 * scale
    np.testing.assert_allclose(exported_score, eager_score.numpy(), rtol=1e-5)


@pytest.mark.slow
def test_torchscript_export_and_cli(tmp_path: Path, embedded_root: Path) -> None:
    detector = _detector("stpm")
    path = export(detector, tmp_path / "stpm.pt", "torchscript")
    images = torch.rand(2, 3, 64, 64)
    traced_map, traced_score = torch.jit.load(str(path))(images)
    with torch.no_grad():
        eager_map, eager_score = ExportedDetector(detector.model, IMAGE_SIZE)(images)
    torch.testing.assert_close(traced_map, eager_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traced_score, eager_score, rtol=1e-5, atol=1e-6)

    result = subprocess.run([sys.executable, "-m", "adbench", "export", "--ckpt_path", str(tmp_path / "none.ckpt")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0 and "does not exist" in result.stderr
