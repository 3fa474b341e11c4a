"""Files of a run directory: config.json, metrics.jsonl, summary.json, checkpoint.pt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spafl.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def write_json_atomic(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


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
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(temporary, path)


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


def write_run_config(run_dir: Path, config, preset: str | None, simulator) -> None:
    """config.json: the resolved config plus provenance (versions, commit, threads, data checksums)."""
    from spafl.provenance import provenance

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = simulator.federation.dataset
    write_json_atomic(run_dir / CONFIG, {
        "preset": preset,
        "config": config.to_dict(),
        "provenance": provenance(simulator.threads, dataset.checksums, dataset.source),
    })
