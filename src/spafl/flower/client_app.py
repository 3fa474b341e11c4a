"""The ClientApp: each SuperNode is one spafl client, the one of its ``partition-id``.

Per node (node config): ``partition-id`` and ``num-partitions`` (Flower sets
both in a simulation; ``num-partitions`` must equal the config's
``num_clients``), optional ``state-dir`` (node-local directory for the
persistent client state) and ``data-dir`` (where the dataset files are; it
replaces the config's ``data_dir``).

The node derives its data exactly as the in-process simulator derives client
k's: the dataset is loaded once per process, split with the config's seed
(:func:`spafl.engine.federation.split`) and client k's part is taken with
:func:`spafl.engine.federation.client_data`. Its initial state is
``algorithm.init_client(k, spec.initial_state(seed))``, the same seeded model
as in-process.

The client state (weights, optimizer state, own thresholds, last seen global
thresholds) lives in ``context.state`` for the run, and, with ``state-dir``,
also in ``<state-dir>/client-<k>.pt``, rewritten atomically after every
update. A node that starts without the state in its context (a restarted
SuperNode) loads the file if it belongs to the same run and partition, logs
it, and says ``resumed_from_disk=1`` in the reply to that message.

Message types handled: ``query`` (report the partition), ``train`` (one
local update), ``train.broadcast`` (apply a message sent to every client
after aggregation), ``evaluate`` (evaluate on the node's own test split).
"""

from __future__ import annotations

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

from spafl.algorithms import ALGORITHMS, Algorithm, ClientData, ClientTask
from spafl.config import Config
from spafl.data import Dataset, Partition, load_dataset
from spafl.engine.federation import client_data, model_spec, split
from spafl.engine.simulator import configure_threads, resolve_device
from spafl.errors import UserError
from spafl.flower import records as rec
from spafl.metrics import evaluate_client

STATE_KEY = "spafl.client"  # ConfigRecord in context.state: {"payload": bytes}
STATE_FORMAT = 1

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
            _ALGORITHMS[key[0]] = ALGORITHMS[config.method](config, model_spec(config, dataset))
        data = client_data(config, dataset, _PARTITIONS[key[0]], partition_id)
        _NODES[key] = _Node(config, partition_id, _ALGORITHMS[key[0]], data, dataset)
    return _NODES[key]


def _state_dir(context: Context, node_overrides: Mapping[str, Any] | None) -> Path | None:
    value = {**dict(context.node_config), **dict(node_overrides or {})}.get(rec.STATE_DIR)
    return Path(str(value)) if value else None


def state_path(state_dir: Path, partition_id: int) -> Path:
    return Path(state_dir) / f"client-{partition_id}.pt"


def load_client_state(context: Context, node: _Node, state_dir: Path | None) -> tuple[dict, bool]:
    """(client state, whether it was read from disk): context first, then the state file, then the initial state."""
    k = node.partition_id
    if STATE_KEY in context.state:
        payload = rec.decode_state(context.state[STATE_KEY]["payload"])
        if payload["partition_id"] == k:
            return payload["state"], False
    if state_dir is not None:
        path = state_path(state_dir, k)
        if path.exists():
            raw = path.read_bytes()
            try:
                payload = rec.decode_state(raw)
                if not isinstance(payload, dict) or "state" not in payload:
                    raise ValueError("not a spafl client state file")
            except Exception as error:  # noqa: BLE001 - unreadable: say so, never silently restart the client
                raise UserError(f"client state file {path} is unreadable ({type(error).__name__}: {error}); delete it to start client {k} afresh") from None
            if payload.get("run_id") == context.run_id and payload.get("partition_id") == k:
                log(INFO, "spafl: client %d resumed from %s (state after round %s)", k, path, payload.get("round"))
                context.state[STATE_KEY] = ConfigRecord({"payload": raw})
                return payload["state"], True
            log(WARNING, "spafl: ignoring %s: it belongs to run %s / partition %s, not run %s / partition %d",
                path, payload.get("run_id"), payload.get("partition_id"), context.run_id, k)
    return node.algorithm.init_client(k, node.algorithm.spec.initial_state(node.config.seed)), False


