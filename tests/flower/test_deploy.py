"""`spafl deploy-local`: a real Flower SuperLink and SuperNodes on 127.0.0.1.

Each test starts Flower's own binaries (flower-superlink, flower-supernode,
flwr) as separate processes, so they are end to end: TLS, SuperNode
authentication, a SuperNode killed with SIGKILL in the middle of a round and
restarted on the same state directory, and the clean-up of every process.
Every wait has a deadline, and a SIGALRM watchdog turns a hang into a failure
while the deployment's context manager still stops what it started.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from spafl.cli import main
from spafl.errors import UserError
from spafl.flower import deploy
from spafl.flower.deploy import (
    STATUS_COMPLETED,
    LocalDeployment,
    build_run_config,
    flower_bin_dir,
    processes_with_env,
    stage_app,
    tagged_processes,
)

# End-to-end tests: real processes on 127.0.0.1. Each message to a SuperNode starts a fresh ClientApp
# process that imports flwr and torch (~4 s of CPU), so they are CPU-bound on 2 cores: measured
# durations are in the report of `pytest tests/flower --durations=15`.
end_to_end = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process checks read /proc"),
]


def e2e(test):
    for mark in end_to_end:
        test = mark(test)
    return test


# Small and quick: synthetic data, one epoch, one thread per process.
SMALL = ["dataset=synthetic", "clients_per_round=2", "local_epochs=1", "threads=1"]


@pytest.fixture
def watchdog():
    """``watchdog(seconds)``: raise TimeoutError in the test after ``seconds`` (context managers still clean up)."""

    def fire(signum, frame):
        raise TimeoutError("deploy test exceeded its hard time limit")

    previous = signal.signal(signal.SIGALRM, fire)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def flower_processes(out: Path) -> list[int]:
    """Live processes that run with this deployment's private Flower home."""
    return processes_with_env({"FLWR_HOME": str(out.resolve() / ".flower")})


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@e2e
def test_deploy_local_tls_auth_three_nodes(tmp_path):
    """The command end to end: TLS + SuperNode auth, 3 SuperNodes, 1 round; metrics written; nothing left running.

    One round is enough for every message type over TLS (query, evaluate, train) and for the summary;
    the deployment tests take most of the suite's time, and each round costs about 15 s here.
    """
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "spafl.cli", "deploy-local", "--nodes", "3", "--rounds", "1", "--out", str(out),
        "--tls", "--auth", "--round-timeout", "60", "--timeout", "150", *[f"--set={a}" for a in SMALL],
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the command stops its deployment on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"deploy-local hung; stderr:\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
    assert "SuperLink up on 127.0.0.1:" in stderr and "TLS, SuperNode auth" in stderr
    assert "registered 3 SuperNode public key(s)" in stderr
    assert f"run {out}: 1 rounds" in stdout  # spafl.report.format_summary

    rows = rows_of(out)
    assert [row["round"] for row in rows] == [0, 1]
    assert all(len(row["sampled"]) == 2 for row in rows[1:])
    assert rows[1]["replies"] == 2 and (rows[1]["rejected"], rows[1]["missing"]) == (0, 0)
    assert rows[-1]["evaluated"] and rows[-1]["clients_evaluated"] == 3 and 0 <= rows[-1]["accuracy"] <= 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["num_clients"] == 3 and config["config"]["rounds"] == 1

    # TLS and authentication were really on
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert "--enable-supernode-auth" in superlink_log and "https://127.0.0.1:" in superlink_log
    assert (out / ".flower" / "certs" / "ca.crt").exists()
    assert sorted(p.name for p in (out / ".flower" / "keys").iterdir()) == sorted(
        f"supernode-{i}{suffix}" for i in range(3) for suffix in ("", ".pub")
    )
    for i in range(3):
        assert (out / "logs" / f"supernode-{i}.log").exists()
        assert (out / "nodes" / str(i)).is_dir()
    assert flower_processes(out) == []


# The server waits this long for the killed node's reply in round 2: the test's fixed cost. A healthy
# exchange (a fresh ClientApp process per message) took up to ~11 s here on 2 busy CPU cores.
ROUND_TIMEOUT = 15.0


