"""Client-state stores: exact round trips, lazy clients, crash-consistent disk versions, lazy broadcasts, eval subsets."""

import json

import pytest
import torch

from spafl.engine import Simulator
from spafl.engine.checkpoint import load_checkpoint
from spafl.runtime.federation import build_federation
from spafl.engine.simulator import evaluation_clients
from spafl.engine.store import Clients, DiskStore, MemoryStore, choose_store
from spafl.errors import UserError
from spafl.seeding import sample_clients

from tests.helpers import small_config

LENET_THRESHOLDS = 580


def assert_same(a, b):
    """Equal values, tensors bit for bit (dtype and shape included), recursively."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def trained_state():
    """A client state as SpaFL keeps it: weights, an SGD state dict with momentum, a nested dict and a None."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    return {
        "model": {name: t.detach().clone() for name, t in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "last_seen": {"fc1": torch.tensor([0.5, -0.25]), "nested": {"counts": torch.arange(3, dtype=torch.int64)}},
        "extra": None,
    }


INITIAL = {"model": {"weight": torch.zeros(2, 3)}, "optimizer": None}


def init(client_id):
    return {"model": INITIAL["model"], "optimizer": None}


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_state_round_trips_exactly(tmp_path, kind):
    store = MemoryStore(init) if kind == "memory" else DiskStore(init, tmp_path / "clients")
    state = trained_state()
    assert len(state["optimizer"]["state"][0]["momentum_buffer"]) == 2  # momentum really is in the state
    store.put(3, state, version=1)
    assert_same(store.get(3), state)
    assert store.materialized == 1


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_an_untouched_client_shares_the_initial_state_and_writes_nothing(tmp_path, kind):
    store = MemoryStore(init) if kind == "memory" else DiskStore(init, tmp_path / "clients")
    client = store.get(7)
    assert client["model"] is INITIAL["model"] and client["optimizer"] is None
    assert store.materialized == 0
    assert store.checkpoint_state() == ({"kind": kind, "states": {}} if kind == "memory" else {"kind": kind, "index": {}})
    assert not (tmp_path / "clients").exists()


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_disk_keeps_at_most_the_checkpointed_and_the_latest_version(tmp_path):
    directory = tmp_path / "clients"
    store = DiskStore(init, directory)
    state = trained_state()
    store.put(4, state, 1)
    store.put(4, state, 2)  # version 1 was never checkpointed: gone at once
    assert names(directory) == ["c000004-r000002.pt"]
    store.flush()
    store.commit()
    store.put(4, state, 3)
    store.put(4, state, 4)
    assert names(directory) == ["c000004-r000002.pt", "c000004-r000004.pt"]
    store.put(4, state, 4)  # the same round again replaces the file
    assert names(directory) == ["c000004-r000002.pt", "c000004-r000004.pt"]
    store.commit()
    assert names(directory) == ["c000004-r000004.pt"]
    assert store.checkpoint_state() == {"kind": "disk", "index": {4: 4}}


def test_disk_restore_drops_files_newer_than_the_checkpoint(tmp_path):
    directory = tmp_path / "clients"
    store = DiskStore(init, directory)
    store.put(1, trained_state(), 2)
    store.put(5, {"model": {"weight": torch.ones(2, 3)}, "optimizer": None}, 2)
    saved = store.checkpoint_state()
    store.commit()
    store.put(1, {"model": {"weight": torch.full((2, 3), 9.0)}, "optimizer": None}, 3)  # after the checkpoint
    store.put(2, trained_state(), 3)
    (directory / ".c000002-r000003.pt.tmp-123").write_bytes(b"cut")  # a write a crash interrupted
    assert len(names(directory)) == 5

    resumed = DiskStore(init, directory)
    resumed.restore(saved)
    assert names(directory) == ["c000001-r000002.pt", "c000005-r000002.pt"]
    assert_same(resumed.get(1), trained_state())
    assert torch.equal(resumed.get(5)["model"]["weight"], torch.ones(2, 3))
    assert resumed.get(2)["model"] is INITIAL["model"]  # its post-checkpoint file is gone: back to the initial state
    (directory / "c000005-r000002.pt").unlink()
    with pytest.raises(UserError, match="1 client state file"):
        DiskStore(init, directory).restore(saved)


