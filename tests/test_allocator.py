"""CPU allocator setting: freed large blocks are reused instead of faulted in again every step."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from adbench.callbacks.allocator import ReuseFreedMemory

from .conftest import REPO


def _trainer(device: str) -> SimpleNamespace:
    """What ReuseFreedMemory reads of a Trainer: the strategy's root device."""
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

# Allocates, touches and frees a 64 MiB tensor ten times and prints the page faults
# of those cycles, before and after keep_freed_memory(); run in a fresh process
# because the setting is process-wide.
_SCRIPT = """
import resource, torch
from adbench.callbacks.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 * 2**20).sum()   # 64 MiB, written in full
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory()
print(default, applied, faults(), faults())
"""


@pytest.mark.slow
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
    import adbench.callbacks.allocator as allocator

    calls: list[int] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda mb: calls.append(mb) or True)
    trains, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    frozen.anchor = torch.nn.Parameter(torch.empty(0))  # PatchCore's and PaDiM's no-op optimiser's parameter
    ReuseFreedMemory().setup(_trainer("cpu"), frozen, "fit")  # PatchCore-like: nothing to train
    ReuseFreedMemory().setup(_trainer("meta"), trains, "fit")  # not the CPU
    assert calls == []
    callback = ReuseFreedMemory(trim_threshold_mb=64)
    callback.setup(_trainer("cpu"), trains, "fit")
    callback.setup(_trainer("cpu"), trains, "test")  # once per process is enough
    assert calls == [64] and callback.applied


# Four threads allocate with malloc; glibc's malloc_stats() then prints one "Arena N:"
# block per arena on stderr. Fresh process each time: the setting is process-wide.
_ARENA_SCRIPT = """
import ctypes, sys, threading
from adbench.callbacks.allocator import single_malloc_arena

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "single":
    assert single_malloc_arena()
barrier = threading.Barrier(4)

def allocate():
    barrier.wait()  # all four at once, so that the default hands out several arenas
    blocks = [libc.malloc(4096) for _ in range(2000)]
    for block in blocks:
        libc.free(block)

threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_single_malloc_arena_keeps_every_thread_in_one_arena() -> None:
    def arenas(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", _ARENA_SCRIPT, mode], cwd=REPO, capture_output=True,
                                text=True, check=True)
        return sum(line.startswith("Arena ") for line in result.stderr.splitlines())

    assert arenas("default") > 1  # glibc: an arena per contending thread
    assert arenas("single") == 1


def test_callback_sets_one_arena_on_every_cpu_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import adbench.callbacks.allocator as allocator

    calls: list[str] = []
    monkeypatch.setattr(allocator, "single_malloc_arena", lambda: calls.append("arena") or True)
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda mb: True)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    ReuseFreedMemory().setup(_trainer("meta"), frozen, "test")
    assert calls == []
    callback = ReuseFreedMemory()
    callback.setup(_trainer("cpu"), frozen, "test")  # PatchCore's test: nothing trains, the arena still applies
    callback.setup(_trainer("cpu"), frozen, "test")
    assert calls == ["arena"] and callback.single_arena and not callback.applied
