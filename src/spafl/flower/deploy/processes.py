"""The process supervisor: start processes with their output in log files, find them again, stop them.

Every process the deployment starts runs in a session and process group of
its own, writes to a log file (never a pipe) and carries ``SPAFL_DEPLOY_ID``
(and ``SPAFL_DEPLOY_ROLE``) in its environment. Children inherit the
environment, so the tag finds Flower's helpers even after they were
re-parented or moved to a session of their own, where neither the process
group nor a walk of the process tree reaches them. :func:`stop_processes`
signals the groups and every tagged process at once: SIGTERM, SIGKILL after a
grace period.

psutil (a dependency of the ``flower`` extra) lists, signals and waits for
processes. Without it this package still imports; :func:`require_psutil`
turns its absence into a usage error before any process starts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from spafl.errors import UserError

try:
    import psutil
except ModuleNotFoundError:  # pragma: no cover - the `flower` extra is not installed: see require_psutil
    psutil = None  # type: ignore[assignment]

DEPLOY_ID_ENV = "SPAFL_DEPLOY_ID"
DEPLOY_ROLE_ENV = "SPAFL_DEPLOY_ROLE"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
POLL = 0.05  # seconds between two looks at processes that are being stopped


class DeployError(RuntimeError):
    """A deployment step failed (a process died, a timeout passed); the message names the log to read."""


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, without terminal colour codes ('' if unreadable)."""
    try:
        text = ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def require_psutil() -> None:
    """Raise :class:`UserError` if psutil is missing (a Flower install that predates its place in the extra)."""
    if psutil is None:
        raise UserError("psutil not found: install the `flower` extra with `pip install -e '.[flower]'`")


def killpg(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; nothing if the group is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- finding, signalling, waiting


def _running(proc: psutil.Process) -> bool:
    """Still running: not gone, not replaced by another process with its pid, not a zombie (dead, not yet reaped)."""
    try:
        return proc.is_running() and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _find(accept: Callable[[dict[str, str]], bool]) -> list[psutil.Process]:
    """Running processes, other than this one and its parent, whose environment ``accept`` takes, by pid."""
    mine = {os.getpid(), os.getppid()}
    found = [
        proc for proc in psutil.process_iter(["environ", "status"])
        if proc.pid not in mine and proc.info["environ"] and accept(proc.info["environ"])
        and proc.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    ]
    return sorted(found, key=lambda proc: proc.pid)


def processes_with_env(match: dict[str, str]) -> list[int]:
    """Live (non-zombie) processes, other than this one and its parent, whose environment has all of ``match``.

    Processes whose environment cannot be read (another user's) are not listed.
    """
    return [proc.pid for proc in _find(lambda env: all(env.get(key) == value for key, value in match.items()))]


def find_tagged(deploy_id: str, roles: Iterable[str] | None = None) -> list[psutil.Process]:
    """Live processes whose environment carries this deployment id (and one of ``roles``)."""
    wanted = None if roles is None else set(roles)
    return _find(lambda env: env.get(DEPLOY_ID_ENV) == deploy_id
                 and (wanted is None or env.get(DEPLOY_ROLE_ENV) in wanted))


def tagged_processes(deploy_id: str, role: str | None = None) -> list[int]:
    """Pids of the live processes whose environment carries this deployment id (and role).

    Children inherit the environment, so this finds Flower's helpers even
    after they were re-parented or moved to a session of their own.
    """
    return [proc.pid for proc in find_tagged(deploy_id, None if role is None else [role])]


def send_signal(procs: Iterable[psutil.Process], sig: int) -> None:
    """Send ``sig`` to each of ``procs`` that still exists; psutil skips one whose pid went to a new process."""
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait at most ``timeout`` seconds until none of ``procs`` runs; return those still running.

    A zombie counts as gone. psutil waits for the others; children of this
    process are only watched, never waited for: their ``Popen`` reaps them and
    keeps their exit status.
    """
    def child_of_mine(proc: psutil.Process) -> bool:
        try:
            return proc.ppid() == os.getpid()
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    left = [proc for proc in procs if _running(proc)]
    while left and (pause := min(deadline - time.monotonic(), POLL)) > 0:
        others = [proc for proc in left if not child_of_mine(proc)]
        if others:
            psutil.wait_procs(others, timeout=pause)
        else:
            time.sleep(pause)
        left = [proc for proc in left if _running(proc)]
    return left


# --------------------------------------------------------------------------- managed processes


@dataclass
class ManagedProcess:
    """One process started by the deployment, in a process group (and session) of its own.

    Its output goes to ``log_path``, never to a pipe: a child never blocks on a
    full pipe, and nothing here ever waits on a read.
    """

    name: str
    role: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    log_offset: int = 0  # size of the log file when this incarnation started

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as handle:
            self.log_offset = handle.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            handle.write(f"\n=== {stamp} spafl deploy-local: {' '.join(self.command)}\n".encode())
            handle.flush()
            self.popen = subprocess.Popen(
                self.command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**env, DEPLOY_ROLE_ENV: self.role}, cwd=cwd, start_new_session=True,
            )

    def log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_offset)
                return ANSI.sub("", handle.read().decode(errors="replace"))
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        """Signal the process group, unless the leader was already reaped (its pid, the group id, may be reused).

        Members of a reaped leader's group still carry the deployment id: the
        tag sweep of :func:`stop_processes` finds them.
        """
        if self.popen is None or self.popen.returncode is not None:
            return
        killpg(self.popen.pid, sig)  # start_new_session: group id == pid

    def reap(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for the process itself; True when it has exited."""
        if self.popen is None:
            return True
        try:
            self.popen.wait(timeout=max(timeout, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False


def stop_processes(
    procs: list[ManagedProcess], deploy_id: str | None, grace: float, roles: set[str] | None = None,
    kill_wait: float = 3.0,
) -> list[int]:
    """Stop ``procs`` and every process tagged with ``deploy_id`` (and one of ``roles``); bounded in time.

    SIGTERM to every group and every tagged process at once (Flower starts
    some helpers in sessions of their own); after ``grace`` seconds SIGKILL to
    whatever is left of both; then wait up to ``kill_wait`` seconds for them
    to vanish. Returns the pids still alive afterwards (normally none). Takes
    about as long as the slowest process needs to exit, at most
    ``grace + kill_wait`` seconds.
    """

    def tagged() -> list[psutil.Process]:
        return [] if deploy_id is None else find_tagged(deploy_id, roles)

    def remaining() -> tuple[list[ManagedProcess], list[psutil.Process]]:
        return [proc for proc in procs if proc.alive()], tagged()  # alive() also reaps our own children

    for proc in procs:
        proc.signal_group(signal.SIGTERM)
    send_signal(tagged(), signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, grace), (None, kill_wait)):
        deadline = time.monotonic() + wait
        live, others = remaining()
        while (live or others) and time.monotonic() < deadline:
            if others:
                wait_gone(others, POLL)  # back early once they are all gone
            else:
                time.sleep(POLL)
            live, others = remaining()
        if sig is not None:
            for proc in live:
                proc.signal_group(sig)
            send_signal(others, sig)
    for proc in procs:
        proc.reap(0.5)
    return [proc.pid for proc in tagged()]
