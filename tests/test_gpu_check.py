"""The GPU check (benchmark/experiments/gpu_check.py): its refusal without CUDA, its CPU mode, compile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning import LightningModule
from torch import nn

from adbench.benchmark.experiments import gpu_check
from adbench.callbacks.compilation import CompileModules


def test_without_cuda_it_refuses_and_says_how_to_run_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no CUDA device" in error and "--cpu" in error and "CPU=1" in error
    assert not any(tmp_path.iterdir()), "nothing ran"


def test_a_bad_root_or_method_stops_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-root"
    assert gpu_check.main(["--cpu", "--root", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert gpu_check.main(["--cpu", "--methods", "stpn", "--out", str(tmp_path / "out")]) == 2
    assert "unknown method 'stpn'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_ddp_comparison_holds_its_tolerance() -> None:
    single = {"status": "ok", "metrics": {"image_auroc": 0.90, "pixel_auroc": 0.95}}
    close = {"status": "ok", "metrics": {"image_auroc": 0.895, "pixel_auroc": 0.951}}
    far = {"status": "ok", "metrics": {"image_auroc": 0.87, "pixel_auroc": 0.95}}
    assert gpu_check.ddp_comparison(single, close)["match"]
    assert not gpu_check.ddp_comparison(single, far)["match"]
    assert gpu_check.ddp_comparison(single, far)["difference"]["image_auroc"] == pytest.approx(0.03)
    failed = {"status": "failed", "error": "NCCL timeout", "metrics": {}}
    assert not gpu_check.ddp_comparison(single, failed)["match"]


def test_compile_modules_compiles_the_forward_and_the_training_step() -> None:
    class Method(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(x).square().mean()

    method = Method()
    # The eager backend traces without generating kernels: fast, on any machine.
    callback = CompileModules(backend="eager")
    callback.setup(None, method, "fit")  # type: ignore[arg-type]
    assert callback.compiled == ["forward", "training_step"]
    x = torch.randn(3, 4)
    assert torch.allclose(method(x), x @ method.net.weight.T + method.net.bias)
    for name in ("forward", "training_step"):  # torch.compile's wrapper, on the instance
        assert getattr(getattr(method, name), "_torchdynamo_orig_callable", None) is not None, name
    assert torch.allclose(method.training_step(x, 0), method.net(x).square().mean())
    assert list(method.state_dict()) == ["net.weight", "net.bias"], "checkpoints keep their keys"


@pytest.mark.slow
def test_cpu_mode_runs_the_whole_check_at_toy_size(
    tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpu_check.main(["--cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (result_file,) = tmp_path.glob("*/gpu_check.json")
    result = json.loads(result_file.read_text())
    assert [r["method"] for r in result["rows"]] == sorted(gpu_check.CPU_METHODS)
    for r in result["rows"]:
        assert r["status"] == "ok", r["error"]
        assert r["step_ms"] > 0 and r["test_images_per_s"] > 0 and r["peak_memory_mb"] > 100
        assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0
    ddp = result["ddp"]
    assert ddp["status"] == "ok" and ddp["match"], ddp
    assert all(math.isfinite(d) for d in ddp["difference"].values())
    assert (
        "| method" in printed
        and "DDP padim, 1 vs 2 devices" in printed
        and printed.rstrip().endswith(str(result_file))
    )
