"""Local training: no communication, personal dense models trained only when sampled."""

import json

import torch

from spafl.algorithms import ALGORITHMS, ClientTask, Local, Reply
from spafl.config import build_config
from spafl.engine import Simulator
from spafl.runtime.federation import build_federation
from spafl.metrics import message_bits
from spafl.nn import masked_layers
from tests.helpers import small_config

from .tiny import SPEC_WITH_BIAS as SPEC
from .tiny import tiny_data


def local(**overrides):
    config = build_config("fmnist-paper", overrides={"local_epochs": 1, "batch_size": 4, "lr": 0.1, **overrides})
    return Local(config, SPEC)


def test_nothing_travels_and_the_server_does_nothing():
    assert ALGORITHMS["local"] is Local
    algo = local()
    server = algo.init_server(SPEC.initial_state(0))
    assert algo.server_message(server, 3, 0) == {} and message_bits(algo.server_message(server, 3, 0)) == 0
    assert algo.broadcast_message(server, 0) is None
    assert algo.aggregate(server, [Reply(0, {}, 8)], 0) is server
    assert algo.validate_reply(server, Reply(0, {}, 8)) is None
    assert "sends nothing" in algo.validate_reply(server, Reply(0, {"weights/fc1.weight": torch.zeros(3, 4)}, 8))


def test_client_trains_its_own_dense_model_and_keeps_optimizer_state_when_persistent():
    algo = local(optimizer_scope="persistent")
    initial = SPEC.initial_state(0)
    frozen = {k: v.clone() for k, v in initial.items()}
    client = algo.init_client(0, initial)
    assert client["model"] is initial
    result = algo.client_update(client, {}, tiny_data(), ClientTask(0, 0, 0))
    assert result.message == {} and message_bits(result.message) == 0
    model = result.state["model"]
    assert not torch.equal(model["fc1.weight"], initial["fc1.weight"]) and not torch.equal(model["fc2.bias"], initial["fc2.bias"])
    assert float(model["fc1.threshold"].abs().max()) == 0.0 and float(model["fc2.threshold"].abs().max()) == 0.0
    assert all(torch.equal(initial[k], frozen[k]) for k in initial)  # the shared initial dict is untouched
    assert client["model"] is initial  # the old state is not modified in place
    # momentum buffers for the 4 trained tensors (weights and biases), none for thresholds
    slots = result.state["optimizer"]["state"]
    assert len(slots) == 4 and all(slot["momentum_buffer"].device.type == "cpu" for slot in slots.values())
    assert result.stats["steps"] == 2 and result.stats["num_samples"] == 8 and result.stats["flops"] == 3 * 8 * (12 + 6)
    evaluated = algo.workspace(algo.evaluation_state(result.state, {}))
    assert all(not layer.masking and layer.density() == 1.0 for _, layer in masked_layers(evaluated))
    # the second round resumes the momentum: differs from a fresh optimizer
    resumed = algo.client_update(result.state, {}, tiny_data(), ClientTask(0, 1, 0))
    fresh = algo.client_update({**result.state, "optimizer": None}, {}, tiny_data(), ClientTask(0, 1, 0))
    assert not torch.equal(resumed.state["model"]["fc1.weight"], fresh.state["model"]["fc1.weight"])
    assert local(optimizer_scope="per_round").client_update(client, {}, tiny_data(), ClientTask(0, 0, 0)).state["optimizer"] is None


def simulate(tmp_path, synthetic, **overrides):
    values = {"method": "local", "pixels": "normalized", "lr": 0.01, "partition": "iid", **overrides}
    config = small_config(**values)
    return Simulator(config, tmp_path / "run", federation=build_federation(config, synthetic), progress=False)


def test_three_rounds_send_nothing_and_accuracy_improves(tmp_path, synthetic):
    summary = simulate(tmp_path, synthetic, rounds=3).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["bits_up"] == 0 and r["bits_down"] == 0 and r["bits_cum"] == 0 for r in rows)
    assert summary["bits_total"] == 0
    assert all(r["density"] == 1.0 for r in rows)
    assert rows[-1]["flops_cum"] > 0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 10


def test_only_sampled_clients_train(tmp_path, synthetic):
    simulator = simulate(tmp_path, synthetic, clients_per_round=1, rounds=1)
    state = simulator.fresh_state()
    initial = simulator.federation.spec.initial_state(simulator.config.seed)
    sampled = simulator.run_round(state, 0)["sampled"]
    assert len(sampled) == 1
    for client_id, client in enumerate(state["clients"]):
        unchanged = all(torch.equal(client["model"][k], initial[k]) for k in initial)
        assert unchanged == (client_id not in sampled)
    never = [k for k in range(4) if k not in sampled]
    assert state["clients"][never[0]]["model"] is state["clients"][never[1]]["model"]  # still the shared initial dict
    assert state["server"] == {}
