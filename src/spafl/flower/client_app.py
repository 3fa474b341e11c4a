"""The ClientApp: each SuperNode is one spafl client, the one of its ``partition-id``.

Per node (node config): ``partition-id`` and ``num-partitions`` (Flower sets
both in a simulation; ``num-partitions`` must equal the config's
``num_clients``), optional ``state-dir`` (node-local directory for the
persistent client state) and ``data-dir`` (where the dataset files are; it
replaces the config's ``data_dir``).

The node derives its data exactly as the in-process simulator derives client
k's: the dataset is loaded once per process, split with the config's seed
(:func:`spafl.runtime.federation.split`) and client k's part is taken with
:func:`spafl.runtime.federation.client_data`. Its initial state is
``algorithm.init_client(k, spec.initial_state(seed))``, the same seeded model
as in-process.

The client state (weights, optimizer state, own thresholds, last seen global
thresholds) lives in ``context.state`` for the run, and, with ``state-dir``,
also in ``<state-dir>/client-<k>.pt``, rewritten atomically after every
update. A node that starts without the state in its context (a restarted
SuperNode) loads the file if it belongs to the same spafl run and partition,
logs it, and says ``resumed_from_disk=1`` in the reply to that message.

Two versions of the state are kept: the newest, and the newest one written
in an earlier round. Every message says from which rounds the server has
resumed (``resumed-at``); a version written in a round the server has since
gone back before is void, and the node falls back to the one before, so a
resumed server meets its clients as they were at its checkpoint.

Message types handled: ``query`` (report the partition), ``train`` (one
local update), ``train.broadcast`` (apply a message sent to every client
after aggregation), ``evaluate`` (evaluate on the node's own test split).
Any message may carry broadcasts the node missed (record ``broadcasts``):
they are applied first, in round order, skipping those already applied;
every reply says the last one applied (``last-broadcast``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from spafl.algorithms import Algorithm, ClientData, ClientTask
from spafl.config import Config
from spafl.data import Dataset, Partition, load_dataset
from spafl.errors import UserError
from spafl.flower import records as rec
from spafl.runtime.federation import client_data, configure_threads, make_algorithm, model_spec, resolve_device, split
from spafl.runtime.record import write_bytes_atomic

STATE_KEY = "spafl.client"  # ConfigRecord in context.state: {"payload": bytes}
STATE_FORMAT = 2

# Loaded once per process: the dataset, its split, the algorithm (with its model workspace).
_DATASETS: dict[tuple[str, str], Dataset] = {}
_PARTITIONS: dict[str, Partition] = {}
_ALGORITHMS: dict[str, Algorithm] = {}
_NODES: dict[tuple[str, int], _Node] = {}


@dataclass
class _Node:
    config: Config
    partition_id: int
    algorithm: Algorithm
    data: ClientData
    dataset: Dataset


def _dataset(config: Config) -> Dataset:
    key = (config.dataset, config.data_dir)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(config.dataset, config.data_dir or None)
    return _DATASETS[key]


def _config_key(config: Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def node_setup(context: Context, run_overrides: Mapping[str, Any] | None = None, node_overrides: Mapping[str, Any] | None = None) -> _Node:
    """This node's config, partition, algorithm and data (cached per process)."""
    settings = rec.RunSettings.from_run_config({**dict(context.run_config), **dict(run_overrides or {})})
    node_config = {**dict(context.node_config), **dict(node_overrides or {})}
    config = settings.config()
    if node_config.get(rec.DATA_DIR):
        config = config.replace(data_dir=str(node_config[rec.DATA_DIR]))
    if rec.PARTITION_ID not in node_config:
        raise UserError(f"node config lacks {rec.PARTITION_ID!r}; start the SuperNode with --node-config \"partition-id=K num-partitions=N\"")
    partition_id = int(node_config[rec.PARTITION_ID])
    if rec.NUM_PARTITIONS in node_config and int(node_config[rec.NUM_PARTITIONS]) != config.num_clients:
        raise UserError(
            f"node config num-partitions={node_config[rec.NUM_PARTITIONS]} but the spafl config has num_clients={config.num_clients}; they must be equal"
        )
    if not 0 <= partition_id < config.num_clients:
        raise UserError(f"partition-id {partition_id} is outside 0..{config.num_clients - 1}")
    configure_threads(config)
    key = (_config_key(config), partition_id)
    if key not in _NODES:
        resolve_device(config)
        dataset = _dataset(config)
        if key[0] not in _ALGORITHMS:  # one split and one algorithm (model workspace) per config, shared by the nodes of a process
            _PARTITIONS[key[0]] = split(config, dataset)
            _ALGORITHMS[key[0]] = make_algorithm(config, model_spec(config, dataset))
        data = client_data(config, dataset, _PARTITIONS[key[0]], partition_id)
        _NODES[key] = _Node(config, partition_id, _ALGORITHMS[key[0]], data, dataset)
    return _NODES[key]


