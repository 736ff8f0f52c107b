"""CPU allocator setting: freed large blocks are reused instead of faulted in again every step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from callbacks.allocator import ReuseFreedMemory

from .conftest import REPO

# Allocates, touches and frees a 64 MiB tensor ten times and prints the page faults
# of those cycles, before and after keep_freed_memory(); run in a fresh process
# because the setting is process-wide.
_SCRIPT = """
import resource, torch
from callbacks.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 * 2**20).sum()   # 64 MiB, written in full
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory()
print(default, applied, faults(), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_large_blocks_are_reused_without_page_faults() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, check=True)
    default, applied, first, later = (int(v) if v.isdigit() else v for v in result.stdout.split())
    assert applied == "True"
    # glibc's default: every 64 MiB block is a fresh mmap whose pages all fault when written
    # (10 x 16,384 faults with 4 KiB pages; fewer, but still one per page, with transparent huge pages).
    assert default > 100
    # Kept: the first cycle grows the heap once, later cycles reuse it and fault (almost) never.
    assert first < default
    assert later < 0.05 * default


def test_callback_rejects_a_negative_threshold() -> None:
    with pytest.raises(ValueError, match="trim_threshold_mb"):
        ReuseFreedMemory(trim_threshold_mb=-1)


def test_callback_applies_only_to_cpu_runs_that_train(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import torch

    import callbacks.allocator as allocator

    calls: list[int] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda mb: calls.append(mb) or True)

    def trainer(device: str) -> SimpleNamespace:
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

    trains, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    ReuseFreedMemory().setup(trainer("cpu"), frozen, "fit")  # PatchCore-like: nothing to train
    ReuseFreedMemory().setup(trainer("meta"), trains, "fit")  # not the CPU
    assert calls == []
    callback = ReuseFreedMemory(trim_threshold_mb=64)
    callback.setup(trainer("cpu"), trains, "fit")
    callback.setup(trainer("cpu"), trains, "test")  # once per process is enough
    assert calls == [64] and callback.applied
