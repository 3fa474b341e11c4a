"""Where a result came from: versions, commit, threads, data checksums."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

from spafl import __version__


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(threads: int, checksums: dict[str, str], data_source: str) -> dict[str, Any]:
    import torch

    return {
        "spafl_version": __version__,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "data_source": data_source,
        "data_checksums_sha256": checksums,
    }