def _state_dir(context: Context, node_overrides: Mapping[str, Any] | None) -> Path | None:
    value = {**dict(context.node_config), **dict(node_overrides or {})}.get(rec.STATE_DIR)
    return Path(str(value)) if value else None


def state_path(state_dir: Path, partition_id: int) -> Path:
    return Path(state_dir) / f"client-{partition_id}.pt"


@dataclass
class _Versions:
    """A node's client state: up to two versions, each ``{"round", "epoch", "last_broadcast", "state"}``, oldest first."""

    versions: list[dict]
    resumed_from_disk: bool


def _valid(version: dict, resumed_at: list[int]) -> bool:
    """Whether a resume since ``version`` was written went back to a round before it (then it is void)."""
    later_resumes = resumed_at[version["epoch"]:]
    return all(version["round"] < start for start in later_resumes)


def _read_versions(context: Context, node: _Node, state_dir: Path | None, token: str) -> _Versions:
    """The node's saved versions of this run: from its context, else from its state file, else none."""
    k = node.partition_id
    if STATE_KEY in context.state:
        payload = rec.decode_state(context.state[STATE_KEY]["payload"])
        if payload["partition_id"] == k and payload["run"] == token:
            return _Versions(payload["versions"], False)
    if state_dir is not None:
        path = state_path(state_dir, k)
        if path.exists():
            raw = path.read_bytes()
            try:
                payload = rec.decode_state(raw)
                if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT or "versions" not in payload:
                    raise ValueError("not a spafl client state file of this version")
            except Exception as error:  # noqa: BLE001 - unreadable: say so, never silently restart the client
                raise UserError(f"client state file {path} is unreadable ({type(error).__name__}: {error}); delete it to start client {k} afresh") from None
            if payload.get("run") == token and payload.get("partition_id") == k:
                log(INFO, "spafl: client %d resumed from %s", k, path)
                context.state[STATE_KEY] = ConfigRecord({"payload": raw})
                return _Versions(payload["versions"], True)
            log(WARNING, "spafl: ignoring %s: it belongs to run %s / partition %s, not run %s / partition %d",
                path, payload.get("run"), payload.get("partition_id"), token, k)
    return _Versions([], False)


@dataclass
class _Client:
    """The state a message works on, and where it came from."""

    state: dict
    last_broadcast: int
    versions: list[dict]  # the valid versions it was chosen from
    resumed_from_disk: bool


def load_client(context: Context, node: _Node, state_dir: Path | None, config: ConfigRecord) -> _Client:
    """The newest valid version of the client's state (the initial state when there is none), then any broadcasts it missed."""
    token, resumed_at = str(config[rec.RUN_TOKEN]), rec.parse_rounds(config.get(rec.RESUMED_AT, ""))
    read = _read_versions(context, node, state_dir, token)
    versions = [v for v in read.versions if _valid(v, resumed_at)]
    if versions:
        newest = versions[-1]
        # a copy: training updates the optimizer's buffers in place, and the kept version must stay as it was
        client = _Client(copy.deepcopy(newest["state"]), int(newest["last_broadcast"]), versions, read.resumed_from_disk)
    else:
        initial = node.algorithm.init_client(node.partition_id, node.algorithm.spec.initial_state(node.config.seed))
        client = _Client(initial, -1, [], read.resumed_from_disk)
    return client


def apply_broadcasts(node: _Node, client: _Client, message: Message) -> bool:
    """Apply the broadcasts ``message`` carries that the client has not applied, in round order; whether any was."""
    if rec.BROADCASTS not in message.content.array_records:
        return False
    applied = False
    for round_index, received in rec.unpack_rounds(rec.from_array_record(message.content.array_records[rec.BROADCASTS])).items():
        if round_index > client.last_broadcast:
            client.state = node.algorithm.client_receive(client.state, received, round_index)
            client.last_broadcast = round_index
            applied = True
    return applied


