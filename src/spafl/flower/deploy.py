"""`spafl deploy-local`: the spafl Flower app on a real SuperLink and N SuperNodes.

Everything runs on the loopback interface (127.0.0.1) with Flower's own
deployment binaries (``flower-superlink``, ``flower-supernode``, ``flwr``) of
the Python environment spafl runs in:

* a private Flower home (``FLWR_HOME=DIR/.flower``) holds the ``flwr`` CLI's
  connection (``config.toml``), installed app bundles, generated certificates
  and SuperNode keys, so nothing touches ``~/.flwr``;
* every process gets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``
  (otherwise Flower builds a fresh environment for every run), no telemetry
  and no update check;
* each SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N
  state-dir=DIR/nodes/i"`` and its own Runtime API port;
* one log file per process in ``DIR/logs``: ``superlink.log``,
  ``supernode-<i>.log`` (with its ClientApp processes), ``serverapp.log``
  (the run's log stream) and ``flwr-cli.log``.

:class:`LocalDeployment` is the reusable part (tests use it): a context
manager that starts the SuperLink and the SuperNodes, submits runs, and can
stop, kill (SIGKILL) and restart a single SuperNode. Every process it starts
runs in its own session and process group, writes to a log file (never a
pipe) and carries ``SPAFL_DEPLOY_ID`` in its environment;
:meth:`LocalDeployment.stop` sends SIGTERM to the groups and to every process
that carries the deployment's id (Flower starts some helpers in sessions of
their own) at once, SIGKILL after a grace period, and reports anything left.
How signals (Ctrl-C, SIGTERM, SIGHUP) are handled is described above
:class:`InterruptGuard`.

Flower 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on
one HTTP(S) port (``--host``/``--port``); a SuperNode serves its own Runtime
API on ``--port`` for its ClientApp processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spafl.errors import UserError
from spafl.runtime.record import CONFIG, SUMMARY  # imports no torch

DEPLOY_ID_ENV = "SPAFL_DEPLOY_ID"
DEPLOY_ROLE_ENV = "SPAFL_DEPLOY_ROLE"
CONNECTION = "spafl-local"
LOOPBACK = "127.0.0.1"
STATUS_COMPLETED = "finished:completed"
NODE_CONNECTED = re.compile(r"SuperNode ID: (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DeployError(RuntimeError):
    """A deployment step failed (a process died, a timeout passed); the message names the log to read."""


# --------------------------------------------------------------------------- helpers


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


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config_arg(values: dict[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value``, strings double-quoted."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str) and ('"' in value or "'" in value):
            raise UserError(f"node config {key}={value!r}: quotes are not allowed in values")
        parts.append(f"{key}={value}" if isinstance(value, (int, float)) else f'{key}="{value}"')
    return " ".join(parts)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


def _proc_environ(pid: int, keys: Iterable[str] = (DEPLOY_ID_ENV, DEPLOY_ROLE_ENV)) -> dict[str, str]:
    """The variables ``keys`` of process ``pid``'s (initial) environment."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    wanted = {key.encode() for key in keys}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in wanted:
            env[key.decode()] = value.decode(errors="replace")
    return env


def _proc_state(pid: int) -> str:
    """One-letter state from /proc/PID/stat ('' if gone); 'Z' is a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0] if ")" in stat else ""


def processes_with_env(match: dict[str, str]) -> list[int]:
    """Live (non-zombie) processes, other than this one and its parent, whose environment has all of ``match``.

    Linux only (/proc); elsewhere it returns [].
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        pid = int(entry.name)
        env = _proc_environ(pid, match)
        if env == match and _proc_state(pid) not in ("", "Z", "X"):
            found.append(pid)
    return sorted(found)


