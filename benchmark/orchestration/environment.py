"""What a run's numbers can depend on besides the code: packages, Python, CPU, threads, flags.

Every job record stores :func:`environment`. Its ``packages`` hold the version of every
installed distribution; ``lock`` says whether they are exactly the ones of
``requirements.lock`` (the hashed export of ``uv.lock`` that ``make venv`` installs) and
lists each difference. :func:`environment_key` digests the parts that can change a
number (not the host name or the commit), so the leaderboard can flag rows made in
different environments and :func:`environment_differences` can say what differs.

    python -m adbench.benchmark.orchestration.environment            # this environment, as a record stores it
    python -m adbench.benchmark.orchestration.environment --check    # exit 1 unless the installed packages equal the lock
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from adbench.project import project_root

#: The hashed export of uv.lock that `make venv` installs (`make lock` writes both).
LOCK_FILE = project_root() / "requirements.lock"
#: The highest instruction set oneDNN (torch's CPU convolutions) may use: its AVX-512 and AVX2
#: kernels round differently, and training amplifies the difference (results/reproducibility.md).
ONEDNN_ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
#: ATen's own vectorised kernels (reductions, activations) pick their width the same way.
ATEN_CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"


def pin_cpu_isa(isa: str) -> None:
    """Cap torch's CPU kernels at instruction set ``isa`` (oneDNN's name, e.g. ``AVX2``) in this process.

    Sets oneDNN's cap and ATen's matching capability (``avx2`` for the AVX2 levels, ``default`` below,
    the CPU's best from AVX-512 up). Both are read when the first kernel runs, so call this before
    any tensor computation."""
    isa = isa.upper()
    os.environ[ONEDNN_ISA_VARIABLE] = isa
    if isa.startswith("AVX2"):
        os.environ[ATEN_CAPABILITY_VARIABLE] = "avx2"
    elif isa in ("SSE41", "AVX"):
        os.environ[ATEN_CAPABILITY_VARIABLE] = "default"


#: Environment variables that set thread counts or numerics in the libraries we use.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                    "NUMEXPR_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", ATEN_CAPABILITY_VARIABLE)
#: Entries that name where or when a run was made, not what could change its numbers.
_PLACE_KEYS = ("host", "platform", "git_commit", "git_dirty", "cuda_visible_devices", "lock")


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (``Pillow`` -> ``pillow``, ``ml_dtypes`` -> ``ml-dtypes``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_packages() -> dict[str, str]:
    """Every distribution importable from this interpreter, ``{canonical name: version}``."""
    packages: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave a nameless dist-info folder
            packages.setdefault(canonical_name(name), dist.version)
    return dict(sorted(packages.items()))


def locked_packages(lock_file: str | Path = LOCK_FILE) -> dict[str, str]:
    """``{name: version}`` of the lock's requirements whose markers hold on this interpreter."""
    from packaging.requirements import Requirement

    text = Path(lock_file).read_text().replace("\\\n", " ")
    locked: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split(" --hash")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pins = [s.version for s in requirement.specifier if s.operator == "=="]
        if len(pins) != 1:
            raise ValueError(f"{lock_file}: {line!r} is not pinned to one version (==)")
        locked[canonical_name(requirement.name)] = pins[0]
    return locked


def lock_differences(installed: dict[str, str], locked: dict[str, str], ignore: tuple[str, ...] = ("adbench",)
                     ) -> dict[str, dict[str, str | None]]:
    """Each package whose installed version is not the locked one: ``{name: {installed, locked}}``
    (``None`` where it is missing on one side). The project itself is not in the lock."""
    names = sorted((set(installed) | set(locked)) - set(ignore))
    return {name: {"installed": installed.get(name), "locked": locked.get(name)}
            for name in names if installed.get(name) != locked.get(name)}


def _lock_status(packages: dict[str, str], lock_file: Path) -> dict[str, Any]:
    if not lock_file.is_file():
        return {"file": None, "sha256": None, "differences": None}
    differences = lock_differences(packages, locked_packages(lock_file))
    return {"file": lock_file.name, "sha256": hashlib.sha256(lock_file.read_bytes()).hexdigest(),
            "differences": differences}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_simd(np: Any) -> list[str] | None:
    """The SIMD extensions numpy dispatches to on this CPU (its transcendental kernels differ)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy < 2
        return None
    return [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD")


def environment(lock_file: str | Path = LOCK_FILE) -> dict[str, Any]:
    """Everything that can change a number, plus where the run was made (host, commit)."""
    import numpy as np
    import torch

    packages = installed_packages()
    cuda = torch.cuda.is_available()
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),  # kernel and distribution: recorded, not compared
        "libc": "-".join(platform.libc_ver()),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        # The kernel set ATen dispatches to (e.g. AVX512 vs AVX2): rounding differs between them.
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy_simd": _numpy_simd(np),
        "onednn_max_cpu_isa": os.environ.get(ONEDNN_ISA_VARIABLE),  # None: the CPU's best
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_variables": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        # Kept at the top level too: older readers of records look for these three.
        "torch": packages.get("torch", torch.__version__),
        "lightning": packages.get("lightning"),
        "timm": packages.get("timm"),
        "packages": packages,
        "lock": _lock_status(packages, Path(lock_file)),
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "git_commit": git_commit(),
        "git_dirty": None if dirty is None else bool(dirty),
    }


#: What of a CPU can change the numbers of a job whose instruction set is not pinned.
CPU_KEYS = ("cpu", "torch_cpu_capability", "numpy_simd")


def cpu_signature() -> dict[str, Any]:
    """This machine's :data:`CPU_KEYS`, as :func:`environment` records them (without listing packages)."""
    import numpy as np
    import torch

    return {"cpu": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "numpy_simd": _numpy_simd(np)}


def other_cpu(record_env: dict[str, Any], here: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (record's, here)}`` for the CPU entries in which a record's environment differs from
    ``here`` (:func:`cpu_signature`). A record that pinned its instruction set (``onednn_max_cpu_isa``)
    is compared on numpy's SIMD levels only, which the pin does not cover; a record without an
    environment, on nothing."""
    keys = ("numpy_simd",) if record_env.get("onednn_max_cpu_isa") else CPU_KEYS
    return {k: (record_env[k], here.get(k)) for k in keys if k in record_env and record_env[k] != here.get(k)}


def environment_key(env: dict[str, Any] | None) -> str | None:
    """A short digest of what in ``env`` can change a number (packages, Python, CPU, threads, flags);
    the same for two runs on identical set-ups whatever their host or commit. None: no record."""
    if not env or "packages" not in env:
        return None  # a record from before environments were recorded in full
    relevant = {k: v for k, v in env.items() if k not in _PLACE_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def environment_differences(envs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """What differs between environments: ``{entry: [value in each env]}`` for every entry that is
    not the same in all (packages compared one by one, as ``packages.<name>``)."""
    def flat(env: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in env.items() if k not in (*_PLACE_KEYS, "packages")}
        out.update({f"packages.{name}": version for name, version in (env.get("packages") or {}).items()})
        return out

    flats = [flat(e) for e in envs]
    keys = sorted(set().union(*flats)) if flats else []
    return {k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adbench.benchmark.orchestration.environment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every installed package is the locked version")
    parser.add_argument("--lock", default=str(LOCK_FILE), help="the lock to compare with (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.check:
        print(json.dumps(environment(args.lock), indent=2, default=str))
        return
    differences = lock_differences(installed_packages(), locked_packages(args.lock))
    if differences:
        lines = [f"  {n}: installed {d['installed'] or '-'}, locked {d['locked'] or '-'}"
                 for n, d in differences.items()]
        sys.exit(f"{sys.executable}: {len(differences)} package(s) differ from {args.lock}:\n" + "\n".join(lines)
                 + "\nrun `make venv` to install the lock exactly")
    print(f"{sys.executable}: every installed package is the version in {args.lock}")


if __name__ == "__main__":
    main()
