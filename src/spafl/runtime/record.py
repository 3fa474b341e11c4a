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
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spafl.errors import UserError, file_error, read_bounded, short_path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"

#: Evaluation fields of a row; rounds between evaluations carry the last evaluated values.
EVAL_KEYS = ("accuracy", "accuracy_std_clients", "accuracy_weighted", "accuracy_majority", "loss", "density", "density_weighted", "clients_evaluated")
#: Fields every row has: numbers, and evaluation figures (numbers, or None where an engine has no such figure or
#: no evaluation happened yet; an evaluated row always has its accuracy and density, which summaries compare).
ROW_NUMBERS = ("bits_cum", "flops_cum", "seconds")
ROW_EVAL_NUMBERS = EVAL_KEYS[:7]
ROW_EVALUATED_NUMBERS = ("accuracy", "density")
#: config.json is a few KiB; anything larger is not one.
MAX_CONFIG_BYTES = 16 << 20
#: A row is well under 1 MiB (its longest field lists the sampled clients); a longer line is not a row.
MAX_ROW_BYTES = 16 << 20


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block is done, then deliver it (main thread only).

    For writes that must not stop half-way: a ``torch.save`` interrupted
    inside turns the KeyboardInterrupt into its own RuntimeError, and a
    checkpoint written with the rows it refers to should be complete.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # the handler that was there (KeyboardInterrupt) runs now


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
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk or an interrupt leaves the old file, and no half-written one
        raise
    fsync_directory(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files left by a crash in the middle of an atomic write."""
    for stale in Path(run_dir).glob(".*.tmp-*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def check_writable_dir(directory: str | Path, what: str) -> None:
    """UserError (one line: what is wrong, where) unless files can be created in ``directory``.

    Missing directories are created for the test and removed again, so a
    command that stops later (a bad config) leaves nothing behind.
    """
    directory = Path(directory)
    made: list[Path] = []
    try:
        missing = []
        for candidate in (directory, *directory.parents):
            if os.path.isdir(candidate):
                break
            if os.path.lexists(candidate):
                raise UserError(f"{what} {short_path(directory)}: {short_path(candidate)} is a file, not a directory")
            missing.append(candidate)
        for candidate in reversed(missing):
            try:
                candidate.mkdir()
            except FileNotFoundError:  # its parent exists: a file system such as /proc that holds no directories of ours
                raise UserError(f"cannot create {what} {short_path(directory)}: the file system of {short_path(candidate.parent)} "
                                "does not allow it") from None
            made.append(candidate)
        probe = directory / f".spafl-write-test-{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise file_error(error, f"cannot write to {what} {short_path(directory)}", directory) from None
    finally:
        for candidate in reversed(made):
            try:
                candidate.rmdir()
            except OSError:
                pass


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
    if not os.path.isdir(run_dir):
        raise UserError(f"{short_path(run_dir)} is not a directory; expected a run directory written by `spafl run`")
    if not os.path.lexists(path):
        raise UserError(f"{short_path(run_dir)} is not a spafl run directory (no {CONFIG})")
    try:
        data = json.loads(read_bounded(path, MAX_CONFIG_BYTES, "run config").decode("utf-8"))
        config = data["config"]
    except (ValueError, KeyError, TypeError):  # not UTF-8, not JSON, not an object with a "config" object
        raise UserError(f"{short_path(path)} is unreadable or not a spafl run config") from None
    if not isinstance(config, dict):
        raise UserError(f"{short_path(path)} is not a spafl run config (its \"config\" is not an object)")
    provenance = data.get("provenance")
    if isinstance(provenance, dict) and provenance.get("data_source") == "arrays":
        raise UserError(f"{run_dir} was started from Python with your own model and arrays; resume it with spafl.run(..., resume=True)")
    return config


# -- metrics.jsonl ----------------------------------------------------------------------
def metrics_row(base: dict[str, Any], last_eval: dict[str, Any] | None, evaluated: bool, seconds: float) -> dict[str, Any]:
    """One metrics.jsonl row: round facts from ``base``, evaluation values (carried when not ``evaluated``)."""
    carried = last_eval or {}
    row = {"round": base["round"], "evaluated": evaluated}
    row.update({key: carried.get(key) for key in EVAL_KEYS})
    # figures only some methods have (SpaFL): per-layer density, carried like the others; the collapse
    # guard's resets while evaluating, a count of that evaluation's (0 in a row without one)
    if "density_layers" in carried:
        row["density_layers"] = carried["density_layers"]
    if "guard_resets_eval" in carried:
        row["guard_resets_eval"] = carried["guard_resets_eval"] if evaluated else 0
    row.update({k: v for k, v in base.items() if k != "round"})
    row["seconds"] = seconds
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_row(line: bytes, expected_round: int) -> tuple[dict[str, Any] | None, str]:
    """The row one line of metrics.jsonl holds, or None and why it is not the row of round ``expected_round``."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError:
        return None, "not JSON"
    if not isinstance(row, dict):
        kinds = {list: "a JSON array", str: "a JSON string", bool: "JSON true or false", type(None): "JSON null"}
        return None, f"{kinds.get(type(row), 'a JSON number')}, not a row object"
    number = row.get("round")
    if not isinstance(number, int) or isinstance(number, bool):
        return None, "a row without a round number"
    if number != expected_round:
        return None, f"the row of round {number} where round {expected_round} belongs"
    wanted = ("evaluated", *ROW_NUMBERS, *ROW_EVAL_NUMBERS)
    missing = [key for key in wanted if key not in row]
    if missing:
        return None, f"a row lacking {', '.join(missing)}"
    wrong = [key for key in ROW_NUMBERS if not _is_number(row[key])]
    needed = ROW_EVALUATED_NUMBERS if row["evaluated"] is True else ()
    wrong += [key for key in ROW_EVAL_NUMBERS if not (_is_number(row[key]) or (row[key] is None and key not in needed))]
    if not isinstance(row["evaluated"], bool):
        wrong.insert(0, "evaluated")
    if wrong:
        return None, f"a row whose {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of the right type"
    return row, ""


def _lines(path: Path):
    """``(line number, bytes, ends with a newline)`` of each non-blank line; UserError if the file cannot be read."""
    try:
        with open(path, "rb") as handle:
            number = 0
            while True:
                line = handle.readline(MAX_ROW_BYTES + 1)
                if not line:
                    return
                number += 1
                if line.strip():
                    yield number, line, line.endswith(b"\n")
    except OSError as error:
        raise file_error(error, f"cannot read {short_path(path)}", path) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, rounds 0, 1, 2, ... in order; a UserError names the first line that is not the next row.

    A last line without its newline is a row being written (or cut by a
    crash before its checkpoint) and is left out.
    """
    rows: list[dict[str, Any]] = []
    for number, line, complete in _lines(Path(path)):
        row, why = parse_row(line, len(rows))
        if row is not None:
            rows.append(row)
        elif not complete:
            break
        else:
            raise UserError(f"{short_path(path)}, line {number}: {why}; the file is damaged (spafl writes one row per round, in order)")
    return rows


def rows_through(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Rows 0..``last_round`` of metrics.jsonl, for a resume from a checkpoint after ``last_round`` rounds.

    Those rows cannot be recomputed: a UserError says which are missing or
    unreadable. What follows them (rows of rounds that will be re-run, a line
    cut by a crash) is not read.
    """
    path = Path(path)
    hint = (f"the checkpoint is at round {last_round}, and rows before it cannot be recomputed: restore {METRICS} "
            "(e.g. from a backup) or start a new run")
    if not os.path.lexists(path):
        raise UserError(f"{short_path(path)} is missing; {hint}")
    rows: list[dict[str, Any]] = []
    for number, line, _ in _lines(path):
        if len(rows) > last_round:
            break
        row, why = parse_row(line, len(rows))
        if row is None:
            raise UserError(f"{short_path(path)}, line {number}: {why}, so round {len(rows)} is lost; {hint}")
        rows.append(row)
    if len(rows) <= last_round:
        held = f"rounds 0..{len(rows) - 1}" if rows else "no rows"
        raise UserError(f"{short_path(path)} holds {held}, so rounds {len(rows)}..{last_round} are lost; {hint}")
    return rows


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl by ``rows`` (atomically)."""
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
        "bits_up_total": sum(r["bits_up"] for r in rows),
        "bits_down_total": sum(r["bits_down"] for r in rows),
        **({"bits_up_coded_total": sum(r["bits_up_coded"] for r in rows if "bits_up_coded" in r)} if "bits_up_coded" in final else {}),
        "flops_total": final["flops_cum"],
        **({"flops_true_total": final["flops_true_cum"]} if "flops_true_cum" in final else {}),
        "seconds_total": sum(r["seconds"] for r in rows),
    }