def tagged_processes(deploy_id: str, role: str | None = None) -> list[int]:
    """Live processes whose environment carries this deployment id (and role).

    Children inherit the environment, so this finds Flower's helpers even
    after they were re-parented or moved to a session of their own. Linux only
    (/proc); elsewhere it returns [] and only process groups are used.
    """
    match = {DEPLOY_ID_ENV: deploy_id}
    if role is not None:
        match[DEPLOY_ROLE_ENV] = role
    return processes_with_env(match)


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining:
        remaining = [pid for pid in remaining if _proc_state(pid) not in ("", "Z", "X")]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return remaining


# --------------------------------------------------------------------------- signals
#
# How `spafl deploy-local` reacts to SIGINT (Ctrl-C), SIGTERM and SIGHUP, by design:
#
# * Only the deploy-local process decides. Every process it starts runs in a
#   session of its own (``start_new_session``), so a Ctrl-C at the terminal,
#   which goes to the foreground process group, reaches deploy-local alone; it
#   then stops the others itself (SIGTERM, SIGKILL after a grace period).
# * :class:`InterruptGuard` installs the handlers explicitly, SIGINT included.
#   A process started with SIGINT ignored (a background job of a
#   non-interactive shell, some CI runners and test harnesses) inherits that
#   disposition, and Python then leaves SIGINT ignored: a Ctrl-C or
#   ``kill -INT`` did nothing, and deploy-local and its Flower processes ran
#   on. An inherited SIGHUP ``SIG_IGN`` (``nohup``) is respected.
# * The first signal raises KeyboardInterrupt once, in the main thread; any
#   later one is only counted, so it cannot cut the clean-up short.
# * Every wait of the main thread is bounded and wakes up at least every few
#   tenths of a second (no blocking read of a pipe: the output of children
#   goes to files), so the KeyboardInterrupt surfaces promptly.
# * :meth:`LocalDeployment.stop` holds SIGINT/SIGTERM/SIGHUP back while it
#   stops the processes and delivers them afterwards; it is idempotent and
#   :func:`deploy_local` calls it again in a ``finally``, which completes a
#   stop that an interrupt cut short.


class InterruptGuard:
    """In the main thread: the first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt; later ones are only counted.

    Use as a context manager around the whole command; the previous handlers
    come back on exit. SIGINT and SIGTERM are handled even when the process
    was started with them ignored; SIGHUP is left ignored if it was (``nohup``).
    Outside the main thread it does nothing.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> None:
        self.signals = tuple(signals)
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def __enter__(self) -> InterruptGuard:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: stay immune to the hang-up
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class _SignalsHeld:
    """While active (main thread only): SIGINT, SIGTERM and SIGHUP are recorded instead of handled; on exit the
    previous handlers come back and each recorded signal is raised again, once, so it is deferred, not lost.

    Signals that are ignored stay ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def __enter__(self) -> _SignalsHeld:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                handler = signal.getsignal(sig)
                if handler is None or handler == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        for sig in dict.fromkeys(self.received):
            signal.raise_signal(sig)  # runs the restored handler (e.g. KeyboardInterrupt) right after this


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

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

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
        try:
            os.killpg(self.popen.pid, sig)  # start_new_session: group id == pid
        except (ProcessLookupError, PermissionError):
            pass

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

    def tagged() -> list[int]:
        if deploy_id is None:
            return []
        if roles is None:
            return tagged_processes(deploy_id)
        return sorted({pid for role in roles for pid in tagged_processes(deploy_id, role)})

    def remaining() -> tuple[list[ManagedProcess], list[int]]:
        return [proc for proc in procs if proc.alive()], tagged()  # alive() also reaps our own children

    for proc in procs:
        proc.signal_group(signal.SIGTERM)
    _signal_pids(tagged(), signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, grace), (None, kill_wait)):
        deadline = time.monotonic() + wait
        live, others = remaining()
        while (live or others) and time.monotonic() < deadline:
            time.sleep(0.05)
            live, others = remaining()
        if sig is not None:
            for proc in live:
                proc.signal_group(sig)
            _signal_pids(others, sig)
    for proc in procs:
        proc.reap(0.5)
    return tagged()


# --------------------------------------------------------------------------- TLS and keys


