"""Shared fixtures: the embedded dataset (generated once), and real data when it is available.

Real MVTec AD / DTD are found through ``MVTEC_ROOT`` / ``DTD_ROOT`` (falling back to
``../shared/data`` beside the checkout); tests that need them skip cleanly otherwise.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from adbench.datamodules.embedded import ensure_embedded_dataset

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared" / "data"


def _existing(variable: str, fallback: Path) -> str | None:
    value = os.environ.get(variable) or (str(fallback) if fallback.is_dir() else None)
    return value if value and Path(value).is_dir() else None


MVTEC_ROOT = _existing("MVTEC_ROOT", _SHARED / "mvtec_ad")
DTD_ROOT = _existing("DTD_ROOT", _SHARED / "dtd")

requires_mvtec = pytest.mark.skipif(
    MVTEC_ROOT is None or not (Path(MVTEC_ROOT) / "bottle").is_dir(),
    reason="MVTec AD bottle not available (set MVTEC_ROOT)",
)


@pytest.fixture(scope="session")
def embedded_root() -> Path:
    """The embedded procedural dataset at 256 px (generated on first use, then cached)."""
    return ensure_embedded_dataset()


@pytest.fixture(scope="session")
def dtd_root() -> Path | None:
    return Path(DTD_ROOT) if DTD_ROOT else None


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, for tests of tiny networks: on the shared 2-core machine two contended
    threads run small convolutions several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """Serves a file from a local HTTP server: ``serve(path)`` -> its URL."""
    servers = []

    def start(path: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(path.parent)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/{path.name}"

    yield start
    for server in servers:
        server.shutdown()
