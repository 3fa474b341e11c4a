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
    if not isinstance(state, dict) or state.get("format") not in READABLE or "round" not in state:
        raise UserError(f"checkpoint {path} is not a spafl checkpoint of format {' or '.join(map(str, READABLE))}")
    return state