def write_tls_files(directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A private CA and a server certificate for ``hosts`` (IPs and DNS names).

    Returns paths ``ca_cert``, ``ca_key``, ``server_cert``, ``server_key``. Uses
    the ``cryptography`` package (a dependency of flwr) when importable, else
    the ``openssl`` command.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca_cert": directory / "ca.crt", "ca_key": directory / "ca.key",
        "server_cert": directory / "server.pem", "server_key": directory / "server.key",
    }
    hosts = list(dict.fromkeys(hosts))
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _write_tls_files_openssl(paths, hosts)
    else:
        _write_tls_files_cryptography(paths, hosts)
    for key in ("ca_key", "server_key"):
        os.chmod(paths[key], 0o600)
    return paths


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _write_tls_files_cryptography(paths: dict[str, Path], hosts: list[str]) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spafl deploy-local CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_format = {"encoding": pem, "format": serialization.PrivateFormat.PKCS8,
                  "encryption_algorithm": serialization.NoEncryption()}
    paths["ca_key"].write_bytes(ca_key.private_bytes(**key_format))
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(pem))
    paths["server_key"].write_bytes(server_key.private_bytes(**key_format))
    paths["server_cert"].write_bytes(server_cert.public_bytes(pem))


def _write_tls_files_openssl(paths: dict[str, Path], hosts: list[str]) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DeployError("--tls needs the `cryptography` package or the `openssl` command; neither was found")
    san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    ext = paths["server_cert"].with_suffix(".ext")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
    )
    csr = paths["server_cert"].with_suffix(".csr")
    steps = [
        [openssl, "ecparam", "-genkey", "-name", "secp384r1", "-noout", "-out", str(paths["ca_key"])],
        [openssl, "req", "-x509", "-new", "-key", str(paths["ca_key"]), "-sha256", "-days", "365",
         "-subj", "/CN=spafl deploy-local CA", "-out", str(paths["ca_cert"])],
        [openssl, "ecparam", "-genkey", "-name", "secp384r1", "-noout", "-out", str(paths["server_key"])],
        [openssl, "req", "-new", "-key", str(paths["server_key"]), "-subj", f"/CN={hosts[0]}", "-out", str(csr)],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(paths["ca_cert"]), "-CAkey", str(paths["ca_key"]),
         "-CAcreateserial", "-days", "365", "-sha256", "-extfile", str(ext), "-out", str(paths["server_cert"])],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            raise DeployError(f"openssl failed ({' '.join(step[1:3])}): {result.stderr.strip()}")


def write_node_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes).

    Flower 1.41 reads the private key with ``--auth-supernode-private-key`` and
    ``flwr supernode register`` takes the public key file.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public


# --------------------------------------------------------------------------- the app bundle


PYPROJECT_ENV = "SPAFL_FLOWER_PYPROJECT"


def find_app_pyproject() -> Path:
    """The ``pyproject.toml`` that declares the spafl Flower app (``[tool.flwr.app]``).

    ``$SPAFL_FLOWER_PYPROJECT`` if set, else the one of the source checkout spafl
    is imported from (an editable install).
    """
    import spafl

    override = os.environ.get(PYPROJECT_ENV)
    candidate = Path(override) if override else Path(spafl.__file__).resolve().parents[2] / "pyproject.toml"
    if candidate.is_file() and "[tool.flwr.app" in candidate.read_text():
        return candidate
    raise UserError(
        f"no Flower app declaration ([tool.flwr.app] in {candidate}) found; deploy-local needs the spafl "
        f"source checkout installed with `pip install -e '.[flower]'` (or ${PYPROJECT_ENV} naming its pyproject.toml)"
    )


