"""The Flower App: same results as the in-process simulator, reply validation, conversions, node loss and restart.

Everything runs in-process or on loopback: one Flower simulation
(``run_simulation``, Ray backend, 4 virtual SuperNodes) and a few runs of the
strategy over a small in-memory Grid defined here.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning; no GPU is used

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from spafl.algorithms import SpaFL
from spafl.engine import Simulator
from spafl.engine.checkpoint import load_checkpoint
from spafl.runtime.record import read_metrics
from spafl.flower import records as rec
from spafl.flower.client_app import make_client_app, state_path
from spafl.flower.strategy import SERVER_STATE_FILE, SpaFLStrategy, read_replies, server_spec
from spafl.errors import UserError
from spafl.metrics import ClientEval, message_bits
from spafl.seeding import sample_clients

PRESET = "fmnist-quick"
SET = "dataset=synthetic; num_clients=4; clients_per_round=2; rounds=3; local_epochs=1; threads=1"


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Flower 1.41 stamps every new Message with the process's task identity, which only a Flower
    runtime sets; the tests below build messages outside one, so give this process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    if TaskIdentity._run_id is None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_config(out_dir: Path, extra: str = "", timeout: float = 60.0) -> dict:
    return {"preset": PRESET, "set": SET + (f"; {extra}" if extra else ""), "out-dir": str(out_dir), "round-timeout": timeout}


def spafl_config(extra: str = ""):
    return rec.RunSettings.from_run_config(run_config(Path("unused"), extra)).config()


def server_thresholds(run_dir: Path) -> dict[str, torch.Tensor]:
    return rec.decode_state((run_dir / SERVER_STATE_FILE).read_bytes())["server"]["thresholds"]


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory) -> Path:
    """The reference: the in-process simulator with the same config."""
    run_dir = tmp_path_factory.mktemp("inprocess")
    Simulator(spafl_config(), run_dir, progress=False).run()
    return run_dir


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory) -> tuple[Path, Path]:
    """A Flower simulation: ServerApp + ClientApp, 4 virtual SuperNodes (Ray backend), 3 rounds."""
    from flwr.simulation import run_simulation

    from spafl.flower.server_app import make_server_app

    base = tmp_path_factory.mktemp("flower")
    run_dir, state_dir = base / "run", base / "state"
    config = run_config(run_dir)
    run_simulation(
        server_app=make_server_app(config),
        client_app=make_client_app(config, {rec.STATE_DIR: str(state_dir)}),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    return run_dir, state_dir


# -- the simulation equals the in-process run ------------------------------------------
def test_simulation_matches_inprocess(flower_run, inprocess):
    run_dir, state_dir = flower_run
    expected = load_checkpoint(inprocess)["server"]["thresholds"]
    got = server_thresholds(run_dir)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)

    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(inprocess / "metrics.jsonl")
    assert [r["round"] for r in ours] == [0, 1, 2, 3]
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine["bits_up"], mine["bits_down"], mine["bits_cum"]) == (ref["bits_up"], ref["bits_down"], ref["bits_cum"])
        for key, value in ref.items():  # every field the simulator writes, with the same value
            if key == "seconds":
                continue
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert mine[key] == value, key
        assert (mine["rejected"], mine["missing"], mine["unavailable"]) == (0, 0, [])
    assert ours[1]["bits_up"] == 2 * 580 * 32 and ours[1]["bits_down"] == 2 * 2 * 580 * 32  # tau_g and delta down

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bits_total"] == ours[-1]["bits_cum"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"] == spafl_config().to_dict() and saved["preset"] == PRESET
    assert saved["engine"]["name"] == "flower" and saved["provenance"]["data_source"]
    trained = {k for r in ours for k in r["sampled"]}
    assert sorted(p.name for p in state_dir.glob("client-*.pt")) == sorted(f"client-{k}.pt" for k in trained)


# -- reply validation ------------------------------------------------------------------------
def _instruction(node_id: int) -> Message:
    return Message(RecordDict({rec.CONFIG: ConfigRecord({"round": 0})}), dst_node_id=node_id, message_type=rec.TRAIN)


def _reply(node_id: int, partition: int, message: dict[str, torch.Tensor]) -> Message:
    metrics = rec.metric_record({"train_loss": 1.5, "steps": 3, "flops": 10.0, "num_samples": 20, rec.PARTITION_ID: partition})
    content = RecordDict({rec.ARRAYS: rec.to_array_record(message), rec.METRICS: metrics})
    return Message(content, reply_to=_instruction(node_id))


def test_malformed_replies_are_rejected_and_the_valid_ones_aggregated():
    config = spafl_config()
    algorithm = SpaFL(config, server_spec(config))
    server = algorithm.init_server(algorithm.spec.initial_state(config.seed))
    good = {f"thresholds/{n}": torch.full_like(t, 0.25) for n, t in server["thresholds"].items()}
    nan = {name: t.clone() for name, t in good.items()}
    nan["thresholds/conv2"][1] = math.nan
    wrong_shape = dict(good, **{"thresholds/fc1": torch.zeros(7)})
    wrong_dtype = {name: t.double() for name, t in good.items()}
    garbled = _reply(17, 6, good)
    garbled.content[rec.METRICS]["steps"] = [1, 2]  # a list where a count belongs
    partitions = {11: 0, 12: 1, 13: 2, 14: 3, 15: 4, 16: 5, 17: 6}
    replies = [
        _reply(12, 1, nan),
        _reply(11, 0, good),
        _reply(13, 2, wrong_shape),
        _reply(14, 3, wrong_dtype),
        _reply(15, 0, good),  # claims another partition
        Message(Error(code=0, reason="node lost"), reply_to=_instruction(16)),
        _reply(99, 7, good),  # nobody asked node 99
        garbled,
    ]
    read = read_replies(replies, partitions, round_number=1)
    assert sorted(got.client_id for got in read.exchange.received) == [0, 1, 2, 3]  # readable and attributed: the round validates them
    assert [p for p, _ in read.failed] == [5]
    early = dict(read.exchange.rejected)
    assert set(early) == {4, 6, None} and "partition" in early[4] and "metrics" in early[6]

    # The round validates the rest (names, shapes, dtypes, finiteness) and aggregates the valid reply: tau_g becomes its thresholds.
    strategy = SpaFLStrategy(config, out_dir="unused")
    strategy.transport.partition_of = {11: 0, 12: 1, 13: 2, 14: 3}
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)
    strategy._sent = dict(partitions)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert (metrics["replies"], metrics["rejected"], metrics["missing"]) == (1, 6, 1)  # node 16 answered with an error
    assert metrics["flops"] == 10.0
    # Every reply that carried arrays travelled: nan, good (x4: nodes 11, 15, 99, 17), wrong shape, wrong dtype.
    assert metrics["bits_up"] == 5 * message_bits(good) + message_bits(wrong_shape) + message_bits(wrong_dtype)
    for name, tensor in strategy.server["thresholds"].items():
        assert torch.equal(tensor, good[f"thresholds/{name}"])
    assert torch.equal(rec.from_array_record(arrays)["thresholds/conv1"], good["thresholds/conv1"])
    reasons = [why for _, why in strategy.loop.accept(strategy.state, read.exchange, 0).rejected]
    assert any("non-finite" in why for why in reasons) and any("shape" in why for why in reasons) and any("dtype" in why for why in reasons)


# -- conversions -------------------------------------------------------------------------------
def test_named_tensors_survive_an_array_record_exactly():
    config = spafl_config()
    algorithm = SpaFL(config, server_spec(config))
    server = algorithm.init_server(algorithm.spec.initial_state(config.seed))
    server["thresholds"] = {n: torch.randn(t.shape) for n, t in server["thresholds"].items()}
    messages = [
        algorithm.server_message(server, 0, 0),
        {"thresholds/a": torch.randn(5), "delta/a": torch.randn(5).double(), "count": torch.arange(4),
         "mask": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "conv/w": torch.randn(2, 3, 5, 5).half()},
    ]
    for message in messages:
        record = rec.to_array_record(message)
        back = rec.from_array_record(record)
        assert list(back) == list(message)
        for name, tensor in message.items():
            assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
            assert torch.equal(back[name], tensor)
        assert rec.record_payload_bits(record) == message_bits(message) == message_bits(back)
    assert message_bits(messages[0]) == 2 * 580 * 32
    # a bool tensor travels as a bitmask: 1 bit per element counted, its bits packed on the wire
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.3
    record = rec.to_array_record({"mask": mask})
    assert message_bits({"mask": mask}) == rec.record_payload_bits(record) == 1000
    assert len(record["mask"].data) == 125 and torch.equal(rec.from_array_record(record)["mask"], mask)
    dense = rec.to_array_record({"mask": mask.float()})
    assert 125 < rec.wire_bytes(record) < 125 + 400 and 4000 < rec.wire_bytes(dense) < 4000 + 600  # payload + framing

    state = {"thresholds": {"conv1": torch.ones(6)}, "delta": {"conv1": torch.zeros(6)}, "model": {"fc.weight": torch.eye(2)}}
    flat = rec.flatten_state(state)
    assert list(flat) == ["thresholds/conv1", "delta/conv1", "model/fc.weight"]
    assert rec.unflatten_state(rec.from_array_record(rec.to_array_record(flat))).keys() == state.keys()
    assert rec.decode_state(rec.encode_state({"optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "foreach": None}]}}))["optimizer"]["param_groups"][0]["lr"] == 0.1
    evaluation = ClientEval(correct=7, loss_sum=3.25, num_test=10, majority_correct=4, density=0.5, density_weighted=0.25)
    assert rec.eval_from_metrics(MetricRecord(rec.eval_to_metrics(evaluation))) == evaluation
    assert rec.parse_overrides(" dataset=synthetic ;rounds=3;; ") == {"dataset": "synthetic", "rounds": "3"}


# -- node loss and SuperNode restart, over an in-memory Grid ------------------------------------
class LocalGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process: nodes can hang or restart."""

    def __init__(self, client_app, run_config: dict, state_dir: Path, num_nodes: int, run_id: int = 7) -> None:
        self.client_app = client_app
        self.run_config = run_config
        self.state_dir = state_dir
        self.run_id = run_id
        self.nodes: dict[int, Context] = {}
        self.replies: dict[str, Message] = {}
        self.hung: set[int] = set()
        self.restart_after: tuple[str, int] | None = None  # (group id of train messages, partition)
        self._pending_restart: int | None = None
        for k in range(num_nodes):
            self.add_node(k)

    def add_node(self, partition: int) -> int:
        node_id = 1000 + len(self.nodes) + 100 * partition
        while node_id in self.nodes:
            node_id += 1
        node_config = {rec.PARTITION_ID: partition, rec.NUM_PARTITIONS: 4, rec.STATE_DIR: str(self.state_dir)}
        self.nodes[node_id] = Context(run_id=self.run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=self.run_config)
        return node_id

    def node_holding(self, partition: int) -> int:
        return next(n for n, c in self.nodes.items() if c.node_config[rec.PARTITION_ID] == partition)

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        if self._pending_restart is not None:  # the SuperNode comes back with a new node id and an empty context
            self.nodes.pop(self.node_holding(self._pending_restart))
            self.add_node(self._pending_restart)
            self._pending_restart = None
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node_id = message.metadata.dst_node_id
            if node_id not in self.nodes or node_id in self.hung:
                continue
            try:
                self.replies[message_id] = self.client_app(message, self.nodes[node_id])
            except Exception as error:  # noqa: BLE001 - as the SuperNode does: an error reply
                self.replies[message_id] = Message(Error(code=1, reason=repr(error)), reply_to=message)
            if self.restart_after == (message.metadata.group_id, self.nodes[node_id].node_config[rec.PARTITION_ID]):
                self._pending_restart = self.restart_after[1]
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _run_local(tmp_path: Path, timeout: float = 30.0, setup=None, extra: str = "") -> Path:
    run_dir, state_dir = tmp_path / "run", tmp_path / "state"
    config = run_config(run_dir, extra, timeout=timeout)
    grid = LocalGrid(make_client_app(), config, state_dir, num_nodes=4)
    if setup is not None:
        setup(grid)
    settings = rec.RunSettings.from_run_config(config)
    SpaFLStrategy(settings.config(), out_dir=run_dir, round_timeout=settings.round_timeout, poll_interval=0.01).start(grid)
    return run_dir


