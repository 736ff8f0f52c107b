"""Job records: one JSON file per (method, profile, category, seed), written atomically.

A record is written to a temporary file in the same folder, flushed to disk and
renamed over its final name, so a sweep killed at any instant leaves either the
previous record or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RUNS_FOLDER = "runs"
#: Statuses of a job that ran to the end (``warning``: with degenerate figures, see job.result_warnings).
FINISHED = ("ok", "warning")
# The runner's environment for each job process, copied by the job into its record:
#: a token per launch, so a stale record is never taken for a new one;
LAUNCH_TOKEN_VARIABLE = "ADBENCH_LAUNCH_TOKEN"
#: when the runner spawned the process (parallel jobs overlap from launch to finish).
LAUNCHED_AT_VARIABLE = "ADBENCH_LAUNCHED_UNIX"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A record, or None when the file is absent or unreadable (never raises on a bad file)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def iter_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable record (see :func:`scan_records` for the unreadable ones too)."""
    return scan_records(results_dir)[0]


def scan_records(results_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The readable records, and ``{"file", "error"}`` for each unreadable or truncated one."""
    folder = Path(results_dir) / RUNS_FOLDER
    if not folder.is_dir():
        return [], []
    records, errors = [], []
    for path in sorted(folder.glob("*.json")):
        record = read_record(path)
        if record is None:
            errors.append({"file": str(path), "error": _why_unreadable(path)})
        else:
            records.append(record)
    return records, errors


def _why_unreadable(path: Path) -> str:
    try:
        json.loads(path.read_text())
    except OSError as error:
        return f"unreadable: {error}"
    except json.JSONDecodeError as error:
        return f"not valid JSON (truncated?): {error}"
    return "not a JSON object"
