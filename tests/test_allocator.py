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
    default, applied, first, later = result.stdout.split()
    assert applied == "True"
    pages = 10 * 64 * 2**20 // 4096
    # glibc's default: every 64 MiB block is a fresh mmap, each of its 4 KiB pages faults.
    assert int(default) > 0.9 * pages
    # Kept: the first cycle grows the heap once, later cycles reuse it.
    assert int(first) < 0.2 * pages
    assert int(later) < 0.01 * pages


def test_callback_rejects_a_negative_threshold() -> None:
    with pytest.raises(ValueError, match="trim_threshold_mb"):
        ReuseFreedMemory(trim_threshold_mb=-1)