def save_client_state(context: Context, node: _Node, state_dir: Path | None, state: dict, round_index: int) -> None:
    payload = rec.encode_state({
        "format": STATE_FORMAT, "run_id": context.run_id, "partition_id": node.partition_id, "round": round_index, "state": state,
    })
    context.state[STATE_KEY] = ConfigRecord({"payload": payload})
    if state_dir is not None:
        rec.write_bytes_atomic(state_path(state_dir, node.partition_id), payload)


def _round_and_target(message: Message, node: _Node) -> int:
    config = message.content[rec.CONFIG]
    intended = int(config[rec.PARTITION_ID])
    if intended != node.partition_id:
        raise ValueError(f"message meant for partition {intended} reached the node of partition {node.partition_id}")
    return int(config["round"])


def _reply(message: Message, metrics: dict[str, Any], arrays=None, info: ConfigRecord | None = None) -> Message:
    content = RecordDict({rec.METRICS: rec.metric_record(metrics)})
    if arrays is not None:
        content[rec.ARRAYS] = arrays
    if info is not None:
        content[rec.INFO] = info
    return Message(content, reply_to=message)


# -- handlers ---------------------------------------------------------------------
def handle_query(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    _, resumed = load_client_state(context, node, state_dir)
    dataset = node.dataset
    info = ConfigRecord({
        "data_source": str(dataset.source),
        "data_checksums": json.dumps(dataset.checksums, sort_keys=True),
        "image_shape": [int(s) for s in dataset.image_shape],
        "num_classes": int(dataset.num_classes),
    })
    metrics = {
        rec.PARTITION_ID: node.partition_id, rec.NUM_PARTITIONS: node.config.num_clients,
        "resumed_from_disk": resumed, "num_train": node.data.num_train, "num_test": node.data.num_test,
    }
    return _reply(message, metrics, info=info)


def handle_train(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    round_index = _round_and_target(message, node)
    down = rec.from_array_record(message.content[rec.ARRAYS])
    state, resumed = load_client_state(context, node, state_dir)
    task = ClientTask(client_id=node.partition_id, round_index=round_index, seed=node.config.seed)
    result = node.algorithm.client_update(state, down, node.data, task)
    save_client_state(context, node, state_dir, result.state, round_index)
    stats = result.stats
    metrics = {
        "train_loss": float(stats.get("train_loss", math.nan)),
        "steps": int(stats.get("steps", 0)),
        "flops": float(stats.get("flops", 0.0)),
        "num_samples": int(stats.get("num_samples", 0)),
        rec.PARTITION_ID: node.partition_id,
        "round": round_index,
        "resumed_from_disk": resumed,
    }
    return _reply(message, metrics, arrays=rec.to_array_record(result.message))


def handle_broadcast(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    round_index = _round_and_target(message, node)
    received = rec.from_array_record(message.content[rec.ARRAYS])
    state, resumed = load_client_state(context, node, state_dir)
    state = node.algorithm.client_receive(state, received, round_index)
    save_client_state(context, node, state_dir, state, round_index)
    return _reply(message, {rec.PARTITION_ID: node.partition_id, "round": round_index, "resumed_from_disk": resumed})


def handle_evaluate(message: Message, context: Context, run_overrides=None, node_overrides=None) -> Message:
    node = node_setup(context, run_overrides, node_overrides)
    state_dir = _state_dir(context, node_overrides)
    _round_and_target(message, node)
    server = rec.unflatten_state(rec.from_array_record(message.content[rec.SERVER_STATE]))
    state, resumed = load_client_state(context, node, state_dir)
    model = node.algorithm.workspace(node.algorithm.evaluation_state(state, server))
    evaluation = evaluate_client(model, node.data, node.config.eval_batch_size, node.algorithm.device)
    metrics = {**rec.eval_to_metrics(evaluation), rec.PARTITION_ID: node.partition_id, "resumed_from_disk": resumed}
    return _reply(message, metrics)


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