def test_auto_picks_disk_when_weights_and_optimizer_of_all_clients_exceed_one_gib():
    initial = {"w": torch.zeros(1024)}  # 4096 bytes, twice that per client
    assert choose_store("auto", initial, 131_072) == "memory"  # exactly 1 GiB
    assert choose_store("auto", initial, 131_073) == "disk"
    assert choose_store("memory", initial, 10**9) == "memory" and choose_store("disk", initial, 1) == "disk"


def test_broadcasts_are_replayed_in_order_once_and_the_log_shrinks():
    received = []

    def receive(state, message, round_index):
        received.append(round_index)
        return {"model": {"weight": state["model"]["weight"] + message["delta"]}, "optimizer": None}

    clients = Clients(MemoryStore(init), receive, num_clients=2)
    clients.broadcast(0, {"delta": torch.full((2, 3), 1.0)})
    clients.broadcast(1, {"delta": torch.full((2, 3), 10.0)})
    assert torch.equal(clients.load(0)["model"]["weight"], torch.full((2, 3), 11.0))
    assert received == [0, 1] and clients.materialized == 1
    assert torch.equal(clients.load(0)["model"]["weight"], torch.full((2, 3), 11.0))  # written back: not replayed
    assert received == [0, 1]
    peek = clients.load(1, write_back=False)
    assert torch.equal(peek["model"]["weight"], torch.full((2, 3), 11.0)) and clients.materialized == 1
    clients.save(1, peek)
    clients.broadcast(2, {"delta": torch.full((2, 3), 100.0)})
    assert len(clients.log) == 1 and clients.dropped == 2  # every client has the first two
    assert torch.equal(clients[1]["model"]["weight"], torch.full((2, 3), 111.0))


def test_a_revision_changes_exactly_when_the_state_can_have_changed():
    clients = Clients(MemoryStore(init), lambda state, message, round_index: state, num_clients=3)
    assert [clients.revision(k) for k in range(3)] == [0, 0, 0]  # all share the initial state
    clients.load(0)
    assert clients.revision(0) == 0  # reading changes nothing
    clients.save(1, clients.load(1, write_back=False))
    first = clients.revision(1)
    assert first not in (None, 0) and clients.revision(1) == first
    clients.save(1, clients.load(1, write_back=False))
    assert clients.revision(1) not in (None, 0, first)  # every save is a new revision, even of equal values
    clients.broadcast(0, {"delta": torch.zeros(1)})
    assert [clients.revision(k) for k in range(3)] == [None, None, None]  # a broadcast awaits every client
    clients.load(2, write_back=False)
    assert clients.revision(2) is None  # a peek does not deliver it
    clients.load(2)
    assert clients.revision(2) not in (None, 0)  # delivered and written back
    other = Clients(MemoryStore(init), lambda state, message, round_index: state, num_clients=3)
    assert other.token != clients.token


# -- the simulator with a store ----------------------------------------------------


def simulate(tmp_path, synthetic, name, **overrides):
    config = small_config(**overrides)
    return Simulator(config, tmp_path / name, federation=build_federation(config, synthetic), progress=False)


