"""`spafl deploy-local`: check the options, build the run config, run it on a :class:`LocalDeployment`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spafl.errors import UserError
from spafl.flower.deploy.app import find_app_pyproject, stage_app
from spafl.flower.deploy.local import LocalDeployment
from spafl.flower.deploy.processes import DeployError
from spafl.flower.deploy.runs import STATUS_COMPLETED
from spafl.runtime.record import CONFIG, SUMMARY  # imports no torch


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