def save_client(context: Context, node: _Node, state_dir: Path | None, client: _Client, config: ConfigRecord) -> None:
    """Write the client's state as the version of this message's round; keep the newest version of an earlier round beside it."""
    round_index = int(config["round"])
    epoch = len(rec.parse_rounds(config.get(rec.RESUMED_AT, "")))
    earlier = [v for v in client.versions if v["round"] < round_index][-1:]
    version = {"round": round_index, "epoch": epoch, "last_broadcast": client.last_broadcast, "state": client.state}
    payload = rec.encode_state({
        "format": STATE_FORMAT, "run": str(config[rec.RUN_TOKEN]), "partition_id": node.partition_id, "versions": [*earlier, version],
    })
    context.state[STATE_KEY] = ConfigRecord({"payload": payload})
    if state_dir is not None:
        write_bytes_atomic(state_path(state_dir, node.partition_id), payload)
    client.versions = [*earlier, version]


def _config(message: Message, node: _Node) -> ConfigRecord:
    config = message.content[rec.CONFIG]
    if rec.PARTITION_ID in config and int(config[rec.PARTITION_ID]) != node.partition_id:
        raise ValueError(f"message meant for partition {config[rec.PARTITION_ID]} reached the node of partition {node.partition_id}")
    return config


def _reply(message: Message, node: _Node, client: _Client, metrics: dict[str, Any], arrays=None, info: ConfigRecord | None = None) -> Message:
    metrics = {**metrics, rec.PARTITION_ID: node.partition_id, rec.LAST_BROADCAST: client.last_broadcast,
               "resumed_from_disk": client.resumed_from_disk}
    content = RecordDict({rec.METRICS: rec.metric_record(metrics)})
    if arrays is not None:
        content[rec.ARRAYS] = arrays
    if info is not None:
        content[rec.INFO] = info
    return Message(content, reply_to=message)


# -- handlers ---------------------------------------------------------------------
def handle_query(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    config = _config(message, node)
    client = load_client(context, node, _state_dir(context, node_overrides), config)
    dataset = node.dataset
    info = ConfigRecord({
        "data_source": str(dataset.source),
        "data_checksums": json.dumps(dataset.checksums, sort_keys=True),
        "image_shape": [int(s) for s in dataset.image_shape],
        "num_classes": int(dataset.num_classes),
    })
    metrics = {rec.NUM_PARTITIONS: node.config.num_clients, "num_train": node.data.num_train, "num_test": node.data.num_test}
    return _reply(message, node, client, metrics, info=info)


def handle_train(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    config = _config(message, node)
    round_index = int(config["round"])
    down = rec.from_array_record(message.content[rec.ARRAYS])
    client = load_client(context, node, state_dir, config)
    apply_broadcasts(node, client, message)
    task = ClientTask(client_id=node.partition_id, round_index=round_index, seed=node.config.seed)
    result = node.algorithm.client_update(client.state, down, node.data, task)
    client.state = result.state
    save_client(context, node, state_dir, client, config)
    stats = result.stats
    metrics = {
        "train_loss": float(stats.get("train_loss", math.nan)),
        "steps": int(stats.get("steps", 0)),
        "flops": float(stats.get("flops", 0.0)),
        "flops_true": float(stats.get("flops_true", 0.0)),
        "num_samples": int(stats.get("num_samples", 0)),
        "guard_resets": int(stats.get("guard_resets", 0)),
        "round": round_index,
    }
    return _reply(message, node, client, metrics, arrays=rec.to_array_record(result.message))


def handle_broadcast(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    config = _config(message, node)
    client = load_client(context, node, state_dir, config)
    if apply_broadcasts(node, client, message):
        save_client(context, node, state_dir, client, config)
    return _reply(message, node, client, {"round": int(config["round"])})


def handle_evaluate(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    config = _config(message, node)
    server = rec.unflatten_state(rec.from_array_record(message.content[rec.SERVER_STATE]))
    client = load_client(context, node, state_dir, config)
    if apply_broadcasts(node, client, message):
        save_client(context, node, state_dir, client, config)
    evaluation = node.algorithm.evaluate(node.algorithm.evaluation_state(client.state, server), node.data, node.config.evaluation_batch)
    if evaluation.after is not None:  # the collapse guard changed the model while it was evaluated: it stays so
        client.state = node.algorithm.absorb_evaluation(client.state, evaluation.after)
        save_client(context, node, state_dir, client, config)
    return _reply(message, node, client, rec.eval_to_metrics(evaluation))


def make_client_app(run_config: Mapping[str, Any] | None = None, node_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` / ``node_config`` entries take precedence over the context's (tests, embedding)."""
    run_overrides = dict(run_config or {})
    node_overrides = dict(node_config or {})
    client = ClientApp()

    @client.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context, run_overrides, node_overrides)

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, run_overrides, node_overrides)

    @client.train("broadcast")
    def broadcast(message: Message, context: Context) -> Message:
        return handle_broadcast(message, context, run_overrides, node_overrides)

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, run_overrides, node_overrides)

    return client


app = make_client_app()
