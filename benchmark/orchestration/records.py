"""Job records: one JSON file per (method, profile, category, seed), written atomically.

A record is written to a temporary file in the same folder, flushed to disk and
renamed over its final name, so a sweep killed at any instant leaves either the
previous record or the new one, never half a file. Whether a job's validation
signal could rank its checkpoints is decided here too (:func:`selection_saturation`),
from the validation history every record keeps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from adbench.callbacks.evaluation import NOT_READY_SCORE

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


#: The selection score's maximum possible value (a mean of AUROCs), and how close to it counts as reaching it.
SELECTION_MAXIMUM = 1.0
SATURATION_TOLERANCE = 1e-6
#: A later validation must beat the first by more than this to count as an improvement.
SATURATION_TIE = 0.002


def selection_saturation(history: list[dict[str, Any]], best: float | None) -> dict[str, Any]:
    """Whether the validation selection score could rank the job's checkpoints.

    Over the validated epochs that were candidates (staged methods' not-ready epochs are
    not), ``saturated`` is True when either

    * ``reason="maximum"``: the best score reached its maximum possible value, 1 (within
      :data:`SATURATION_TOLERANCE`): every validation anomaly was ranked perfectly, so
      nothing can tell the epochs that do so apart; or
    * ``reason="first"``: the first validation's score was already the best: no later
      one beat it by more than :data:`SATURATION_TIE` (a job validated once is this case),

    and False otherwise; None when no candidate epoch was validated (nothing to rank).
    """
    scores = [h["selection_score"] for h in history if h.get("selection_score", NOT_READY_SCORE) != NOT_READY_SCORE]
    if best is None or not scores:
        return {"saturated": None, "reason": None, "ranked_epochs": len(scores)}
    if max(best, *scores) >= SELECTION_MAXIMUM - SATURATION_TOLERANCE:
        reason = "maximum"
    elif max(scores[1:], default=-math.inf) <= scores[0] + SATURATION_TIE:
        reason = "first"
    else:
        reason = None
    return {"saturated": reason is not None, "reason": reason, "ranked_epochs": len(scores)}


def record_saturated(record: dict[str, Any]) -> bool | None:
    """:func:`selection_saturation` of a record's validation history (so every record, old or new,
    is judged by today's definition); None for an unfinished job or one that validated nothing."""
    selection = record.get("selection") or {}
    if record.get("status") not in FINISHED or not selection:
        return None
    return selection_saturation(selection.get("history") or [], selection.get("best_val_score"))["saturated"]


def saturation_rate(records: list[dict[str, Any]]) -> tuple[int, int]:
    """``(k, n)``: of the ``n`` finished jobs whose validation ranked checkpoints at all, ``k`` saturated."""
    verdicts = [v for v in map(record_saturated, records) if v is not None]
    return sum(verdicts), len(verdicts)