def test_restarted_supernode_resumes_its_client_from_disk(tmp_path, inprocess):
    config = spafl_config()
    partition = sample_clients(config.seed, 0, config.num_clients, config.clients_per_round)[0]

    def restart(grid: LocalGrid) -> None:
        grid.restart_after = ("1", partition)  # after training in round 1, before round 2

    run_dir = _run_local(tmp_path, setup=restart)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[2]["resumed_from_disk"] == [partition]
    assert all(r["resumed_from_disk"] == [] for r in rows if r["round"] != 2)
    assert state_path(tmp_path / "state", partition).exists()
    expected = load_checkpoint(inprocess)["server"]["thresholds"]  # nothing was lost: same run as in-process
    got = server_thresholds(run_dir)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    assert [r["bits_cum"] for r in rows] == [r["bits_cum"] for r in read_metrics(inprocess / "metrics.jsonl")]


def test_broadcast_variant_matches_inprocess(tmp_path):
    """importance_update=all_after_aggregation: a train.broadcast message to every node after aggregation."""
    extra = "importance_update=all_after_aggregation; importance_delta=since_last_seen; eval_every=1; rounds=2"
    Simulator(spafl_config(extra), tmp_path / "inprocess", progress=False).run()
    run_dir = _run_local(tmp_path, extra=extra)
    expected = load_checkpoint(tmp_path / "inprocess")["server"]["thresholds"]
    got = server_thresholds(run_dir)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(tmp_path / "inprocess" / "metrics.jsonl")
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine["bits_up"], mine["bits_down"]) == (ref["bits_up"], ref["bits_down"])
        assert mine["accuracy"] == pytest.approx(ref["accuracy"], rel=1e-9) and mine["evaluated"]
    assert ours[1]["bits_down"] == (2 + 4) * 580 * 32  # tau_g to the 2 sampled, tau_g broadcast to all 4