@e2e
def test_supernode_killed_mid_round_then_restarted_resumes_its_state(tmp_path, watchdog):
    """SIGKILL a SuperNode while it trains; the round goes on without it; the restarted node loads its saved state."""
    watchdog(170)
    out = tmp_path / "run"
    nodes, rounds = 2, 3
    messages = []
    run_config, _ = build_run_config(
        None, dict(a.split("=") for a in SMALL) | {"clients_per_round": str(nodes), "eval_every": str(rounds)},
        nodes, rounds, out.resolve(), ROUND_TIMEOUT, messages.append,
    )
    with LocalDeployment(out, nodes, log=messages.append) as deployment:
        run_id = deployment.submit(run_config, app_dir=stage_app(deployment.home / "app"))

        # wait until some node receives its second `train` message (round 2): it saved its state in round 1
        deadline = time.monotonic() + 100
        victim = None
        while victim is None:
            for node in deployment.nodes:
                if len(re.findall(r"Receiving: train message", node.process.log_since_start())) >= 2:
                    victim = node.index
                    break
            assert time.monotonic() < deadline, "no node reached round 2"
            deployment.check_superlink()
            time.sleep(0.1)
        old_id = deployment.nodes[victim].node_id
        state_file = out / "nodes" / str(victim) / f"client-{victim}.pt"
        assert state_file.exists()
        deployment.kill_supernode(victim)  # SIGKILL to the SuperNode's group: SuperExec and ClientApp too
        assert tagged_processes(deployment.deploy_id, f"supernode-{victim}") == []

        deployment.restart_supernode(victim)  # same partition, same state dir, new node id
        assert deployment.nodes[victim].node_id not in (None, old_id)
        status = deployment.wait_run(run_id, timeout=120)
        restarted_log = deployment.nodes[victim].process.log_since_start()
    assert status["status"] == STATUS_COMPLETED
    assert deployment.leftover == [] and tagged_processes(deployment.deploy_id) == []
    assert flower_processes(out) == []

    rows = rows_of(out)
    assert [row["round"] for row in rows] == list(range(rounds + 1))
    assert rows[2]["missing"] >= 1  # the killed node's reply never came
    assert any(victim in row["resumed_from_disk"] for row in rows[3:])
    assert f"client {victim} resumed from {state_file}" in restarted_log
    assert rows[-1]["evaluated"]