def stage_app(dest: Path, pyproject: Path | None = None) -> Path:
    """A copy of the Flower app for ``flwr run``: ``pyproject.toml`` plus the files its ``fab-include`` names.

    ``flwr run <repository>`` would walk the whole checkout, ``.venv`` included
    (several seconds), and may rewrite its ``pyproject.toml`` (Flower 1.41
    migrates a ``[tool.flwr.federations]`` table); the copy avoids both and
    bundles the same files. The SuperLink and SuperNodes import
    ``spafl.flower.*`` from the installed spafl package.
    """
    try:  # Python 3.11+
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    source = pyproject or find_app_pyproject()
    root = source.parent
    patterns = tomllib.loads(source.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include", [])
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copyfile(source, dest / "pyproject.toml")
    for pattern in patterns:
        for path in root.glob(pattern.lstrip("/")):
            relative = path.relative_to(root)
            if path.is_file() and "__pycache__" not in relative.parts and relative.parts[0] != ".venv":
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / relative)
    return dest


# --------------------------------------------------------------------------- the deployment


@dataclass
class Node:
    index: int
    process: ManagedProcess
    port: int = 0
    key: Path | None = None
    public_key: Path | None = None
    node_id: int | None = None
    history: list[int] = field(default_factory=list)  # node ids of earlier incarnations


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, all under ``out_dir``.

    Use as a context manager (``with LocalDeployment(...) as d:``): entering
    starts the SuperLink and all SuperNodes and waits until every SuperNode is
    connected; leaving (also on Ctrl-C or an exception) stops every process.

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
        return env

    def _exe(self, name: str) -> str:
        return str(self.bin / name)

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
                              f"{_tail(self.superlink.log_path)}")

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
                                      f"{_tail(node.process.log_path)}")
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
            raise DeployError(f"the SuperLink is not running; see {log_path}:\n{_tail(log_path)}")

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
            stragglers = tagged_processes(self.deploy_id, node.process.role)
            _signal_pids(stragglers, signal.SIGKILL)
            _wait_gone(stragglers, 5.0)

    def stop_supernode(self, index: int) -> list[int]:
        """Stop SuperNode ``index`` gracefully (SIGTERM, SIGKILL after the grace period)."""
        node = self.nodes[index]
        return stop_processes([node.process], self.deploy_id, self.grace, roles={node.process.role})

    def restart_supernode(self, index: int) -> Node:
        if self.nodes[index].process.alive():
            self.stop_supernode(index)
        return self.start_supernode(index, wait=True)

    # ------------------------------------------------------------ runs

    def _flwr_calls(self, calls: list[tuple[str, ...]], timeout: float) -> list[tuple[int, bytes]]:
        """Run ``flwr`` CLI commands in parallel; return (exit code, stdout) of each, in order.

        Each command runs in a session of its own with its stdout in an
        unnamed temporary file (never a pipe) and its stderr in
        ``logs/flwr-cli.log``; the waits poll, so an interrupt surfaces at
        once. A command that outlives ``timeout`` seconds, or is still running
        when anything goes wrong (an interrupt included), is killed with its
        process group; a timeout raises :class:`DeployError`.
        """
        import contextlib
        import tempfile

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
                        try:
                            os.killpg(proc.pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
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
            message = data.get("error-message") or _tail(self.logs / "flwr-cli.log", 5)
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

    # ------------------------------------------------------------ shutdown

    def processes(self) -> list[ManagedProcess]:
        procs = list(self.helpers) + [node.process for node in self.nodes]
        if self.superlink is not None:
            procs.append(self.superlink)
        return procs

    def leftover_processes(self) -> list[int]:
        """Live processes that carry this deployment's id (empty after :meth:`stop`)."""
        return tagged_processes(self.deploy_id)

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


# --------------------------------------------------------------------------- spafl deploy-local


def build_run_config(
    preset: str | None, assignments: dict[str, str], nodes: int, rounds: int | None,
    out_dir: Path, round_timeout: float | None, log: Callable[[str], None],
) -> tuple[dict[str, Any], Any]:
    """The Flower run config (``preset``, ``set``, ``out-dir``, ``round-timeout``) and the validated spafl Config.

    ``num_clients`` is the number of SuperNodes; ``rounds`` overrides the
    preset's. When ``clients_per_round`` was not set and the preset's value is
    larger than the number of nodes, every node trains in every round.
    """
    from spafl.config import FIELDS, build_config, coerce

    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}")
    base = build_config(preset)  # an unknown preset fails here
    for key, value in assignments.items():
        if key not in FIELDS:
            build_config(None, None, {key: value})  # raises the usual "unknown config key ... in --set"
        coerce(key, value)  # a malformed value fails here, before any process starts
        if ";" in value or ";" in key:
            raise UserError(f"--set {key}={value}: ';' is not allowed in deploy-local values")
    if "num_clients" in assignments and coerce("num_clients", assignments["num_clients"]) != nodes:
        raise UserError(f"--set num_clients={assignments['num_clients']} conflicts with --nodes {nodes}: each SuperNode is one client")
    values = dict(assignments)
    values["num_clients"] = str(nodes)
    if rounds is not None:
        values["rounds"] = str(rounds)
    note = None
    if "clients_per_round" not in values and base.clients_per_round > nodes:
        values["clients_per_round"] = str(nodes)
        note = f"clients_per_round {base.clients_per_round} > {nodes} nodes: every node trains every round (--set clients_per_round to change)"
    config = build_config(preset, None, values)  # validates every key and value before anything starts
    if note:
        log(note)
    run_config: dict[str, Any] = {
        "preset": preset or "",
        "set": ";".join(f"{key}={value}" for key, value in values.items()),
        "out-dir": str(out_dir),
    }
    if round_timeout is not None:
        run_config["round-timeout"] = float(round_timeout)
    return run_config, config


