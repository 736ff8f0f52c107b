"""FastFlow: maps and scores, an invertible flow with an exact log-determinant, the likelihood loss falls,
float32 flows under bf16 autocast, detection of the embedded defects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning import seed_everything

from adbench.benchmark.experiments.fastflow_init_swap import (
    copy_flow_weights,
    flow_output_difference,
)
from adbench.models import create_model
from adbench.models.fastflow import FastFlow, PositionLayerNorm, build_flow, negative_log_likelihood

from .helpers import SIZE, TEST_SEED, assert_bf16_training_is_finite, fit_and_test, small_datamodule


def _model(**kwargs: object) -> FastFlow:
    return FastFlow(**{"backbone": "tf_efficientnet_lite0", "layers": (1, 2, 3), "flow_steps": 4, "norm_image_size": SIZE,
                       **kwargs})  # fmt: skip


@pytest.mark.parametrize("height, width", [(SIZE, SIZE), (64, 96)])
def test_map_shape_range_and_score(height: int, width: int, one_thread: None) -> None:
    torch.manual_seed(0)
    model = _model().eval()
    images = torch.rand(3, 3, height, width)
    with torch.no_grad():
        anomaly_map, score = model(images)
        nll_map, _ = _model(map_kind="nll").eval()(images)
    assert anomaly_map.shape == (3, 1, height, width) and score.shape == (3,)
    # The negated probability exp(-0.5 mean_c z^2) lies in [-1, 0); the negative log-likelihood map is >= 0.
    assert anomaly_map.dtype == torch.float32 and anomaly_map.min() >= -1 and anomaly_map.max() < 0
    assert nll_map.min() >= 0
    torch.testing.assert_close(score, anomaly_map.flatten(1).amax(dim=1))


def test_flows_follow_the_backbone_levels_and_kernel_pattern() -> None:
    model = _model(flow_steps=4, hidden_ratio=0.5)
    assert [flow.shapes[0][0] for flow in model.flows] == [24, 40, 112]
    kernels = [block.subnet[0].kernel_size[0] for block in model.flows[0]]
    assert kernels == [3, 1, 3, 1]
    assert [block.subnet[0].out_channels for block in model.flows[0]] == [6] * 4  # 0.5 x the 12 passive channels
    only3 = build_flow(8, 3, conv3x3_only=True, hidden_ratio=1.0, clamp=2.0)
    assert [block.subnet[0].kernel_size[0] for block in only3] == [3, 3, 3]
    # Only the LayerNorms and the flows train; the fixed permutations are not optimised.
    optimised = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in model.feature_extractor.parameters())
    assert not any(id(block.w_perm) in optimised for flow in model.flows for block in flow)
    with pytest.raises(ValueError, match="map_kind"):
        _model(map_kind="density")


def test_position_layer_norm_is_the_reproductions_layer_norm_and_resamples_for_other_sizes() -> None:
    torch.manual_seed(0)
    ours, reference = PositionLayerNorm(5, (8, 8)), torch.nn.LayerNorm([5, 8, 8])
    with torch.no_grad():  # a learned-looking affine, the same in both
        reference.weight.copy_(1 + torch.randn(5, 8, 8))
        reference.bias.copy_(torch.randn(5, 8, 8))
        ours.weight.copy_(reference.weight[None])
        ours.bias.copy_(reference.bias[None])
    x = 3 * torch.randn(2, 5, 8, 8) + 1
    torch.testing.assert_close(ours(x), reference(x))
    # Another size: normalised over the whole map, then the affine resampled to it (bilinear).
    small = torch.randn(2, 5, 4, 4)
    weight = F.interpolate(ours.weight, size=(4, 4), mode="bilinear", align_corners=False)
    bias = F.interpolate(ours.bias, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours(small), F.layer_norm(small, (5, 4, 4)) * weight + bias)


def test_layer_norm_kinds_and_their_learned_parameters() -> None:
    # Per position: scale and shift on the grids of norm_image_size (64 px: 16 x 16, 8 x 8 and 4 x 4 for strides 4, 8, 16).
    assert [n.weight.shape for n in _model().norms] == [(1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4)]
    assert [n.weight.shape for n in _model(norm_image_size=128).norms] == [(1, 24, 32, 32), (1, 40, 16, 16), (1, 112, 8, 8)]
    assert [n.weight.shape for n in _model(layer_norm="channel").norms] == [(24,), (40,), (112,)]
    assert not list(_model(layer_norm="none").norms.parameters())
    with pytest.raises(ValueError, match="layer_norm must be one of .*got True"):
        _model(layer_norm=True)  # the boolean of before 2026-12-07
    with pytest.raises(ValueError, match="norm_image_size 8 is smaller than the backbone's largest stride 16"):
        _model(norm_image_size=8)


def test_flow_is_invertible_and_its_log_determinant_is_exact() -> None:
    torch.manual_seed(0)
    flow = build_flow(4, 4, conv3x3_only=False, hidden_ratio=1.0, clamp=2.0).double()
    with torch.no_grad():  # move away from the near-identity initialisation
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, log_det = flow(x)
    for b in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 4, 3, 3))[0].flatten(), x[b].flatten())
        sign, brute_force = torch.linalg.slogdet(jacobian)
        assert sign != 0
        torch.testing.assert_close(log_det[b], brute_force, rtol=1e-9, atol=1e-9)
    x_back, log_det_back = flow(z, rev=True)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_det_back, -log_det)


def test_negative_log_likelihood_is_per_position() -> None:
    z = torch.full((2, 3, 4, 5), 2.0)
    log_det = torch.tensor([20.0, 40.0])
    # 0.5 * 3 channels * 2^2 = 6 per position, minus log|det| / 20 positions (1 and 2).
    torch.testing.assert_close(negative_log_likelihood(z, log_det), torch.tensor(6.0 - 1.5))


def test_training_reduces_the_negative_log_likelihood(embedded_root: Path, one_thread: None) -> None:
    seed_everything(TEST_SEED)
    model = _model()
    data = small_datamodule(embedded_root, "weave")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = model.configure_optimizers()
    model.train()
    losses = []
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        for _ in range(10):
            loss = model.training_step(batch, 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 10, losses


def test_flows_stay_float32_under_bf16_autocast(one_thread: None) -> None:
    model = _model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model._flow_outputs(torch.rand(2, 3, SIZE, SIZE))
        anomaly_map, score = model(torch.rand(2, 3, SIZE, SIZE))
    assert all(z.dtype == torch.float32 and log_det.dtype == torch.float32 for z, log_det in outputs)
    assert anomaly_map.dtype == torch.float32 and torch.isfinite(anomaly_map).all() and torch.isfinite(score).all()


def test_registered_with_the_paper_defaults() -> None:
    model = create_model("fastflow", weights="random")
    assert model.hparams.backbone == "wide_resnet50_2" and model.hparams.flow_steps == 8
    assert [flow.shapes[0][0] for flow in model.flows] == [256, 512, 1024]
    # The reproductions' per-position LayerNorms at 256 px: 2 x (256 * 64^2 + 512 * 32^2 + 1024 * 16^2) parameters.
    assert model.hparams.layer_norm == "position" and model.hparams.norm_image_size == 256
    assert sum(p.numel() for p in model.norms.parameters()) == 3_670_016
    assert (model.hparams.lr, model.hparams.weight_decay) == (1e-3, 1e-5)


@pytest.mark.slow
def test_separates_embedded_defects_after_brief_training(embedded_root: Path, one_thread: None) -> None:
    _, metrics = fit_and_test(_model, embedded_root, steps=60, category="weave")
    # Measured on weave at 64 px, 4 flow steps, 60 steps (2026-12-07, dataset v2, per-position LayerNorm):
    # image AUROC 0.992, 0.978, 0.978 and pixel AUROC 0.970, 0.975, 0.975 for seeds 0, 1, 2 (PRO
    # 0.916-0.927; the per-channel norm: image 0.981, 0.953, 0.969). After a single step: image 0.367-0.392,
    # pixel 0.764-0.785. Bounds well below the lowest value seen.
    assert metrics["image_auroc"] > 0.85 and metrics["pixel_auroc"] > 0.9, metrics


@pytest.mark.slow
def test_bf16_mixed_training_stays_finite(embedded_root: Path, one_thread: None) -> None:
    assert_bf16_training_is_finite(_model, embedded_root, steps=4)


def test_init_swap_experiment_copies_every_flow_tensor_and_keeps_modes(one_thread: None) -> None:
    # benchmark/experiments/fastflow_init_swap.py moves one model's initial weights into another (ours or
    # anomalib's); between two of ours the copy must make the flows agree, and leave the train/eval modes.
    torch.manual_seed(0)
    source = _model()
    torch.manual_seed(1)
    target = _model().train()
    with torch.no_grad():  # perturb the norms too: they start at ones and zeros on both
        for norm in source.norms:
            norm.weight.add_(torch.randn_like(norm.weight))
    features = source.feature_extractor(torch.rand(2, 3, SIZE, SIZE))
    assert flow_output_difference(source, target, features) > 1e-2
    copied = copy_flow_weights(source, target)
    # Per level: the norm's scale and shift, per block 4 tensors and the subnet's two convolutions.
    assert copied == 3 * (2 + 4 * (4 + 4))
    assert flow_output_difference(source, target, features) < 1e-6
    assert target.training and all(m.training for m in target.flows.modules())