@e2e
def test_ctrl_c_stops_every_process(tmp_path):
    """SIGINT while the ServerApp runs: exit 130, no Flower process left (ServerApp and ClientApps included).

    deploy-local starts with SIGINT ignored, as a background job of a non-interactive shell (or a harness
    that runs `make test` that way) does: Python then leaves SIGINT ignored unless the program installs a
    handler. That was the intermittent hang: deploy-local went on as if nothing happened, and its Flower
    processes with it. A second SIGINT during the clean-up must not cut it short. Output goes to files,
    not pipes, so nothing here depends on a pipe being drained.
    """
    out = tmp_path / "run"
    command = [sys.executable, "-m", "spafl.cli", "deploy-local", "--nodes", "1", "--rounds", "5", "--out", str(out),
               "--set=dataset=synthetic", "--set=clients_per_round=1", "--set=threads=1"]
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    try:
        deadline = time.monotonic() + 90
        while not any("flwr-serverapp" in _cmdline(pid) for pid in flower_processes(out)):
            assert proc.poll() is None, _read(stderr_path)[-3000:]
            assert time.monotonic() < deadline, "deploy-local did not get as far as starting the ServerApp"
            time.sleep(0.2)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C while it stops (ignored if it has exited already)
        proc.wait(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = _read(stderr_path)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "deploy-local: warning" not in stderr, stderr[-3000:]
    assert flower_processes(out) == []
    print(f"deploy-local exited {took:.1f} s after SIGINT")
    assert took < 15, f"deploy-local took {took:.1f} s to stop after SIGINT"


def _cmdline(pid: int) -> str:
    return _read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def test_flower_binaries_next_to_the_interpreter():
    assert (flower_bin_dir() / "flower-supernode").exists()
    assert os.access(flower_bin_dir() / "flwr", os.X_OK)


# -- quick checks of the pieces (no Flower process) ----------------------------------


def test_generated_certificates_pass_a_tls_handshake(tmp_path):
    import socket
    import ssl
    import threading

    paths = deploy.write_tls_files(tmp_path)
    assert all(oct(paths[key].stat().st_mode & 0o777) == "0o600" for key in ("ca_key", "server_key"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(paths["server_cert"], paths["server_key"])
    client_context = ssl.create_default_context(cafile=str(paths["ca_cert"]))  # checks the chain and the name
    names = ("127.0.0.1", "localhost")
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve():
            for _ in names:
                connection, _ = listener.accept()
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        for name in names:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_context.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(2) == b"ok"
        thread.join(timeout=10)


def test_supernode_keys_are_what_flower_accepts(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    private, public = deploy.write_node_keys(tmp_path, "supernode-0")
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode --auth-supernode-private-key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")  # as `flwr supernode register`
    assert isinstance(load_ssh_public_key(public.read_bytes()), ec.EllipticCurvePublicKey)
    assert oct(private.stat().st_mode & 0o777) == "0o600"


def test_run_config_sets_clients_and_rounds(tmp_path):
    notes = []
    run_config, config = build_run_config("fmnist-quick", {"dataset": "synthetic"}, 3, 2, tmp_path, 30.0, notes.append)
    assert (config.num_clients, config.rounds, config.clients_per_round, config.dataset) == (3, 2, 3, "synthetic")
    assert run_config == {"preset": "fmnist-quick", "out-dir": str(tmp_path), "round-timeout": 30.0,
                          "set": "dataset=synthetic;num_clients=3;rounds=2;clients_per_round=3"}
    assert notes and "clients_per_round 10 > 3" in notes[0]
    for bad in ({"th_coef": "1"}, {"num_clients": "4"}, {"clients_per_round": "4"}, {"seed": "1;2"}):
        with pytest.raises(UserError):
            build_run_config(None, bad, 3, 2, tmp_path, None, notes.append)


def test_node_config_text():
    text = deploy.node_config_arg({"partition-id": 2, "num-partitions": 3, "state-dir": "/a b/c"})
    assert text == 'partition-id=2 num-partitions=3 state-dir="/a b/c"'
    from flwr.common.config import (
        parse_config_args,  # what flower-supernode --node-config does
    )

    assert parse_config_args([text]) == {"partition-id": 2, "num-partitions": 3, "state-dir": "/a b/c"}


def test_staged_app_holds_the_declaration_and_sources(tmp_path):
    app = stage_app(tmp_path / "app")
    assert "[tool.flwr.app" in (app / "pyproject.toml").read_text()
    assert (app / "src" / "spafl" / "flower" / "server_app.py").exists()
    assert not list(app.rglob("__pycache__"))


def test_cli_rejects_bad_input_before_starting_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["deploy-local", "--nodes", "2", "--out", str(out), "--set", "th_coef=1"]) == 2
    assert "unknown config key 'th_coef'" in capsys.readouterr().err
    assert main(["deploy-local", "--nodes", "0", "--out", str(out)]) == 2
    assert not out.exists()


# -- signals and the clean-up, without Flower ----------------------------------------


def test_interrupt_guard_handles_an_inherited_sig_ign_and_raises_once():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a non-interactive shell
    try:
        with deploy.InterruptGuard() as guard:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
                time.sleep(1)  # the handler runs at the next bytecode; never gets here
            signal.raise_signal(signal.SIGTERM)  # later signals only count: the clean-up goes on
            signal.raise_signal(signal.SIGINT)
            assert guard.received == [signal.SIGINT, signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupt_guard_leaves_a_nohup_sighup_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with deploy.InterruptGuard() as guard:
            signal.raise_signal(signal.SIGHUP)
            assert guard.received == []
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_signals_held_during_a_stop_are_delivered_afterwards():
    # Python's own SIGINT handler, as in a foreground process: a job started in the background
    # by a non-interactive shell inherits SIGINT ignored, and Python then leaves it ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        held = deploy._SignalsHeld()
        with pytest.raises(KeyboardInterrupt), held:  # the handler from before the block runs after it
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.05)  # no KeyboardInterrupt in here
            inside = list(held.received)
        assert inside == [signal.SIGINT, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process checks read /proc")
def test_stop_processes_escalates_to_sigkill_and_sweeps_other_sessions(tmp_path):
    """A group leader that ignores SIGTERM, with a child in a session of its own that ignores it too."""
    deploy_id = f"test-{os.getpid()}-{time.monotonic_ns()}"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(\"child\" + \" up\", flush=True); time.sleep(60)'], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    proc = deploy.ManagedProcess("stubborn", "stubborn", [sys.executable, "-c", script], tmp_path / "stubborn.log")
    proc.start({**os.environ, deploy.DEPLOY_ID_ENV: deploy_id}, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while "child up" not in proc.log_since_start():
            assert time.monotonic() < deadline and proc.alive(), proc.log_since_start()
            time.sleep(0.05)
        assert len(tagged_processes(deploy_id)) == 2
        began = time.monotonic()
        left = deploy.stop_processes([proc], deploy_id, grace=0.5)
        assert left == [] and tagged_processes(deploy_id) == []
        assert proc.popen.returncode == -signal.SIGKILL
        assert time.monotonic() - began < 5
    finally:
        for pid in tagged_processes(deploy_id):
            os.kill(pid, signal.SIGKILL)
        if proc.alive():
            proc.popen.kill()
            proc.popen.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies and environments as on Linux")
def test_process_lookup_skips_zombies_and_leaves_children_to_their_popen():
    """psutil finds processes by environment; a zombie counts as gone; a child's exit status stays with its Popen."""
    from spafl.flower.deploy.processes import find_tagged, send_signal, wait_gone

    tag = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, deploy.DEPLOY_ID_ENV: tag}
    quick = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], env=env)  # a zombie until reaped
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        deadline = time.monotonic() + 30
        while tagged_processes(tag) != [slow.pid]:
            assert time.monotonic() < deadline, tagged_processes(tag)
            time.sleep(0.05)
        assert processes_with_env({deploy.DEPLOY_ID_ENV: tag}) == [slow.pid]
        [process] = find_tagged(tag)
        began = time.monotonic()
        send_signal([process], signal.SIGKILL)
        assert wait_gone([process], 10) == [] and time.monotonic() - began < 5
        assert (quick.wait(timeout=10), slow.wait(timeout=10)) == (3, -signal.SIGKILL)  # not reaped by psutil
    finally:
        for proc in (quick, slow):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_deploy_local_command_does_not_import_torch():
    code = ("import sys; import spafl.cli, spafl.flower.deploy; "
            "from spafl.flower.deploy import build_run_config; from pathlib import Path; "
            "build_run_config(None, {'dataset': 'synthetic'}, 2, 1, Path('unused'), None, print); "
            "import importlib.util; importlib.util.find_spec('spafl.flower.server_app'); "  # as `flwr run` checks the app
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    from spafl.runtime import record as rundir

    assert (deploy.CONFIG, deploy.SUMMARY) == (rundir.CONFIG, rundir.SUMMARY)


def test_private_keys_are_created_owner_only_and_children_bypass_proxies_for_loopback(tmp_path, monkeypatch):
    from spafl.flower.deploy import local, tls

    created_modes = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created_modes.append((Path(path).name, mode & 0o777))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(tls.os, "open", recording_open)
    private, public = tls.write_node_keys(tmp_path / "keys", "node-0")
    paths = tls.write_tls_files(tmp_path / "certs")
    for key in (private, paths["ca_key"], paths["server_key"]):
        assert (key.stat().st_mode & 0o777) == 0o600
        assert (key.name, 0o600) in created_modes  # owner-only from the moment it exists
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")

    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "example.org")
    monkeypatch.delenv("no_proxy", raising=False)
    deployment = local.LocalDeployment(tmp_path / "run", 1, log=lambda line: None)
    env = deployment.env
    assert env["NO_PROXY"] == "example.org,127.0.0.1,localhost,::1" and env["no_proxy"] == "127.0.0.1,localhost,::1"