def deploy_local(
    out_dir: str | Path,
    nodes: int,
    *,
    rounds: int | None = None,
    preset: str | None = None,
    assignments: dict[str, str] | None = None,
    tls: bool = False,
    auth: bool = False,
    round_timeout: float | None = None,
    data_dir: str | None = None,
    timeout: float | None = None,
    log: Callable[[str], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the spafl app on a local SuperLink and ``nodes`` SuperNodes; return the run's summary.json.

    Every process it started is stopped before it returns or raises, also on
    KeyboardInterrupt (see :class:`InterruptGuard` for turning signals into
    one). It does not import torch: the supervising process stays light.
    """
    say = log or (lambda line: None)
    out = Path(out_dir).resolve()
    if (out / CONFIG).exists():
        raise UserError(f"{out_dir} already holds a run; pick another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    if round_timeout is not None and round_timeout <= 0:
        raise UserError(f"--round-timeout must be > 0, got {round_timeout}")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be > 0, got {timeout}")
    if '"' in str(out) or "'" in str(out):
        raise UserError(f"--out {out_dir}: quotes are not allowed in the path")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    if auth and not tls:
        say("--auth implies --tls (Flower authenticates SuperNodes only over TLS)")
    run_config, _ = build_run_config(preset, assignments or {}, nodes, rounds, out, round_timeout, say)
    pyproject = find_app_pyproject()
    out.mkdir(parents=True, exist_ok=True)
    app = stage_app(out / ".flower" / "app", pyproject)
    deployment = LocalDeployment(out, nodes, tls=tls, auth=auth, app_dir=app, data_dir=data_dir, log=say)
    try:
        with deployment:
            run_id = deployment.submit(run_config)
            status = deployment.wait_run(run_id, timeout=timeout, on_line=on_line)
            if status.get("status") != STATUS_COMPLETED:
                details = status.get("status-details") or ""
                raise DeployError(f"run {run_id} ended as {status.get('status')} {details}; see {deployment.logs / 'serverapp.log'}")
    finally:
        deployment.stop()  # a no-op after a complete stop; finishes one that an interrupt cut short
    summary_path = out / SUMMARY
    if not summary_path.exists():
        raise DeployError(f"run {run_id} finished but wrote no {SUMMARY} in {out}; see {out / 'logs' / 'serverapp.log'}")
    return json.loads(summary_path.read_text())
