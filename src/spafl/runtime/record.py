"""The run record: the files of a run directory, written the same way by every engine.

``config.json`` (the resolved config with provenance), ``metrics.jsonl`` (one
row per round), ``summary.json`` (final, best and sparsest rounds, totals).
Every file that replaces another is written by :func:`write_bytes_atomic`:
a temporary file in the same directory, fsynced, renamed over the old one,
and the directory fsynced, so a crash (even SIGKILL or a power loss) leaves
either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spafl.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"

#: Evaluation fields of a row; rounds between evaluations carry the last evaluated values.
EVAL_KEYS = ("accuracy", "accuracy_std_clients", "accuracy_weighted", "accuracy_majority", "loss", "density", "density_weighted", "clients_evaluated")


def fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    """Replace ``path`` by ``payload`` so that a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files left by a crash in the middle of an atomic write."""
    for stale in Path(run_dir).glob(".*.tmp-*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def claim_run_dir(run_dir: Path, resume_hint: str) -> None:
    """Refuse a directory that already holds a run (its config.json), or a path that is not a directory."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).exists():
        raise UserError(f"{run_dir} already holds a run; {resume_hint}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory")


def write_run_config(run_dir: Path, config, preset: str | None, provenance: dict[str, Any], engine: dict[str, Any] | None = None) -> None:
    """config.json: the resolved config, where it came from, and (for engines other than the simulator) the engine."""
    record: dict[str, Any] = {"preset": preset, "config": config.to_dict(), "provenance": provenance}
    if engine is not None:
        record["engine"] = engine
    write_json_atomic(Path(run_dir) / CONFIG, record)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config saved in a run directory; UserError if it is not a run (or not resumable from the CLI)."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a directory; expected a run directory written by `spafl run`")
    if not path.exists():
        raise UserError(f"{run_dir} is not a spafl run directory (no {CONFIG})")
    try:
        data = json.loads(path.read_text())
        config = data["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable or not a spafl run config") from None
    if (data.get("provenance") or {}).get("data_source") == "arrays":
        raise UserError(f"{run_dir} was started from Python with your own model and arrays; resume it with spafl.run(..., resume=True)")
    return config


# -- metrics.jsonl ----------------------------------------------------------------------
def metrics_row(base: dict[str, Any], last_eval: dict[str, Any] | None, evaluated: bool, seconds: float) -> dict[str, Any]:
    """One metrics.jsonl row: round facts from ``base``, evaluation values (carried when not ``evaluated``)."""
    carried = last_eval or {}
    row = {"round": base["round"], "evaluated": evaluated}
    row.update({key: carried.get(key) for key in EVAL_KEYS})
    row.update({k: v for k, v in base.items() if k != "round"})
    row["seconds"] = seconds
    return row


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash mid-write: everything before it is valid
    return rows


def truncate_metrics(path: Path, last_round: int) -> None:
    """Keep only rows up to ``last_round`` (what the checkpoint has); rounds after it will be re-run."""
    rows = [r for r in read_metrics(path) if r["round"] <= last_round] if path.exists() else []
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


class MetricsFile:
    """metrics.jsonl opened for appending rows; :meth:`sync` puts them on disk (before a checkpoint refers to them)."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a")

    def append(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def sync(self) -> None:
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def summarize_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: final, best-round and sparsest-round figures, totals."""
    from spafl.metrics import GIGA

    evaluated = [r for r in rows if r["evaluated"] and r["round"] > 0] or [r for r in rows if r["evaluated"]]
    final = rows[-1]
    best = max(evaluated, key=lambda r: (r["accuracy"], -r["round"]))
    sparsest = min(evaluated, key=lambda r: (r["density"], r["round"]))
    return {
        "rounds": final["round"],
        "final": {key: final[key] for key in ("round", "accuracy", "accuracy_std_clients", "accuracy_weighted", "accuracy_majority", "loss", "density", "density_weighted")},
        "best_round": {"round": best["round"], "accuracy": best["accuracy"], "density": best["density"]},
        "lowest_density": {"round": sparsest["round"], "density": sparsest["density"], "accuracy": sparsest["accuracy"]},
        "gbit_total": final["bits_cum"] / GIGA,
        "bits_total": final["bits_cum"],
        "flops_total": final["flops_cum"],
        "seconds_total": sum(r["seconds"] for r in rows),
    }
