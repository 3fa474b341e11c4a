"""Runs on a deployment, through Flower's ``flwr`` CLI: submit one, ask its status, follow its log, wait for it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spafl.flower.deploy.app import stage_app, toml_value
from spafl.flower.deploy.processes import ANSI, DEPLOY_ROLE_ENV, DeployError, ManagedProcess, killpg, log_tail

CONNECTION = "spafl-local"  # the SuperLink connection named in $FLWR_HOME/config.toml
STATUS_COMPLETED = "finished:completed"


class FlwrRuns:
    """The ``flwr`` CLI side of :class:`~spafl.flower.deploy.local.LocalDeployment` (a mixin).

    It uses the deployment's ``bin`` (Flower's binaries), ``env``, ``home``
    (FLWR_HOME), ``logs``, ``out_dir``, ``app_dir``, ``helpers`` (processes
    that :meth:`LocalDeployment.stop` stops too), ``log`` and
    ``check_superlink``.
    """

    bin: Path
    home: Path
    logs: Path
    out_dir: Path
    app_dir: Path | None
    helpers: list[ManagedProcess]
    env: dict[str, str]
    log: Callable[[str], None]
    check_superlink: Callable[[], None]

    def _exe(self, name: str) -> str:
        return str(self.bin / name)

    def _flwr_calls(self, calls: list[tuple[str, ...]], timeout: float) -> list[tuple[int, bytes]]:
        """Run ``flwr`` CLI commands in parallel; return (exit code, stdout) of each, in order.

        Each command runs in a session of its own with its stdout in an
        unnamed temporary file (never a pipe) and its stderr in
        ``logs/flwr-cli.log``; the waits poll, so an interrupt surfaces at
        once. A command that outlives ``timeout`` seconds, or is still running
        when anything goes wrong (an interrupt included), is killed with its
        process group; a timeout raises :class:`DeployError`.
        """
        procs: list[subprocess.Popen] = []
        results: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        with contextlib.ExitStack() as files:
            cli_log = files.enter_context(open(self.logs / "flwr-cli.log", "ab"))
            outputs = [files.enter_context(tempfile.TemporaryFile(dir=self.home)) for _ in calls]
            try:
                for args, out in zip(calls, outputs):
                    command = [self._exe("flwr"), *args]
                    cli_log.write(f"\n=== {' '.join(command)}\n".encode())
                    cli_log.flush()
                    procs.append(subprocess.Popen(command, stdout=out, stderr=cli_log, stdin=subprocess.DEVNULL,
                                                  env={**self.env, DEPLOY_ROLE_ENV: "flwr-cli"}, cwd=self.out_dir,
                                                  start_new_session=True))
                for args, proc, out in zip(calls, procs, outputs):
                    try:
                        code = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                    except subprocess.TimeoutExpired:
                        raise DeployError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f} s; "
                                          f"see {self.logs / 'flwr-cli.log'}") from None
                    out.seek(0)
                    stdout = out.read()
                    cli_log.write(stdout)
                    results.append((code, stdout))
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        killpg(proc.pid, signal.SIGKILL)
                        try:
                            proc.wait(timeout=5.0)
                        except subprocess.TimeoutExpired:
                            pass  # it carries the deployment id: stop() sweeps it
        return results

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this deployment; stderr goes to ``logs/flwr-cli.log``."""
        [(code, stdout)] = self._flwr_calls([args], timeout)
        return subprocess.CompletedProcess([self._exe("flwr"), *args], code, stdout, None)

    def _flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        text = result.stdout.decode(errors="replace")
        start = text.find("{")
        try:
            data = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            data = {}
        if result.returncode != 0 or not data.get("success", False):
            message = data.get("error-message") or log_tail(self.logs / "flwr-cli.log", 5)
            raise DeployError(f"`flwr {args[0]}` failed: {message}")
        return data

    def submit(self, run_config: dict[str, Any], app_dir: str | Path | None = None) -> int:
        """``flwr run APP spafl-local --run-config FILE``; returns the run id."""
        app = Path(app_dir).resolve() if app_dir else self.app_dir
        if app is None:
            app = stage_app(self.home / "app")
        config_file = self.home / f"run-config-{int(time.time() * 1000)}.toml"
        config_file.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in run_config.items()))
        data = self._flwr_json("run", str(app), CONNECTION, "--run-config", str(config_file))
        run_id = int(data["run-id"])
        self.log(f"run {run_id} submitted ({data.get('fab-id', '?')} {data.get('fab-version', '')})")
        return run_id

    def run_status(self, run_id: int) -> dict[str, Any]:
        data = self._flwr_json("list", CONNECTION, "--run-id", str(run_id))
        runs = data.get("runs") or []
        if not runs:
            raise DeployError(f"the SuperLink does not know run {run_id}")
        return runs[0]

    def follow(self, run_id: int) -> ManagedProcess:
        """Stream the run's log (ServerApp output) into ``logs/serverapp.log`` until the run ends."""
        proc = ManagedProcess(f"log-{run_id}", "flwr-log",
                              [self._exe("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                              self.logs / "serverapp.log")
        proc.start(self.env, self.out_dir)
        self.helpers.append(proc)
        return proc

    def wait_run(
        self, run_id: int, timeout: float | None = None, on_line: Callable[[str], None] | None = None,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Wait until run ``run_id`` is finished; return its ``flwr list`` record.

        Streams the ServerApp's log to ``logs/serverapp.log`` (and each new line
        to ``on_line``). Raises :class:`DeployError` when the SuperLink dies or
        ``timeout`` seconds pass (the run is then stopped with ``flwr stop``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self.follow(run_id)
        position = stream.log_offset
        next_status = 0.0
        partial = ""
        while True:
            if on_line is not None:
                try:
                    with open(stream.log_path, "rb") as handle:
                        handle.seek(position)
                        chunk = handle.read()
                        position += len(chunk)
                except OSError:
                    chunk = b""
                partial += ANSI.sub("", chunk.decode(errors="replace"))
                *lines, partial = partial.split("\n")
                for line in lines:
                    if line.strip() and not line.startswith("=== "):
                        on_line(line)
            self.check_superlink()
            if not stream.alive() and time.monotonic() >= next_status:
                status = self.run_status(run_id)
                if str(status.get("status", "")).startswith("finished"):
                    return status
                next_status = time.monotonic() + 3.0  # the stream ended early: poll the status
            if deadline is not None and time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION, timeout=30)
                raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s; see {stream.log_path}")
            time.sleep(poll)
