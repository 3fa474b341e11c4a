"""A run killed with SIGKILL takes its forked workers with it: none is left orphaned, holding memory and files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked processes; /proc (Linux)")


def _children(pid: int) -> set[int]:
    """Pids of the processes that any thread of ``pid`` forked (empty once ``pid`` is gone)."""
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(child) for child in children.read_text().split())
        except OSError:  # the thread or the process has just ended
            pass
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of ``pid`` from /proc/<pid>/stat, None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[19])  # state; starttime (field 22 of proc(5))


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _alive(pid: int, started: int) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[0] not in ("Z", "X")


def test_sigkill_of_a_run_kills_its_forked_workers(tmp_path):
    command = [
        sys.executable, "-m", "spafl.cli", "run", "--preset", "fmnist-paper", "--out", str(tmp_path / "run"),
        "--set", "dataset=synthetic", "--set", "num_clients=4", "--set", "clients_per_round=4",
        "--set", "rounds=50", "--set", "local_epochs=3", "--set", "batch_size=16", "--set", "threads=1",
        "--set", "workers=2", "--set", "checkpoint_every=50", "--quiet",
    ]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: dict[int, int] = {}
    try:
        own = None
        deadline = time.time() + 120
        while not workers and time.time() < deadline and run.poll() is None:
            own = own or _cmdline(run.pid)
            for child in _children(run.pid):
                stat = _stat(child)
                if stat is not None and _cmdline(child) == own:  # forked, not exec'd (as git is by provenance)
                    workers[child] = stat[1]
            if not workers:
                time.sleep(0.01)
        assert workers, f"the run forked no worker (exit code {run.poll()}): {run.stderr.read().decode() if run.poll() is not None else ''}"
        time.sleep(0.3)  # the workers are past their start-up, inside a client's training
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        assert run.returncode == -signal.SIGKILL

        deadline = time.time() + 5
        left = dict(workers)
        while left and time.time() < deadline:
            left = {pid: started for pid, started in left.items() if _alive(pid, started)}
            time.sleep(0.05)
        assert not left, f"workers {sorted(left)} outlived their killed parent"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid, started in workers.items():  # on failure: leave no orphan behind
            if _alive(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        run.stderr.close()
