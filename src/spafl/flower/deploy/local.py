"""The local deployment: a SuperLink and N SuperNodes on 127.0.0.1, started, watched and stopped together."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spafl.errors import UserError
from spafl.flower.deploy.app import node_config_arg, toml_value
from spafl.flower.deploy.processes import (
    DEPLOY_ID_ENV,
    DeployError,
    ManagedProcess,
    find_tagged,
    log_tail,
    require_psutil,
    send_signal,
    stop_processes,
    wait_gone,
)
from spafl.flower.deploy.runs import CONNECTION, FlwrRuns
from spafl.flower.deploy.signals import _SignalsHeld
from spafl.flower.deploy.tls import write_node_keys, write_tls_files

LOOPBACK = "127.0.0.1"
NODE_CONNECTED = re.compile(r"SuperNode ID: (\d+)")


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def flower_bin_dir() -> Path:
    """The directory holding ``flower-superlink``, ``flower-supernode`` and ``flwr``.

    That of the running interpreter (a virtual environment's ``bin``) if they are
    there, otherwise wherever ``PATH`` finds ``flower-superlink``. Flower starts its
    helpers (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) by name,
    so this directory also goes first on every process's ``PATH``.
    """
    here = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if found:
        return Path(found).parent
    raise UserError("flower-superlink not found: install Flower with `pip install -e '.[flower]'` (flwr 1.41)")


@dataclass
class Node:
    index: int
    process: ManagedProcess
    port: int = 0
    key: Path | None = None
    public_key: Path | None = None
    node_id: int | None = None
    history: list[int] = field(default_factory=list)  # node ids of earlier incarnations


class LocalDeployment(FlwrRuns):
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, all under ``out_dir``.

    Use as a context manager (``with LocalDeployment(...) as d:``): entering
    starts the SuperLink and all SuperNodes and waits until every SuperNode is
    connected; leaving (also on Ctrl-C or an exception) stops every process.
    Runs are submitted and followed with the methods of
    :class:`~spafl.flower.deploy.runs.FlwrRuns` (``submit``, ``wait_run``, ``flwr``).

    ``tls``: a private CA and a server certificate for 127.0.0.1/localhost;
    TLS on the SuperLink's API port, every SuperNode's connection, the
    SuperNodes' local Runtime API and the ``flwr`` CLI. ``auth`` (implies
    ``tls``): the SuperLink runs with ``--enable-supernode-auth``; each
    SuperNode gets an ECDSA P-384 key pair whose public key is registered with
    ``flwr supernode register`` before the SuperNode starts.
    """

    def __init__(
        self,
        out_dir: str | Path,
        num_nodes: int,
        *,
        tls: bool = False,
        auth: bool = False,
        app_dir: str | Path | None = None,
        data_dir: str | Path | None = None,
        grace: float = 5.0,
        start_timeout: float = 90.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise UserError(f"--nodes must be >= 1, got {num_nodes}")
        self.out_dir = Path(out_dir).resolve()
        self.num_nodes = num_nodes
        self.auth = auth
        self.tls = tls or auth
        self.grace = grace
        self.start_timeout = start_timeout
        self.data_dir = str(Path(data_dir).resolve()) if data_dir else None
        self._log = log or (lambda line: None)
        self.home = self.out_dir / ".flower"
        self.logs = self.out_dir / "logs"
        self.nodes_dir = self.out_dir / "nodes"
        self.app_dir = Path(app_dir).resolve() if app_dir else None
        self.deploy_id = uuid.uuid4().hex
        self.bin = flower_bin_dir()
        require_psutil()  # stopping the processes needs it: fail before any starts
        self.port = 0
        self.tls_files: dict[str, Path] = {}
        self.superlink: ManagedProcess | None = None
        self.nodes: list[Node] = []
        self.helpers: list[ManagedProcess] = []  # flwr log streams
        self.leftover: list[int] = []
        self._stopped = False

    # ------------------------------------------------------------ environment

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            DEPLOY_ID_ENV: self.deploy_id,
        })
        # every connection is to this machine: a proxy set for the user's shell (http_proxy, ...) must not take it
        loopback = "127.0.0.1,localhost,::1"
        for name in ("NO_PROXY", "no_proxy"):
            env[name] = f"{env[name]},{loopback}" if env.get(name) else loopback
        return env

    def log(self, line: str) -> None:
        self._log(line)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for directory in (self.home, self.logs, self.nodes_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_files = write_tls_files(self.home / "certs")
        self.start_superlink()
        self.nodes = [self._new_node(i) for i in range(self.num_nodes)]
        if self.auth:
            self.register_nodes(self.nodes)
        for node in self.nodes:
            self.start_supernode(node.index, wait=False)
        self.wait_connected(range(self.num_nodes))
        self.log(f"{self.num_nodes} SuperNode(s) connected")

    def _write_connection(self) -> None:
        lines = [
            "[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
            f'address = "{LOOPBACK}:{self.port}"',
        ]
        if self.tls:
            lines.append(f"root-certificates = {toml_value(str(self.tls_files['ca_cert']))}")
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def start_superlink(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            self.port = free_ports(1)[0]
            command = [self._exe("flower-superlink"), "--host", LOOPBACK, "--port", str(self.port),
                       "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
            if self.tls:
                command += ["--ssl-ca-certfile", str(self.tls_files["ca_cert"]),
                            "--ssl-certfile", str(self.tls_files["server_cert"]),
                            "--ssl-keyfile", str(self.tls_files["server_key"])]
            else:
                command.append("--insecure")
            if self.auth:
                command.append("--enable-supernode-auth")
            self.superlink = ManagedProcess("superlink", "superlink", command, self.logs / "superlink.log")
            self.superlink.start(self.env, self.out_dir)
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self.superlink.alive():
                if port_open(self.port) and "Application startup complete" in self.superlink.log_since_start():
                    self._write_connection()
                    self.log(f"SuperLink up on {LOOPBACK}:{self.port} ({'TLS' if self.tls else 'insecure'}"
                             f"{', SuperNode auth' if self.auth else ''})")
                    return
                time.sleep(0.2)
            alive = self.superlink.alive()
            stop_processes([self.superlink], self.deploy_id, self.grace, roles={"superlink"})
            if alive:
                raise DeployError(f"the SuperLink did not come up within {self.start_timeout:.0f} s; "
                                  f"see {self.superlink.log_path}")
            if attempt + 1 < attempts and "address already in use" in self.superlink.log_since_start().lower():
                continue  # lost a race for the port: pick another
            raise DeployError(f"the SuperLink exited during start-up; see {self.superlink.log_path}:\n"
                              f"{log_tail(self.superlink.log_path)}")

    def _new_node(self, index: int) -> Node:
        node = Node(index, ManagedProcess(f"supernode-{index}", f"supernode-{index}", [],
                                          self.logs / f"supernode-{index}.log"))
        if self.auth:
            node.key, node.public_key = write_node_keys(self.home / "keys", f"supernode-{index}")
        return node

    def state_dir(self, index: int) -> Path:
        return self.nodes_dir / str(index)

    def node_config(self, index: int) -> dict[str, Any]:
        values: dict[str, Any] = {
            "partition-id": index, "num-partitions": self.num_nodes, "state-dir": str(self.state_dir(index)),
        }
        if self.data_dir:
            values["data-dir"] = self.data_dir
        return values

    def start_supernode(self, index: int, wait: bool = True) -> Node:
        """Start SuperNode ``index`` (again), on a fresh Runtime API port, with the same state dir and key."""
        node = self.nodes[index]
        if node.process.alive():
            raise DeployError(f"supernode-{index} is already running")
        if node.node_id is not None:
            node.history.append(node.node_id)
            node.node_id = None
        node.port = free_ports(1)[0]
        self.state_dir(index).mkdir(parents=True, exist_ok=True)
        command = [self._exe("flower-supernode"), "--superlink", f"{LOOPBACK}:{self.port}",
                   "--host", LOOPBACK, "--port", str(node.port), "--isolation", "subprocess",
                   "--node-config", node_config_arg(self.node_config(index))]
        if self.tls:
            command += ["--root-certificates", str(self.tls_files["ca_cert"]),
                        # TLS on the SuperNode's own Runtime API (SuperExec and ClientApps connect to it)
                        "--ssl-certfile", str(self.tls_files["server_cert"]),
                        "--ssl-keyfile", str(self.tls_files["server_key"]),
                        "--ssl-ca-certfile", str(self.tls_files["ca_cert"])]
        else:
            command.append("--insecure")
        if self.auth:
            command += ["--auth-supernode-private-key", str(node.key)]
        node.process.command = command
        node.process.start(self.env, self.out_dir)
        if wait:
            self.wait_connected([index])
        return node

    def wait_connected(self, indices: Iterable[int], timeout: float | None = None) -> None:
        """Wait until each SuperNode in ``indices`` logged its node ID (it is registered with the SuperLink)."""
        pending = list(indices)
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while pending:
            for index in list(pending):
                node = self.nodes[index]
                match = NODE_CONNECTED.search(node.process.log_since_start())
                if match:
                    node.node_id = int(match.group(1))
                    pending.remove(index)
                elif not node.process.alive():
                    raise DeployError(f"supernode-{index} exited during start-up; see {node.process.log_path}:\n"
                                      f"{log_tail(node.process.log_path)}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"supernode-{i}" for i in pending)
                raise DeployError(f"{names} did not connect to the SuperLink within "
                                  f"{timeout or self.start_timeout:.0f} s; see {self.logs}")
            self.check_superlink()
            if pending:
                time.sleep(0.2)

    def check_superlink(self) -> None:
        if self.superlink is None or not self.superlink.alive():
            log_path = self.logs / "superlink.log"
            raise DeployError(f"the SuperLink is not running; see {log_path}:\n{log_tail(log_path)}")

    def register_nodes(self, nodes: list[Node]) -> None:
        """``flwr supernode register KEY.pub spafl-local`` for each node (in parallel)."""
        results = self._flwr_calls(
            [("supernode", "register", str(node.public_key), CONNECTION, "--format", "json") for node in nodes],
            timeout=self.start_timeout,
        )
        for node, (code, _) in zip(nodes, results):
            if code != 0:
                raise DeployError(f"`flwr supernode register` failed for supernode-{node.index}; "
                                  f"see {self.logs / 'flwr-cli.log'}")
        self.log(f"registered {len(nodes)} SuperNode public key(s)")

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: a crash) to SuperNode ``index``'s whole process group, ClientApps included."""
        node = self.nodes[index]
        node.process.signal_group(sig)
        node.process.reap(10.0)
        if sig == signal.SIGKILL:
            stragglers = find_tagged(self.deploy_id, [node.process.role])  # helpers in sessions of their own
            send_signal(stragglers, signal.SIGKILL)
            wait_gone(stragglers, 5.0)

    def stop_supernode(self, index: int) -> list[int]:
        """Stop SuperNode ``index`` gracefully (SIGTERM, SIGKILL after the grace period)."""
        node = self.nodes[index]
        return stop_processes([node.process], self.deploy_id, self.grace, roles={node.process.role})

    def restart_supernode(self, index: int) -> Node:
        if self.nodes[index].process.alive():
            self.stop_supernode(index)
        return self.start_supernode(index, wait=True)

    # ------------------------------------------------------------ shutdown

    def processes(self) -> list[ManagedProcess]:
        procs = list(self.helpers) + [node.process for node in self.nodes]
        if self.superlink is not None:
            procs.append(self.superlink)
        return procs

    def stop(self) -> list[int]:
        """Stop every process of the deployment; return the pids of any left alive (normally none).

        Every group (log streams, SuperNodes with their SuperExec and
        ClientApps, the SuperLink) and every process that carries the
        deployment id (the SuperLink's SuperExec and ServerApp run in sessions
        of their own) gets SIGTERM at once, SIGKILL after the grace period:
        bounded by ``grace`` + 3 s. SIGINT, SIGTERM and SIGHUP are held back
        meanwhile and delivered afterwards, so a second Ctrl-C does not cut the
        clean-up short. Idempotent: calling it again after an interrupted stop
        finishes the job.
        """
        if self._stopped:
            return self.leftover
        with _SignalsHeld():
            self.leftover = stop_processes(self.processes(), self.deploy_id, self.grace)
            self._stopped = True
            if self.leftover:
                self.log(f"warning: processes still alive after stopping: {self.leftover}")
        return self.leftover