def test_a_node_that_stops_answering_does_not_stop_the_run(tmp_path):
    config = spafl_config()
    late = [sample_clients(config.seed, t, config.num_clients, config.clients_per_round) for t in (1, 2)]
    victim = late[1][-1]  # sampled in round 3

    def hang(grid: LocalGrid) -> None:
        original = grid.push_messages

        def push(messages):
            messages = list(messages)
            if messages and messages[0].metadata.group_id == "2":
                grid.hung.add(grid.node_holding(victim))
            return original(messages)

        grid.push_messages = push

    run_dir = _run_local(tmp_path, timeout=0.5, setup=hang)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row, sampled in zip(rows[2:], late):
        lost = int(victim in sampled)
        assert (row["replies"], row["missing"], row["rejected"]) == (2 - lost, lost, 0)
        assert row["bits_up"] == (2 - lost) * 580 * 32
    assert rows[3]["evaluated"] and rows[3]["clients_evaluated"] == 3
    assert (run_dir / "summary.json").exists()


def _same_rows(ours: list[dict], theirs: list[dict], skip: tuple[str, ...] = ()) -> None:
    """Every field the simulator writes has the same value in ``ours`` (``seconds`` and ``skip`` aside)."""
    assert [r["round"] for r in ours] == [r["round"] for r in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        for key, value in ref.items():
            if key == "seconds" or key in skip:
                continue
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (mine["round"], key)
            else:
                assert mine[key] == value, (mine["round"], key)


BROADCASTING = "importance_update=all_after_aggregation; eval_every=1; rounds=4"


def test_a_node_absent_at_a_broadcast_receives_it_before_it_next_works(tmp_path):
    """The node of one partition misses round 1's broadcast; it gets it with its next message, and the run equals in-process."""
    Simulator(spafl_config(BROADCASTING), tmp_path / "inprocess", progress=False).run()
    theirs = read_metrics(tmp_path / "inprocess" / "metrics.jsonl")
    victim = 3

    def miss_one_broadcast(grid: LocalGrid) -> None:
        original = grid.push_messages

        def push(messages):
            messages = list(messages)
            away = bool(messages) and messages[0].metadata.message_type == rec.BROADCAST and messages[0].metadata.group_id == "1"
            (grid.hung.add if away else grid.hung.discard)(grid.node_holding(victim))
            return original(messages)

        grid.push_messages = push

    run_dir = _run_local(tmp_path, timeout=0.5, setup=miss_one_broadcast, extra=BROADCASTING)
    ours = read_metrics(run_dir / "metrics.jsonl")
    # the lost copy was sent, and sent again with the node's next message (round 1's evaluation): counted twice
    broadcast_bits = 580 * 32  # delta_g
    assert ours[1]["bits_down"] == theirs[1]["bits_down"] + broadcast_bits
    assert [r["bits_down"] for r in ours[2:]] == [r["bits_down"] for r in theirs[2:]]
    assert [r["bits_cum"] - broadcast_bits for r in ours[1:]] == [r["bits_cum"] for r in theirs[1:]]
    _same_rows(ours, theirs, skip=("bits_down", "bits_cum"))  # the same models: every client received every broadcast
    assert [r["accuracy"] for r in ours] == pytest.approx([r["accuracy"] for r in theirs], rel=1e-9)
    expected = load_checkpoint(tmp_path / "inprocess")["server"]["thresholds"]
    for name, tensor in server_thresholds(run_dir).items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_a_stopped_server_resumes_from_its_run_directory_with_the_metrics_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """The ServerApp dies in round 3 after its nodes trained and applied the broadcast; resumed, it gives the in-process rows."""
    from spafl.flower.transport import GridTransport

    Simulator(spafl_config(BROADCASTING), tmp_path / "inprocess", progress=False).run()
    run_dir, state_dir = tmp_path / "run", tmp_path / "state"
    config = run_config(run_dir, BROADCASTING, timeout=30.0)
    grid = LocalGrid(make_client_app(), config, state_dir, num_nodes=4)
    settings = rec.RunSettings.from_run_config(config)
    original_save = GridTransport.save

    def die_in_round_three(self, state):
        if state["round"] == 3:
            raise KeyboardInterrupt
        original_save(self, state)

    monkeypatch.setattr(GridTransport, "save", die_in_round_three)
    with pytest.raises(KeyboardInterrupt):
        SpaFLStrategy(settings.config(), out_dir=run_dir, round_timeout=30.0, poll_interval=0.01).start(grid)
    assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    monkeypatch.setattr(GridTransport, "save", original_save)

    with pytest.raises(UserError, match="already holds a run"):
        SpaFLStrategy(settings.config(), out_dir=run_dir, round_timeout=30.0).start(grid)
    # the same nodes (their newest states are from round 3, which the server lost), then a restarted SuperNode's empty context
    grid.nodes[grid.node_holding(0)].state = RecordDict()
    resumed = rec.RunSettings.from_run_config({**config, "resume": "true"})
    assert resumed.resume
    SpaFLStrategy(resumed.config(), out_dir=run_dir, round_timeout=30.0, poll_interval=0.01, resume=True).start(grid)
    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(tmp_path / "inprocess" / "metrics.jsonl")
    _same_rows(ours, theirs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"] == json.loads((tmp_path / "inprocess" / "summary.json").read_text())["final"]


def test_a_new_node_claiming_a_partition_that_a_serving_node_holds_does_not_take_it(tmp_path, inprocess, caplog):
    """After round 1, a second node says it holds a partition sampled in rounds 2 and 3; its holder keeps serving it."""
    config = spafl_config()
    claimed = sample_clients(config.seed, 1, config.num_clients, config.clients_per_round)[0]
    impostors = []

    def add_impostor(grid: LocalGrid) -> None:
        original = grid.push_messages

        def push(messages):
            messages = list(messages)
            if messages and messages[0].metadata.group_id == "2" and not impostors:
                impostors.append(grid.add_node(claimed))  # a fresh context: its model would be the initial one
            return original(messages)

        grid.push_messages = push

    run_dir = _run_local(tmp_path, setup=add_impostor)
    assert f"claims partition {claimed}, which node {1000 + 100 * claimed + claimed} holds and serves; not handed over" in caplog.text
    _same_rows(read_metrics(run_dir / "metrics.jsonl"), read_metrics(inprocess / "metrics.jsonl"))


def test_an_evaluation_without_any_usable_reply_leaves_the_round_unevaluated_instead_of_stopping_the_server():
    strategy = SpaFLStrategy(spafl_config(), out_dir="unused")
    assert strategy.transport.read_evaluations([], {11: 0, 12: 1}, 3) is None
    empty = ClientEval(correct=0, loss_sum=0.0, num_test=0, majority_correct=0, density=1.0, density_weighted=1.0)
    reply = Message(RecordDict({rec.METRICS: rec.metric_record({**rec.eval_to_metrics(empty), rec.PARTITION_ID: 0})}),
                    reply_to=_instruction(11))
    assert strategy.transport.read_evaluations([reply], {11: 0}, 3) is None  # a node without test data only


def test_every_number_a_node_reports_is_checked_and_a_bad_reply_is_rejected_without_stopping_the_round():
    """Infinite or fractional counts, NaN loss, negative FLOPs, more samples than the partition holds; impossible evaluations."""
    config = spafl_config()
    strategy = SpaFLStrategy(config, out_dir="unused")
    good = {f"thresholds/{n}": torch.full_like(t, 0.25) for n, t in strategy.server["thresholds"].items()}
    lies = [
        {"steps": math.inf}, {"num_samples": 1e18}, {"num_samples": 2.5}, {rec.PARTITION_ID: math.inf},
        {"flops": -5.0}, {"flops": math.nan}, {"num_samples": 21},
    ]
    partitions = {100 + k: k for k in range(len(lies) + 1)}
    replies = [_reply(100 + k, k, good) for k in range(len(lies) + 1)]
    for reply, lie in zip(replies, lies):
        for key, value in lie.items():
            reply.content[rec.METRICS][key] = value
    read = read_replies(replies, partitions, 1, sizes={k: 20 for k in partitions.values()})
    accepted = strategy.loop.accept(strategy.state, read.exchange, 0)
    assert [r.client_id for r in accepted.replies] == [len(lies)]  # only the honest reply
    assert len(accepted.rejected) == len(lies)

    evaluation = {"correct": 7, "loss_sum": 3.0, "num_test": 10, "majority_correct": 4, "density": 0.5, "density_weighted": 0.25}
    assert rec.eval_from_metrics(evaluation).correct == 7
    layered = rec.eval_from_metrics({**evaluation, "density/fc1": 0.25, "guard_resets": 2})
    assert (layered.layer_density, layered.guard_resets) == ({"fc1": 0.25}, 2)
    for bad in ({"correct": 11}, {"density": math.nan}, {"loss_sum": math.inf}, {"num_test": -1}, {"density_weighted": 1.5}, {"correct": 2.5},
                {"density/fc1": 1.5}, {"density/fc1": math.nan}, {"density/fc1": "0.5"}, {"guard_resets": -1}, {"guard_resets": 1.5},
                {"guard_resets": True}):
        with pytest.raises((ValueError, TypeError)):
            rec.eval_from_metrics({**evaluation, **bad})


def test_the_collapse_guard_acts_at_the_same_moments_on_the_grid_as_in_process(tmp_path):
    """A node keeps what its evaluation's guard reset, as the simulator's client store does: same rows, resets included."""
    extra = "th_coeff=0.2; lr=0.01; eval_every=1; rounds=4"
    Simulator(spafl_config(extra), tmp_path / "inprocess", progress=False).run()
    theirs = read_metrics(tmp_path / "inprocess" / "metrics.jsonl")
    assert sum(row["guard_resets_eval"] for row in theirs) >= 1
    ours = read_metrics(_run_local(tmp_path, extra=extra) / "metrics.jsonl")
    _same_rows(ours, theirs)
