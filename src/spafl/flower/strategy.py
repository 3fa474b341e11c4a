"""The server side of the Flower App: a ``flwr.serverapp.strategy.Strategy`` driving a spafl Algorithm.

One round (as in :meth:`spafl.engine.simulator.Simulator.run_round`):

1. refresh the node map: nodes that appeared are asked their partition id
   (message type ``query``), nodes that left are forgotten;
2. sample clients by partition id with
   :func:`spafl.seeding.sample_clients` (seed, round, N, K): the same clients
   as in-process; a sampled partition with no connected node is skipped and
   listed in the row's ``unavailable``;
3. send ``algorithm.server_message`` to each sampled node (``train``), wait
   up to ``round-timeout`` seconds, validate every reply
   (:func:`collect_replies`: sender, partition, tensor names/shapes/dtypes,
   finiteness via ``algorithm.validate_reply``) and aggregate the valid ones
   with ``algorithm.aggregate``;
4. send ``algorithm.broadcast_message`` to every node when the variant has
   one (``train.broadcast``);
5. every ``eval_every`` rounds and at the last one, ask every node to
   evaluate ``algorithm.evaluation_state(client, server)`` on its own test
   split (``evaluate``) and combine the counts with
   :func:`spafl.metrics.summarize`;
6. append the metrics row (the simulator's fields plus ``rejected``,
   ``missing``, ``unavailable``, ``resumed_from_disk``) to ``metrics.jsonl``.

Bits are counted on the messages built and received: ``message_bits`` of
every message sent down (train and broadcast) and of every reply's
``ArrayRecord`` that came back (numel x dtype bits from its metadata), so
they equal the in-process figures when every node answers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from spafl.algorithms import ALGORITHMS, Algorithm, ModelSpec, Reply, State
from spafl.config import Config
from spafl.engine.federation import model_spec
from spafl.engine.rundir import (
    CONFIG,
    METRICS,
    SUMMARY,
    read_metrics,
    write_json_atomic,
)
from spafl.engine.simulator import metrics_row, summarize_run
from spafl.errors import UserError
from spafl.flower import records as rec
from spafl.metrics import message_bits, summarize
from spafl.models import input_shape_for
from spafl.seeding import sample_clients

#: Classes of the built-in datasets: the server builds the model without loading any data.
DATASET_CLASSES = {"fmnist": 10, "cifar10": 10, "cifar100": 100, "synthetic": 10}
SERVER_STATE_FILE = "server.pt"


def server_spec(config: Config) -> ModelSpec:
    """The model spec from the config alone (the server holds no data); nodes confirm shape and classes."""
    if config.dataset not in DATASET_CLASSES:
        raise UserError(f"the Flower app does not know how many classes dataset {config.dataset!r} has")
    shape_only = SimpleNamespace(image_shape=input_shape_for(config.model), num_classes=DATASET_CLASSES[config.dataset])
    return model_spec(config, shape_only)


# -- validating replies -------------------------------------------------------------
@dataclass
class Collected:
    """The outcome of one train exchange, as the server sees it."""

    replies: list[Reply] = field(default_factory=list)  # valid, ordered by client id
    rejected: list[tuple[int | None, str]] = field(default_factory=list)  # (partition, why)
    failed: list[tuple[int | None, str]] = field(default_factory=list)  # error replies (ClientApp raised, node lost)
    answered: set[int] = field(default_factory=set)  # partitions that sent a reply with content
    losses: list[float] = field(default_factory=list)  # train loss of valid replies that trained
    flops: float = 0.0
    bits_up: int = 0  # ArrayRecord payload of every reply with content, valid or not
    resumed: list[int] = field(default_factory=list)  # partitions that loaded their state from disk


def collect_replies(
    algorithm: Algorithm,
    server: State,
    replies: Iterable[Message],
    partitions: Mapping[int, int],
    round_number: int | None = None,
) -> Collected:
    """Check every train reply and keep the acceptable ones.

    ``partitions`` maps the node ids the messages went to onto the partition
    ids they were meant for. A reply is rejected (with the reason logged) when
    it comes from an unexpected node, duplicates an earlier one, claims
    another partition, lacks its records, cannot be converted, fails
    ``algorithm.validate_reply`` (names, shapes, dtypes, non-finite values),
    or reports a non-finite training loss. Error replies (the ClientApp raised,
    the node went away) are listed in ``failed``.
    """
    out = Collected()
    where = f"round {round_number}: " if round_number is not None else ""
    accepted: dict[int, tuple[Reply, float | None, float]] = {}
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        partition = partitions.get(node_id)
        if reply.has_error():
            reason = f"error reply (code {reply.error.code}): {reply.error.reason}"
            out.failed.append((partition, reason))
            log(WARNING, "spafl: %snode %s (partition %s) failed: %s", where, node_id, partition, reason)
            continue

        def reject(why: str, partition: int | None = partition, node_id: int = node_id) -> None:
            out.rejected.append((partition, why))
            log(WARNING, "spafl: %sreply of node %s (partition %s) rejected: %s", where, node_id, partition, why)

        content = reply.content
        if rec.ARRAYS in content.array_records:
            out.bits_up += rec.record_bits(content.array_records[rec.ARRAYS])
        if partition is None:
            reject("it comes from a node that was not sent a message this round")
            continue
        if partition in out.answered:
            reject("a second reply for the same partition")
            continue
        out.answered.add(partition)
        if rec.ARRAYS not in content.array_records or rec.METRICS not in content.metric_records:
            reject(f"records {sorted(content.keys())} lack {rec.ARRAYS!r} (ArrayRecord) or {rec.METRICS!r} (MetricRecord)")
            continue
        metrics = content.metric_records[rec.METRICS]
        try:
            claimed = int(metrics[rec.PARTITION_ID]) if rec.PARTITION_ID in metrics else None
            resumed = int(metrics.get("resumed_from_disk", 0))
            steps = int(metrics.get("steps", 0))
            num_samples = int(metrics.get("num_samples", 0))
            loss = float(metrics.get("train_loss", math.nan))
            flops = float(metrics.get("flops", 0.0))
        except (TypeError, ValueError) as error:
            reject(f"metrics cannot be read ({error})")
            continue
        if resumed:
            out.resumed.append(partition)
        if claimed != partition:
            reject(f"it says partition {claimed}, the message was for partition {partition}")
            continue
        if num_samples < 0 or steps < 0 or not math.isfinite(flops):
            reject(f"implausible statistics (num_samples {num_samples}, steps {steps}, flops {flops})")
            continue
        try:
            message = rec.from_array_record(content.array_records[rec.ARRAYS])
            candidate = Reply(partition, message, num_samples)
            why = algorithm.validate_reply(server, candidate)
        except Exception as error:  # noqa: BLE001 - malformed arrays from a node must not stop the server
            reject(f"arrays cannot be read or checked ({type(error).__name__}: {error})")
            continue
        if why is not None:
            reject(why)
            continue
        if steps and not math.isfinite(loss):
            reject(f"training loss is {loss} (the client diverged)")
            continue
        accepted[partition] = (candidate, loss if steps else None, flops)
    for partition in sorted(accepted):  # the in-process order: sampled clients are sorted
        candidate, loss, flops = accepted[partition]
        out.replies.append(candidate)
        if loss is not None:
            out.losses.append(loss)
        out.flops += flops
    return out


@dataclass
class _Round:
    """What one round did, for its metrics row."""

    index: int
    sampled: list[int] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)  # node id -> partition of the train messages
    unavailable: list[int] = field(default_factory=list)
    bits_down: int = 0
    collected: Collected = field(default_factory=Collected)
    resumed: set[int] = field(default_factory=set)


class SpaFLStrategy(Strategy):
    """Runs a spafl experiment over a Flower Grid; the algorithm is ``ALGORITHMS[config.method]``.

    ``start`` runs the whole experiment (node discovery, every round,
    broadcasts, evaluation, the run directory); the ``configure_*`` /
    ``aggregate_*`` methods are its steps and can be called on their own.
    """

    def __init__(
        self,
        config: Config,
        *,
        out_dir: str | Path,
        round_timeout: float = 120.0,
        preset: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        run_id: int | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        self.config = config
        self.spec = server_spec(config)
        self.algorithm: Algorithm = ALGORITHMS[config.method](config, self.spec)
        self.out_dir = Path(out_dir)
        self.round_timeout = float(round_timeout)
        self.preset = preset
        self.run_config = dict(run_config or {})
        self.run_id = run_id
        self.poll_interval = poll_interval
        self.server: State = self.algorithm.init_server(self.spec.initial_state(config.seed))
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.silent: set[int] = set()  # nodes that did not answer the query; not asked again
        self.data_info: dict[str, Any] | None = None
        self.bits_cum = 0
        self.flops_cum = 0.0
        self.last_eval: dict[str, Any] | None = None
        self._round = _Round(index=-1)
        self._eval_sent: dict[int, int] = {}

    # -- nodes ---------------------------------------------------------------------
    def node_of(self, partition: int) -> int | None:
        """The node id holding ``partition`` (the most recently discovered one), or None."""
        for node_id, k in reversed(list(self.partition_of.items())):
            if k == partition:
                return node_id
        return None

    def _message(self, content: RecordDict, node_id: int, message_type: str, server_round: int) -> Message:
        return Message(content, dst_node_id=node_id, message_type=message_type, ttl=self.round_timeout, group_id=str(server_round))

    def exchange(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and collect replies until all are in or ``round_timeout`` has passed."""
        if not messages:
            return []
        pending = {str(i) for i in grid.push_messages(messages) if i}
        deadline = time.monotonic() + self.round_timeout
        replies: list[Message] = []
        while pending:
            got = list(grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        if pending:
            log(WARNING, "spafl: %d of %d messages got no reply within %.0f s", len(pending), len(messages), self.round_timeout)
        return replies

    def discover(self, grid: Grid, wait: bool = False, server_round: int = 0) -> set[int]:
        """Update the node-id -> partition-id map; returns the partitions that resumed from disk.

        With ``wait``, first wait (up to ``round_timeout``) until ``num_clients``
        nodes are connected. New nodes get a ``query`` message; nodes no longer
        connected are dropped from the map.
        """
        deadline = time.monotonic() + (self.round_timeout if wait else 0.0)
        while True:
            connected = {int(n) for n in grid.get_node_ids()}
            if not wait or len(connected) >= self.config.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, self.poll_interval * 5))
        if wait and len(connected) < self.config.num_clients:
            log(WARNING, "spafl: only %d of %d nodes connected after %.0f s; going on with them",
                len(connected), self.config.num_clients, self.round_timeout)
        for node_id in [n for n in self.partition_of if n not in connected]:
            log(WARNING, "spafl: node %s (partition %d) is no longer connected", node_id, self.partition_of.pop(node_id))
        self.silent &= connected
        new = sorted(connected - set(self.partition_of) - self.silent)
        resumed: set[int] = set()
        if not new:
            return resumed
        messages = [self._message(RecordDict({rec.CONFIG: ConfigRecord({"round": server_round})}), n, rec.QUERY, server_round) for n in new]
        answered: set[int] = set()
        for reply in self.exchange(grid, messages):
            node_id = int(reply.metadata.src_node_id)
            answered.add(node_id)
            if reply.has_error():
                log(WARNING, "spafl: node %s failed the query: %s", node_id, reply.error.reason)
                self.silent.add(node_id)
                continue
            metrics = reply.content.metric_records.get(rec.METRICS)
            if metrics is None or rec.PARTITION_ID not in metrics:
                log(WARNING, "spafl: node %s answered the query without a partition id; ignored", node_id)
                self.silent.add(node_id)
                continue
            partition = int(metrics[rec.PARTITION_ID])
            if not 0 <= partition < self.config.num_clients:
                log(WARNING, "spafl: node %s holds partition %d, outside 0..%d; ignored", node_id, partition, self.config.num_clients - 1)
                self.silent.add(node_id)
                continue
            self._check_data(node_id, reply.content.config_records.get(rec.INFO))
            previous = self.node_of(partition)
            if previous is not None:
                log(WARNING, "spafl: partition %d is now held by node %s (was node %s)", partition, node_id, previous)
                self.partition_of.pop(previous)
            self.partition_of[node_id] = partition
            if int(metrics.get("resumed_from_disk", 0)):
                resumed.add(partition)
                log(INFO, "spafl: partition %d (node %s) resumed its client state from disk", partition, node_id)
        for node_id in set(new) - answered:
            log(WARNING, "spafl: node %s did not answer the query within %.0f s", node_id, self.round_timeout)
            self.silent.add(node_id)
        log(INFO, "spafl: %d of %d partitions have a node", len(set(self.partition_of.values())), self.config.num_clients)
        return resumed

    def _check_data(self, node_id: int, info: ConfigRecord | None) -> None:
        if info is None:
            return
        shape = tuple(int(s) for s in info.get("image_shape", []))
        classes = int(info.get("num_classes", self.spec.num_classes))
        if shape and (shape != tuple(self.spec.input_shape) or classes != self.spec.num_classes):
            raise UserError(
                f"node {node_id} has data of shape {shape} with {classes} classes; the server's model "
                f"{self.config.model} expects {tuple(self.spec.input_shape)} with {self.spec.num_classes}"
            )
        if self.data_info is None:
            self.data_info = {"source": str(info.get("data_source", "")), "checksums": json.loads(str(info.get("data_checksums", "{}")))}

    # -- the Strategy interface ------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Messages of round ``server_round`` (1-based) for the sampled partitions that have a node.

        ``arrays`` is not used: each message is ``algorithm.server_message`` of
        the strategy's server state.
        """
        round_index = server_round - 1
        state = _Round(index=round_index)
        state.sampled = sample_clients(self.config.seed, round_index, self.config.num_clients, self.config.clients_per_round)
        messages = []
        for k in state.sampled:
            node_id = self.node_of(k)
            if node_id is None:
                state.unavailable.append(k)
                continue
            down = self.algorithm.server_message(self.server, k, round_index)
            state.bits_down += message_bits(down)
            content = RecordDict({rec.ARRAYS: rec.to_array_record(down), rec.CONFIG: ConfigRecord({"round": round_index, rec.PARTITION_ID: k})})
            messages.append(self._message(content, node_id, rec.TRAIN, server_round))
            state.sent[node_id] = k
        if state.unavailable:
            log(WARNING, "spafl: round %d: sampled partitions %s have no connected node; skipped", server_round, state.unavailable)
        self._round = state
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate the valid ones into the server state; returns it and the round's train metrics."""
        state = self._round
        collected = collect_replies(self.algorithm, self.server, replies, state.sent, server_round)
        state.collected = collected
        state.resumed.update(collected.resumed)
        self.server = self.algorithm.aggregate(self.server, collected.replies, state.index)
        metrics = {
            "replies": len(collected.replies), "rejected": len(collected.rejected),
            "missing": len(state.sent) - len(collected.answered), "flops": collected.flops,
            "bits_up": collected.bits_up, "bits_down": state.bits_down,
        }
        if collected.losses:
            metrics["train_loss"] = float(np.mean(collected.losses))
        return rec.to_array_record(rec.flatten_state(self.server)), rec.metric_record(metrics)

    def configure_broadcast(self, server_round: int) -> list[Message]:
        """``algorithm.broadcast_message``, the same message to every partition with a node (none for most variants)."""
        round_index = server_round - 1
        broadcast = self.algorithm.broadcast_message(self.server, round_index)
        if broadcast is None:
            return []
        bits = message_bits(broadcast)
        messages = []
        for k in range(self.config.num_clients):
            node_id = self.node_of(k)
            if node_id is None:
                log(WARNING, "spafl: round %d: partition %d has no node; its broadcast is not sent", server_round, k)
                continue
            self._round.bits_down += bits
            content = RecordDict({rec.ARRAYS: rec.to_array_record(broadcast), rec.CONFIG: ConfigRecord({"round": round_index, rec.PARTITION_ID: k})})
            messages.append(self._message(content, node_id, rec.BROADCAST, server_round))
        return messages

    def check_broadcast_replies(self, server_round: int, messages: list[Message], replies: Iterable[Message]) -> None:
        received = 0
        for reply in replies:
            if reply.has_error():
                log(WARNING, "spafl: round %d: node %s failed to apply the broadcast: %s", server_round, reply.metadata.src_node_id, reply.error.reason)
                continue
            received += 1
            metrics = reply.content.metric_records.get(rec.METRICS)
            if metrics is not None and int(metrics.get("resumed_from_disk", 0)):
                self._round.resumed.add(int(metrics[rec.PARTITION_ID]))
        if received < len(messages):
            log(WARNING, "spafl: round %d: %d of %d nodes acknowledged the broadcast", server_round, received, len(messages))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """An ``evaluate`` message to every node, carrying the server state (flattened)."""
        flat = rec.flatten_state(self.server)
        messages = []
        self._eval_sent = {}
        for node_id, k in sorted(self.partition_of.items(), key=lambda item: item[1]):
            content = RecordDict({rec.SERVER_STATE: rec.to_array_record(flat), rec.CONFIG: ConfigRecord({"round": server_round, rec.PARTITION_ID: k})})
            messages.append(self._message(content, node_id, rec.EVALUATE, server_round))
            self._eval_sent[node_id] = k
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Combine the nodes' evaluation counts with :func:`spafl.metrics.summarize` (None: no usable reply)."""
        evaluations = {}
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            partition = self._eval_sent.get(node_id)
            if reply.has_error():
                log(WARNING, "spafl: round %d: node %s (partition %s) failed to evaluate: %s", server_round, node_id, partition, reply.error.reason)
                continue
            metrics = reply.content.metric_records.get(rec.METRICS)
            if partition is None or metrics is None or int(metrics.get(rec.PARTITION_ID, -1)) != partition or partition in evaluations:
                log(WARNING, "spafl: round %d: evaluation reply of node %s ignored (unexpected sender, partition or records)", server_round, node_id)
                continue
            try:
                evaluations[partition] = rec.eval_from_metrics(metrics)
            except (ValueError, TypeError) as error:
                log(WARNING, "spafl: round %d: evaluation reply of partition %d ignored: %s", server_round, partition, error)
                continue
            if int(metrics.get("resumed_from_disk", 0)):
                self._round.resumed.add(partition)
        missing = sorted(set(self._eval_sent.values()) - set(evaluations))
        if missing:
            log(WARNING, "spafl: round %d: no evaluation from partitions %s", server_round, missing)
        try:
            summary = summarize([evaluations[k] for k in sorted(evaluations)])
        except ValueError as error:
            log(WARNING, "spafl: round %d: evaluation unusable: %s", server_round, error)
            return None
        self.last_eval = summary
        return rec.metric_record(summary)

    def summary(self) -> None:
        c = self.config
        log(INFO, "spafl: %s on %s/%s, %d clients, %d per round, %d rounds, round timeout %.0f s, run directory %s",
            c.method, c.dataset, c.model, c.num_clients, c.clients_per_round, c.rounds, self.round_timeout, self.out_dir)

    # -- the run ---------------------------------------------------------------------
    def _write_config(self) -> None:
        from flwr import __version__ as flwr_version

        from spafl.provenance import provenance

        info = self.data_info or {"source": "unknown (no node reported)", "checksums": {}}
        threads = torch.get_num_threads()
        write_json_atomic(self.out_dir / CONFIG, {
            "preset": self.preset,
            "config": self.config.to_dict(),
            "provenance": provenance(threads, info["checksums"], info["source"]),
            "engine": {"name": "flower", "flwr_version": flwr_version, "run_id": self.run_id, "run_config": self.run_config,
                       "round_timeout": self.round_timeout},
        })

    def save_server_state(self, round_number: int) -> Path:
        """``server.pt``: the server state after ``round_number`` (atomic; the clients keep theirs)."""
        path = self.out_dir / SERVER_STATE_FILE
        rec.write_bytes_atomic(path, rec.encode_state({
            "format": 1, "round": round_number, "server": self.server, "bits_cum": self.bits_cum, "flops_cum": self.flops_cum,
            "last_eval": self.last_eval, "config": self.config.to_dict(),
            "partitions": {int(node): int(k) for node, k in self.partition_of.items()},
        }))
        return path

    def _evaluate(self, grid: Grid, server_round: int) -> MetricRecord | None:
        messages = self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
        return self.aggregate_evaluate(server_round, self.exchange(grid, messages))

    def _row(self, base: dict[str, Any], evaluated: bool, seconds: float) -> dict[str, Any]:
        return metrics_row(base, self.last_eval, evaluated, seconds)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run the experiment: ``config.rounds`` rounds (or ``num_rounds``) into ``out_dir``.

        ``initial_arrays``, ``train_config``, ``evaluate_config`` and
        ``evaluate_fn`` of the base class are not used: the initial model
        derives from the seed, messages come from the algorithm, evaluation
        is on the clients. ``timeout`` replaces ``round_timeout``.
        """
        if timeout is not None:
            self.round_timeout = float(timeout)
        rounds = int(num_rounds) if num_rounds is not None else self.config.rounds
        if (self.out_dir / CONFIG).exists():
            raise UserError(f"{self.out_dir} already holds a run; choose another out-dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.summary()
        result = Result()
        began = time.perf_counter()
        resumed = self.discover(grid, wait=True, server_round=0)
        self._write_config()
        metrics_path = self.out_dir / METRICS
        metrics_path.write_text("")
        with open(metrics_path, "a") as metrics_file:
            def emit(row: dict[str, Any]) -> None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()

            self._round = _Round(index=-1, resumed=set(resumed))
            evaluation = self._evaluate(grid, 0)
            if evaluation is not None:
                result.evaluate_metrics_clientapp[0] = evaluation
            base = {"round": 0, "sampled": [], "replies": 0, "train_loss": None, "bits_up": 0, "bits_down": 0, "bits_cum": 0, "flops_cum": 0.0,
                    "rejected": 0, "missing": 0, "unavailable": [], "resumed_from_disk": sorted(self._round.resumed)}
            emit(self._row(base, evaluation is not None, time.perf_counter() - began))
            for round_index in range(rounds):
                number = round_index + 1
                began = time.perf_counter()
                resumed = self.discover(grid, server_round=number)
                replies = self.exchange(grid, self.configure_train(number, ArrayRecord(), ConfigRecord(), grid))
                self._round.resumed.update(resumed)
                arrays, train_metrics = self.aggregate_train(number, replies)
                broadcasts = self.configure_broadcast(number)
                if broadcasts:
                    self.check_broadcast_replies(number, broadcasts, self.exchange(grid, broadcasts))
                state = self._round
                collected = state.collected
                bits_up = collected.bits_up
                self.bits_cum += bits_up + state.bits_down
                self.flops_cum += collected.flops / self.config.num_clients
                result.arrays = arrays
                result.train_metrics_clientapp[number] = train_metrics
                evaluate = number % self.config.eval_every == 0 or number == rounds
                evaluated = False
                if evaluate:
                    evaluation = self._evaluate(grid, number)
                    evaluated = evaluation is not None
                    if evaluated:
                        result.evaluate_metrics_clientapp[number] = evaluation
                base = {
                    "round": number,
                    "sampled": state.sampled,
                    "replies": len(collected.replies),
                    "train_loss": float(np.mean(collected.losses)) if collected.losses else None,
                    "bits_up": bits_up,
                    "bits_down": state.bits_down,
                    "bits_cum": self.bits_cum,
                    "flops_cum": self.flops_cum,
                    "rejected": len(collected.rejected),
                    "missing": len(state.sent) - len(collected.answered),
                    "unavailable": state.unavailable,
                    "resumed_from_disk": sorted(state.resumed),
                }
                row = self._row(base, evaluated, time.perf_counter() - began)
                emit(row)
                if number % self.config.checkpoint_every == 0 or number == rounds:
                    self.save_server_state(number)
                log(INFO, "spafl: round %d/%d: %d valid replies (%d rejected, %d missing), accuracy %s, density %s, %.6f Gbit so far",
                    number, rounds, row["replies"], row["rejected"], row["missing"],
                    _fmt(row["accuracy"]), _fmt(row["density"], 3), self.bits_cum / 1e9)
        rows = read_metrics(metrics_path)
        if any(r["evaluated"] for r in rows):
            write_json_atomic(self.out_dir / SUMMARY, summarize_run(rows))
        else:
            log(WARNING, "spafl: no round was evaluated; %s not written", SUMMARY)
        if rounds == 0:
            self.save_server_state(0)
        result.arrays = rec.to_array_record(rec.flatten_state(self.server))
        return result


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
