"""The round's messages over a Flower Grid: the Flower :class:`~spafl.runtime.round.Transport`.

Each SuperNode holds one partition (one client). What this transport does
beyond moving messages:

* **discovery**: a node seen for the first time is asked its partition id
  (message type ``query``); a node that left is forgotten. A partition held
  by a live node is not handed to another node that claims it;
* **reading replies**: a train reply is attributed to the partition its
  message went to; replies from unexpected nodes, second replies, claims of
  another partition, missing records or unreadable numbers and arrays are
  rejected here (the round validates the rest);
* **broadcasts**: every broadcast is logged; each node says in every reply
  which broadcast it applied last, and a node that missed some (absent,
  restarted from an older file) receives them, in round order, before its
  next training or evaluation, as the simulator's store replays them;
* **resume**: ``server.pt`` holds the run state after every round, with the
  broadcast log and the node map; nodes keep their state of the round
  before as well, and roll back to it when the server resumes from a
  checkpoint older than their newest state;
* **wire bytes**: beside the payload bits the round counts, the bytes of
  every ArrayRecord as Flower serializes it are summed per direction.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from spafl.algorithms import Algorithm, ModelSpec, State
from spafl.config import Config
from spafl.errors import UserError
from spafl.flower import records as rec
from spafl.flower.replies import number as _number
from spafl.flower.replies import read_replies
from spafl.metrics import summarize
from spafl.metrics.bits import message_bits
from spafl.runtime.record import write_bytes_atomic
from spafl.runtime.round import Exchange, RunState, Transport, run_state_of

SERVER_STATE_FILE = "server.pt"
SERVER_STATE_FORMAT = 2


class GridTransport(Transport):
    """Moves a round's messages over a Flower Grid; the nodes keep the client states."""

    strict = False
    row_fields = ("rejected", "missing", "unavailable", "resumed_from_disk", "wire_bytes_up", "wire_bytes_down")
    checkpoint_each_round = True

    def __init__(self, config: Config, algorithm: Algorithm, spec: ModelSpec, out_dir: Path, round_timeout: float, poll_interval: float) -> None:
        self.config = config
        self.algorithm = algorithm
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.round_timeout = round_timeout
        self.poll_interval = poll_interval
        self.grid: Any = None
        self.run_token = secrets.token_hex(8)  # the spafl run nodes' states belong to (kept across a server restart)
        self.resumed_at: list[int] = []  # the round each resume of this run started from (nodes drop states written after it)
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.silent: set[int] = set()  # nodes that did not answer the query; not asked again
        self.unresponsive: set[int] = set()  # nodes whose last message got no reply, or an error
        self.sizes: dict[int, int] = {}  # partition -> training samples its node reported when it connected
        self.data_info: dict[str, Any] | None = None
        self.broadcasts: dict[int, dict] = {}  # round index -> message, every broadcast not yet applied by every partition
        self.applied: dict[int, int] = {}  # partition -> round index of the last broadcast its node applied
        self.resumed: set[int] = set()
        self.extra_bits_down = 0
        self.wire_up = self.wire_down = 0

    # -- nodes -------------------------------------------------------------------------
    def node_of(self, partition: int) -> int | None:
        for node_id, k in self.partition_of.items():
            if k == partition:
                return node_id
        return None

    def message(self, content: RecordDict, node_id: int, message_type: str, round_number: int) -> Message:
        return Message(content, dst_node_id=node_id, message_type=message_type, ttl=self.round_timeout, group_id=str(round_number))

    def _config_record(self, round_index: int, partition: int | None = None) -> ConfigRecord:
        """What every message says: its round, the partition it is for, the run and its resumes."""
        values: dict[str, Any] = {"round": round_index, rec.RUN_TOKEN: self.run_token, rec.RESUMED_AT: rec.format_rounds(self.resumed_at)}
        if partition is not None:
            values[rec.PARTITION_ID] = partition
        return ConfigRecord(values)

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and collect replies until all are in or ``round_timeout`` has passed."""
        if not messages:
            return []
        measured: dict[int, int] = {}  # an evaluation's one server-state record goes to every node: measure it once
        for message in messages:
            for record in message.content.array_records.values():
                if id(record) not in measured:
                    measured[id(record)] = rec.wire_bytes(record)
                self.wire_down += measured[id(record)]
        pending = {str(i) for i in self.grid.push_messages(messages) if i}
        deadline = time.monotonic() + self.round_timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        if pending:
            log(WARNING, "spafl: %d of %d messages got no reply within %.0f s", len(pending), len(messages), self.round_timeout)
        answered = set()
        for reply in replies:
            if not reply.has_error():
                answered.add(int(reply.metadata.src_node_id))
                self.wire_up += sum(rec.wire_bytes(record) for record in reply.content.array_records.values())
                self._note_applied(reply)
        addressed = {int(message.metadata.dst_node_id) for message in messages}
        self.unresponsive = (self.unresponsive - answered) | (addressed - answered)
        return replies

    def _note_applied(self, reply: Message) -> None:
        """What a node says in every reply: the last broadcast it applied, and whether it resumed from disk."""
        metrics = reply.content.metric_records.get(rec.METRICS)
        node_partition = self.partition_of.get(int(reply.metadata.src_node_id))
        if metrics is None or node_partition is None:
            return
        try:
            applied = _number(metrics, rec.LAST_BROADCAST, -1, integral=True)
            resumed = _number(metrics, "resumed_from_disk", 0, integral=True)
        except (TypeError, ValueError, OverflowError):
            return
        self.applied[node_partition] = applied
        if resumed:
            self.resumed.add(node_partition)

    def discover(self, wait: bool = False, round_index: int = 0) -> None:
        """Update the node-id -> partition-id map.

        With ``wait``, first wait (up to ``round_timeout``) until ``num_clients``
        nodes are connected. New nodes get a ``query`` message; nodes no longer
        connected are dropped from the map. A node claiming a partition that a
        connected node already holds is ignored.
        """
        deadline = time.monotonic() + (self.round_timeout if wait else 0.0)
        while True:
            connected = {int(n) for n in self.grid.get_node_ids()}
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
        if not new:
            return
        content = RecordDict({rec.CONFIG: self._config_record(round_index)})
        replies = self.exchange([self.message(content, n, rec.QUERY, round_index + 1) for n in new])
        answered: set[int] = set()
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            answered.add(node_id)
            partition = self._query_partition(reply)
            if partition is None:
                self.silent.add(node_id)
                continue
            if partition < 0:  # claims a partition a responsive node holds: asked again next round
                continue
            self.partition_of[node_id] = partition
            size = self._reported_size(reply)
            if size is not None:
                self.sizes[partition] = size
            self._note_applied(reply)
        for node_id in set(new) - answered:
            log(WARNING, "spafl: node %s did not answer the query within %.0f s", node_id, self.round_timeout)
            self.silent.add(node_id)
        log(INFO, "spafl: %d of %d partitions have a node", len(set(self.partition_of.values())), self.config.num_clients)

    @staticmethod
    def _reported_size(reply: Message) -> int | None:
        """The training samples a node says its partition holds (None: it did not say)."""
        metrics = reply.content.metric_records.get(rec.METRICS) or {}
        try:
            return _number(metrics, "num_train", 0, integral=True) if "num_train" in metrics else None
        except (TypeError, ValueError, OverflowError):
            return None

    def _query_partition(self, reply: Message) -> int | None:
        """The partition a query reply claims, if the node may hold it (None: ignore the node; -1: not now)."""
        node_id = int(reply.metadata.src_node_id)
        if reply.has_error():
            log(WARNING, "spafl: node %s failed the query: %s", node_id, reply.error.reason)
            return None
        metrics = reply.content.metric_records.get(rec.METRICS)
        try:
            partition = _number(metrics or {}, rec.PARTITION_ID, -1, integral=True)
        except (TypeError, ValueError, OverflowError) as error:
            log(WARNING, "spafl: node %s answered the query with an unreadable partition id (%s); ignored", node_id, error)
            return None
        if not 0 <= partition < self.config.num_clients:
            log(WARNING, "spafl: node %s claims partition %d, outside 0..%d; ignored", node_id, partition, self.config.num_clients - 1)
            return None
        self._check_data(node_id, reply.content.config_records.get(rec.INFO))
        holder = self.node_of(partition)
        if holder is not None and holder not in self.unresponsive:
            log(WARNING, "spafl: node %s claims partition %d, which node %s holds and serves; not handed over", node_id, partition, holder)
            return -1
        if holder is not None:
            log(WARNING, "spafl: partition %d is now held by node %s (node %s did not answer its last message)", partition, node_id, holder)
            self.partition_of.pop(holder)
        return partition

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

    # -- missed broadcasts ---------------------------------------------------------------
    def _catch_up(self, content: RecordDict, partition: int, before: int, new: int | None = None) -> None:
        """Put into ``content`` the broadcasts of rounds < ``before`` that ``partition``'s node has not applied, and round ``new``'s.

        The missed ones are counted in :attr:`extra_bits_down`; round ``new``'s
        broadcast is counted by the round itself.
        """
        missed = [r for r in sorted(self.broadcasts) if self.applied.get(partition, -1) < r < before]
        if not missed and new is None:
            return
        rounds = missed + ([new] if new is not None else [])
        content[rec.BROADCASTS] = rec.to_array_record(rec.pack_rounds({r: self.broadcasts[r] for r in rounds}))
        self.extra_bits_down += sum(message_bits(self.broadcasts[r]) for r in missed)

    def _forget_delivered(self) -> None:
        """Drop the broadcasts every partition has applied."""
        oldest = min((self.applied.get(k, -1) for k in range(self.config.num_clients)), default=-1)
        for r in [r for r in self.broadcasts if r <= oldest]:
            del self.broadcasts[r]

    # -- the transport ---------------------------------------------------------------------
    def begin_round(self, round_index: int) -> None:
        self.resumed = set()
        self.wire_up = self.wire_down = 0
        self.discover(round_index=round_index)

    def reachable(self, client_id: int) -> bool:
        return self.node_of(client_id) is not None

    def train_messages(self, round_index: int, sends: list[tuple[int, dict]]) -> tuple[list[Message], dict[int, int]]:
        """The ``train`` messages for ``(client, message)`` pairs (with any broadcasts a node missed), and node id -> partition."""
        messages, sent = [], {}
        for client_id, down in sends:
            node_id = self.node_of(client_id)
            content = RecordDict({rec.ARRAYS: rec.to_array_record(down), rec.CONFIG: self._config_record(round_index, client_id)})
            self._catch_up(content, client_id, before=round_index)
            messages.append(self.message(content, node_id, rec.TRAIN, round_index + 1))
            sent[node_id] = client_id
        return messages, sent

    def read_train(self, replies: Iterable[Message], sent: Mapping[int, int], round_index: int) -> Exchange:
        read = read_replies(replies, sent, round_index + 1, self.sizes)
        read.exchange.missing = len(sent) - len(read.answered)
        read.exchange.bits_down += self.extra_bits_down
        self.extra_bits_down = 0
        return read.exchange

    def train(self, round_index, sends, server, evaluate_after) -> Exchange:
        messages, sent = self.train_messages(round_index, sends)
        return self.read_train(self.exchange(messages), sent, round_index)

    def broadcast(self, round_index: int, message: dict) -> int:
        """The same message to every partition with a node, with any broadcast it missed before."""
        self.broadcasts[round_index] = message
        messages = []
        for k in range(self.config.num_clients):
            node_id = self.node_of(k)
            if node_id is None:
                log(WARNING, "spafl: round %d: partition %d has no node; it receives this broadcast when it is back", round_index + 1, k)
                continue
            content = RecordDict({rec.CONFIG: self._config_record(round_index, k)})
            self._catch_up(content, k, before=round_index, new=round_index)
            messages.append(self.message(content, node_id, rec.BROADCAST, round_index + 1))
        acknowledged = sum(not reply.has_error() for reply in self.exchange(messages))
        if acknowledged < len(messages):
            log(WARNING, "spafl: round %d: %d of %d nodes acknowledged the broadcast", round_index + 1, acknowledged, len(messages))
        self._forget_delivered()
        return len(messages)

    def evaluate_messages(self, round_number: int, server: State) -> tuple[list[Message], dict[int, int]]:
        """An ``evaluate`` message to every node, carrying the server state (flattened); and node id -> partition."""
        flat = rec.to_array_record(rec.flatten_state(server))
        messages, sent = [], {}
        for node_id, k in sorted(self.partition_of.items(), key=lambda item: item[1]):
            content = RecordDict({rec.SERVER_STATE: flat, rec.CONFIG: self._config_record(round_number - 1, k)})
            self._catch_up(content, k, before=round_number)
            messages.append(self.message(content, node_id, rec.EVALUATE, round_number))
            sent[node_id] = k
        return messages, sent

    def read_evaluations(self, replies: Iterable[Message], sent: Mapping[int, int], round_number: int) -> dict[str, Any] | None:
        """The nodes' evaluation counts combined (:func:`spafl.metrics.summarize`); None: no usable reply."""
        evaluations = {}
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            partition = sent.get(node_id)
            if reply.has_error():
                log(WARNING, "spafl: round %d: node %s (partition %s) failed to evaluate: %s", round_number, node_id, partition, reply.error.reason)
                continue
            metrics = reply.content.metric_records.get(rec.METRICS)
            try:
                claimed = _number(metrics or {}, rec.PARTITION_ID, -1, integral=True)
                if partition is None or claimed != partition or partition in evaluations:
                    raise ValueError("unexpected sender, partition or records")
                evaluations[partition] = rec.eval_from_metrics(metrics)
            except (ValueError, TypeError, OverflowError) as error:
                log(WARNING, "spafl: round %d: evaluation reply of node %s ignored: %s", round_number, node_id, error)
        missing = sorted(set(sent.values()) - set(evaluations))
        if missing:
            log(WARNING, "spafl: round %d: no evaluation from partitions %s", round_number, missing)
        try:
            return summarize([evaluations[k] for k in sorted(evaluations)])
        except (ValueError, UserError) as error:  # no reply, or none with test data: the row carries the last figures
            log(WARNING, "spafl: round %d: evaluation unusable: %s", round_number, error)
            return None

    def evaluate(self, round_number: int, server: State) -> dict[str, Any] | None:
        messages, sent = self.evaluate_messages(round_number, server)
        return self.read_evaluations(self.exchange(messages), sent, round_number)

    def late_bits_down(self) -> int:
        bits, self.extra_bits_down = self.extra_bits_down, 0
        return bits

    def round_facts(self) -> dict[str, Any]:
        return {"resumed_from_disk": sorted(self.resumed), "wire_bytes_up": self.wire_up, "wire_bytes_down": self.wire_down}

    def after_row(self, round_number: int, row: dict[str, Any]) -> None:
        def fmt(value: Any, digits: int = 2) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        if round_number > 0:
            log(INFO, "spafl: round %d/%d: %d valid replies (%d rejected, %d missing), accuracy %s, density %s, %.6f Gbit so far",
                round_number, self.config.rounds, row["replies"], row["rejected"], row["missing"],
                fmt(row["accuracy"]), fmt(row["density"], 3), row["bits_cum"] / 1e9)

    # -- checkpoints ---------------------------------------------------------------------
    def fresh(self, state: RunState, initial_model: dict) -> None:
        self.resumed = set()
        self.wire_up = self.wire_down = 0

    def save(self, state: RunState) -> None:
        """``server.pt``: the run state, the broadcast log and the node map (atomic; the nodes keep the client states)."""
        write_bytes_atomic(self.out_dir / SERVER_STATE_FILE, rec.encode_state({
            "format": SERVER_STATE_FORMAT, **state, "config": self.config.to_dict(), "run_token": self.run_token,
            "broadcasts": dict(self.broadcasts), "applied": dict(self.applied), "resumed_at": list(self.resumed_at),
        }))

    def prepare_resume(self) -> None:
        """Read ``server.pt`` before the nodes are queried: they need the run's token and its resumes to find their state."""
        path = self.out_dir / SERVER_STATE_FILE
        if not path.exists():
            raise UserError(f"{self.out_dir} holds no {SERVER_STATE_FILE} to resume from; start without resume")
        try:
            saved = rec.decode_state(path.read_bytes())
            if saved.get("format") != SERVER_STATE_FORMAT:
                raise ValueError(f"format {saved.get('format')}, expected {SERVER_STATE_FORMAT}")
        except Exception as error:  # noqa: BLE001 - any unreadable file: say so
            raise UserError(f"{path} is unreadable or not a spafl server state ({type(error).__name__}: {error}); start a new run") from None
        if saved["config"] != self.config.to_dict():
            changed = sorted(k for k, v in self.config.to_dict().items() if saved["config"].get(k) != v)
            raise UserError(f"{path} belongs to a run with other settings ({', '.join(changed)}); resume with the same config")
        self.run_token = saved["run_token"]
        self.broadcasts = {int(r): m for r, m in saved["broadcasts"].items()}
        self.applied = {int(k): int(r) for k, r in saved["applied"].items()}
        self.resumed_at = [*saved["resumed_at"], int(saved["round"])]
        self._saved = run_state_of(saved)
        log(INFO, "spafl: resuming after round %d from %s", saved["round"], path)

    def load(self) -> RunState | None:
        """The state :meth:`prepare_resume` read."""
        return getattr(self, "_saved", None)