def rows_of(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def client_states(simulator):
    """Every client's state as of the run's last checkpoint."""
    state = simulator.restore_state(load_checkpoint(simulator.run_dir))
    return [state["clients"].load(k, write_back=False) for k in range(simulator.config.num_clients)]


def test_disk_store_run_resumes_after_a_crash_with_identical_metrics(tmp_path, synthetic, monkeypatch):
    settings = {"client_store": "disk", "rounds": 4, "checkpoint_every": 2, "num_clients": 6}
    simulate(tmp_path, synthetic, "full", **settings).run()
    original = Simulator.run_round

    def crash_after_round_four_trains(self, state, round_index):
        row = original(self, state, round_index)
        if round_index == 3:
            raise RuntimeError("power cut")
        return row

    monkeypatch.setattr(Simulator, "run_round", crash_after_round_four_trains)
    crashed = simulate(tmp_path, synthetic, "crashed", **settings)
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.run()
    monkeypatch.undo()
    directory = tmp_path / "crashed" / "clients"
    index = load_checkpoint(tmp_path / "crashed")["clients"]["store"]["index"]
    committed = sorted(f"c{k:06d}-r{v:06d}.pt" for k, v in index.items())
    assert max(index.values()) <= 2 and set(committed) < set(names(directory))  # rounds 3-4 left newer files

    crashed.restore_state(load_checkpoint(tmp_path / "crashed"))
    assert names(directory) == committed  # exactly what the checkpoint references

    simulate(tmp_path, synthetic, "crashed", **settings).run(resume=True)
    assert rows_of(tmp_path / "crashed") == rows_of(tmp_path / "full")
    final = load_checkpoint(tmp_path / "crashed")["clients"]["store"]["index"]
    assert names(directory) == sorted(f"c{k:06d}-r{v:06d}.pt" for k, v in final.items())  # one file per trained client
    assert final == load_checkpoint(tmp_path / "full")["clients"]["store"]["index"]


def eager(simulator):
    """Deliver every broadcast to every client right after aggregation, as the simulator used to."""
    run_round = simulator.run_round

    def run_round_then_deliver(state, round_index):
        row = run_round(state, round_index)
        for client_id in range(simulator.config.num_clients):
            state["clients"].load(client_id)
        return row

    simulator.run_round = run_round_then_deliver
    return simulator


@pytest.mark.parametrize("delta", ["server_sends", "since_last_seen"])
def test_lazy_broadcast_gives_the_rows_and_states_of_eager_delivery(tmp_path, synthetic, delta):
    # 1 of 4 clients per round, evaluation only at round 3: clients pile up to 3 pending broadcasts
    settings = {"importance_update": "all_after_aggregation", "importance_delta": delta, "rounds": 3, "clients_per_round": 1,
                "eval_every": 3, "checkpoint_every": 3, "th_coeff": 0.5}
    lazy = {kind: simulate(tmp_path, synthetic, kind, client_store=kind, **settings) for kind in ("memory", "disk")}
    for simulator in lazy.values():
        simulator.run()
    reference = eager(simulate(tmp_path, synthetic, "eager", client_store="memory", **settings))
    reference.run()
    expected = rows_of(tmp_path / "eager")
    assert rows_of(tmp_path / "memory") == expected and rows_of(tmp_path / "disk") == expected
    per_client = LENET_THRESHOLDS * 32
    assert [r["bits_down"] for r in expected[1:]] == [(1 + 4) * per_client] * 3  # the sampled client's tau_g, then one message to all 4
    assert expected[-1]["density"] < 1.0  # the thresholds moved, so the broadcasts changed weights
    want = client_states(reference)
    for simulator in lazy.values():
        for ours, theirs in zip(client_states(simulator), want):
            assert_same(ours, theirs)


def test_evaluation_subset_is_seeded_fixed_and_only_it_is_loaded(tmp_path, synthetic, monkeypatch):
    config = small_config(num_clients=8, eval_clients=3, rounds=2)
    subset = evaluation_clients(config)
    assert subset == sorted(set(subset)) and len(subset) == 3 and all(0 <= k < 8 for k in subset)
    assert evaluation_clients(config) == subset
    assert len({tuple(evaluation_clients(config.replace(seed=s))) for s in range(6)}) > 1
    assert evaluation_clients(config.replace(eval_clients=0)) == list(range(8))

    loads = []
    original = Clients.load

    def recording(self, client_id, write_back=True):
        loads.append((client_id, write_back))
        return original(self, client_id, write_back)

    monkeypatch.setattr(Clients, "load", recording)
    simulator = simulate(tmp_path, synthetic, "subset", num_clients=8, eval_clients=3, rounds=2)
    simulator.run()
    evaluated = [k for k, write_back in loads if write_back]
    # round 0 evaluates the subset; later rounds only its clients that trained (the others' results are reused)
    trained = [[k for k in subset if k in sample_clients(0, t, 8, 2)] for t in range(2)]
    assert evaluated == subset + trained[0] + trained[1]
    with_test_data = sum(1 for k in subset if simulator.federation.clients[k].num_test > 0)
    assert [r["clients_evaluated"] for r in rows_of(tmp_path / "subset")] == [with_test_data] * 3


def test_untrained_clients_never_reach_the_disk(tmp_path, synthetic):
    simulator = simulate(tmp_path, synthetic, "many", num_clients=40, rounds=2, client_store="disk", eval_every=2)
    simulator.run()
    rows = rows_of(tmp_path / "many")
    trained = {k for r in rows for k in r["sampled"]}
    index = load_checkpoint(tmp_path / "many")["clients"]["store"]["index"]
    assert set(index) == trained and len(trained) <= 4
    assert names(tmp_path / "many" / "clients") == sorted(f"c{k:06d}-r{v:06d}.pt" for k, v in index.items())
    assert rows[-1]["clients_evaluated"] == sum(1 for d in simulator.federation.clients if d.num_test > 0)
