"""Atomic checkpoints: a crash (even SIGKILL) mid-write never leaves a broken file.

The state is written to a temporary file in the same directory, flushed and
fsynced, then renamed over the previous checkpoint (rename is atomic on
POSIX), and the directory is fsynced. Only the latest checkpoint is kept.

Format 2 holds the client states as :meth:`spafl.engine.store.Clients.checkpoint_state`
gives them (the written states themselves, or with ``client_store=disk`` the
index of the per-client files it references, plus the broadcasts not yet
delivered); format 1 held a list with every client's state and is still read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from spafl.errors import UserError

CHECKPOINT = "checkpoint.pt"
FORMAT = 2
READABLE = (1, 2)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    temporary = run_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final


def remove_stale_temporaries(run_dir: Path) -> None:
    for stale in Path(run_dir).glob(f".{CHECKPOINT}.tmp-*"):
        stale.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The latest checkpoint, or None when the run has not written one yet."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # any unpickling failure means the file is unusable
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}); delete it to restart the run from round 0") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE or "round" not in state:
        raise UserError(f"checkpoint {path} is not a spafl checkpoint of format {' or '.join(map(str, READABLE))}")
    return state
