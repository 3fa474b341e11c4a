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

from spafl.errors import UserError
from spafl.runtime.record import fsync_directory

CHECKPOINT = "checkpoint.pt"
FORMAT = 2


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    temporary = run_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
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
