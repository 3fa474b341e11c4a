"""Atomic checkpoints: a crash (even SIGKILL) mid-write never leaves a broken file.

The state is written to a temporary file in the same directory, flushed and
fsynced, then renamed over the previous checkpoint (rename is atomic on
POSIX), and the directory is fsynced. Only the latest checkpoint is kept.

It holds the run state (:mod:`spafl.runtime.round`), the torch RNG, the
config, and the client states as :meth:`spafl.engine.store.Clients.checkpoint_state`
gives them (the written states themselves, or with ``client_store=disk`` the
index of the per-client files it references, plus the broadcasts not yet
delivered).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from spafl.errors import UserError, short_path
from spafl.runtime.record import CONFIG, fsync_directory

CHECKPOINT = "checkpoint.pt"
FORMAT = 2


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    temporary = run_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk or an interrupt: the previous checkpoint stays, alone
        raise
    fsync_directory(run_dir)
    return final


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The latest checkpoint, or None when the run has not written one yet.

    Run directories are shared, so the file is untrusted: it is read with
    ``weights_only=True`` (tensors and plain values only), which refuses any
    other object instead of running the code its unpickling would run.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, or holds something other than tensors and plain values
        raise UserError(
            f"checkpoint {path} is unreadable, corrupt or not a spafl checkpoint ({type(error).__name__}; only tensors "
            f"and plain values are loaded); delete it to restart the run from round 0"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "round" not in state:
        raise UserError(f"checkpoint {path} is not a spafl checkpoint of format {FORMAT}")
    return state


#: Config keys a resumed run may change: ``rounds`` (a longer run, or a shorter one down to the checkpoint's round).
RESUMABLE_CHANGES = frozenset({"rounds"})


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_same_config(saved: Any, config: dict[str, Any], run_dir: Path) -> None:
    """UserError naming every key (but ``rounds``) whose value in config.json (``config``) differs from the checkpoint's.

    A key the checkpoint lacks (written by a spafl without it) is not compared.
    """
    path = Path(run_dir) / CHECKPOINT
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {short_path(path)} holds no config; it is damaged or not a spafl checkpoint")
    changed = [
        key for key, value in config.items()
        if key in saved and key not in RESUMABLE_CHANGES and _comparable(saved[key]) != _comparable(value)
    ]
    if changed:
        shown = ", ".join(f"{key} ({_brief(saved[key])} -> {_brief(config[key])})" for key in changed)
        raise UserError(
            f"{short_path(Path(run_dir) / CONFIG)} differs from the run's checkpoint in {shown}; a run resumes with the "
            "settings it started with (only rounds may change): undo the edit, or start a new run with these settings"
        )


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
