"""The in-process simulator: exact bits per variant, determinism, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from spafl.engine import Simulator
from spafl.runtime.federation import build_federation
from spafl.seeding import sample_clients

from tests.helpers import small_config

LENET_THRESHOLDS = 580


def run(tmp_path, synthetic, name="run", **overrides):
    config = small_config(**overrides)
    simulator = Simulator(config, tmp_path / name, federation=build_federation(config, synthetic), progress=False)
    summary = simulator.run()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, summary, simulator


@pytest.mark.parametrize(
    "update,delta,down_per_round",
    [
        # K = 2 sampled clients, N = 4 clients, 580 float32 thresholds
        ("before_training", "server_sends", 2 * 2 * LENET_THRESHOLDS * 32),  # tau_g and delta
        ("before_training", "since_last_seen", 2 * LENET_THRESHOLDS * 32),
        ("all_after_aggregation", "server_sends", (2 + 4) * LENET_THRESHOLDS * 32),  # + delta to all N
        ("off", "server_sends", 2 * LENET_THRESHOLDS * 32),
    ],
)
def test_bits_per_round_are_exact(tmp_path, synthetic, update, delta, down_per_round):
    rows, summary, _ = run(tmp_path, synthetic, importance_update=update, importance_delta=delta)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["bits_up"] == 2 * LENET_THRESHOLDS * 32 == 37_120
        assert row["bits_down"] == down_per_round
    assert rows[-1]["bits_cum"] == 2 * (37_120 + down_per_round) == summary["bits_total"]
    assert summary["gbit_total"] == pytest.approx(summary["bits_total"] / 1e9)


def test_metrics_rows_have_every_field_and_evaluation_is_carried(tmp_path, synthetic):
    rows, summary, sim = run(tmp_path, synthetic, rounds=3, eval_every=2)
    fields = {"round", "evaluated", "accuracy", "accuracy_weighted", "accuracy_majority", "loss", "density",
              "density_weighted", "bits_up", "bits_down", "bits_cum", "flops_cum", "seconds", "sampled", "train_loss"}
    assert all(fields <= set(r) for r in rows)
    assert [r["evaluated"] for r in rows] == [True, False, True, True]  # round 3 is the last: always evaluated
    assert rows[1]["accuracy"] == rows[0]["accuracy"] and rows[1]["density"] == rows[0]["density"]
    assert rows[0]["density"] == 1.0 and rows[0]["bits_cum"] == 0
    assert [r["sampled"] for r in rows[1:]] == [sample_clients(0, t, 4, 2) for t in range(3)]
    assert 0 <= rows[-1]["accuracy"] <= 100 and 0 < rows[-1]["density"] <= 1
    assert rows[-1]["flops_cum"] > rows[1]["flops_cum"] > 0
    assert summary["final"]["round"] == 3 and summary["rounds"] == 3


def test_unsampled_clients_keep_their_state(tmp_path, synthetic):
    config = small_config(num_clients=4, clients_per_round=1, rounds=1)
    sim = Simulator(config, tmp_path / "r", federation=build_federation(config, synthetic), progress=False)
    state = sim.fresh_state()
    before = {k: v.clone() for k, v in state["clients"][0]["model"].items()}
    sampled = sim.run_round(state, 0)["sampled"]
    for client_id in range(4):
        same = all(torch.equal(state["clients"][client_id]["model"][k], before[k]) for k in before)
        assert same == (client_id not in sampled)


def strip_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_same_seed_same_metrics_and_different_seed_differs(tmp_path, synthetic):
    first, _, _ = run(tmp_path, synthetic, "a")
    second, _, _ = run(tmp_path, synthetic, "b")
    other, _, _ = run(tmp_path, synthetic, "c", seed=1)
    assert strip_seconds(first) == strip_seconds(second)
    assert strip_seconds(first) != strip_seconds(other)


def _spafl(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "spafl.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_mid_round_then_resume_gives_identical_metrics(tmp_path):
    settings = ["--set", "dataset=synthetic", "--set", "num_clients=4", "--set", "clients_per_round=2",
                "--set", "rounds=5", "--set", "local_epochs=2", "--set", "checkpoint_every=2", "--set", "threads=1",
                "--set", "batch_size=16", "--quiet"]
    reference = _spafl("run", "--preset", "fmnist-paper", "--out", str(tmp_path / "full"), *settings)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    victim = _spafl("run", "--preset", "fmnist-paper", "--out", str(tmp_path / "killed"), *settings)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # round 3's row is written after the round-2 checkpoint: round 4 is running now
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    rows_at_kill = len(metrics.read_text().splitlines())
    assert 4 <= rows_at_kill < 6, "the run finished before it could be killed"

    resumed = _spafl("run", "--resume", str(tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    full = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["round"] for r in again] == [0, 1, 2, 3, 4, 5]
    assert strip_seconds(again) == strip_seconds(full)
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    again_summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert {k: v for k, v in again_summary.items() if k != "seconds_total"} == {k: v for k, v in full_summary.items() if k != "seconds_total"}


def test_record_masks_stores_packed_kept_bits_per_client_and_layer(tmp_path, synthetic):
    _, _, sim = run(tmp_path, synthetic, record_masks=(0, 2), th_coeff=0.5)
    import numpy as np

    first = np.load(tmp_path / "run" / "masks" / "round_00000.npz")
    last = np.load(tmp_path / "run" / "masks" / "round_00002.npz")
    assert int(first["units/conv1"]) == 20 and first["conv1"].shape == (4, 3)  # 4 clients, 20 bits in 3 bytes
    assert np.unpackbits(first["fc1"], axis=1, count=500).all()  # thresholds start at 0: everything kept
    state = sim.restore_state(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False))
    for client_id in range(4):
        model = sim.algorithm.workspace(state["clients"].load(client_id)["model"])
        kept = model.fc1.kept_units().numpy()
        assert (np.unpackbits(last["fc1"][client_id], count=500).astype(bool) == kept).all()


def test_record_masks_of_a_width_method_gives_each_client_its_prefix_of_the_full_width(tmp_path, synthetic):
    """A FjORD client holds the leading width_units(p_max, n) units of each hidden layer; the rest are recorded as pruned."""
    import numpy as np

    from spafl.algorithms.widths import width_units

    _, _, sim = run(tmp_path, synthetic, method="fjord", fjord_widths="0.2,0.6,1", num_clients=6, record_masks=(1,))
    recorded = np.load(tmp_path / "run" / "masks" / "round_00001.npz")
    tiers = [sim.algorithm.tier_of(k) for k in range(6)]
    assert {0.2, 1.0} <= set(tiers)  # clients of the narrowest and of the full width
    for name, units in (("conv1", 20), ("conv2", 50), ("fc1", 500), ("fc2", 10)):
        assert int(recorded[f"units/{name}"]) == units and recorded[name].shape == (6, (units + 7) // 8)
        kept = np.unpackbits(recorded[name], axis=1, count=units).astype(bool)
        for client_id, tier in enumerate(tiers):
            held = units if name == "fc2" else width_units(tier, units)  # the output layer keeps every class
            assert kept[client_id].tolist() == [True] * held + [False] * (units - held), (name, client_id)


def test_an_evaluation_that_resets_a_collapsed_layer_is_stored_and_counted(tmp_path, synthetic):
    """The guard's reset during evaluation stays in the client's state, as in the reference; rows count it."""
    config = small_config(num_clients=4, clients_per_round=2, rounds=1)
    sim = Simulator(config, tmp_path / "r", federation=build_federation(config, synthetic), progress=False)
    state = sim.fresh_state()
    clients = state["clients"]
    model = dict(clients[1]["model"])
    model["fc1.threshold"] = torch.full_like(model["fc1.threshold"], 100.0)
    model["fc1.kept_fraction"] = torch.tensor(0.0)  # training ended with fc1 collapsed
    clients.save(1, {**clients[1], "model": model})
    first = sim.evaluate_state(state)
    assert first["guard_resets_eval"] == 1
    assert clients[1]["model"]["fc1.threshold"].abs().sum() == 0 and float(clients[1]["model"]["fc1.kept_fraction"]) == 1.0
    assert first["density_layers"]["fc1"] == 1.0 and set(first["density_layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    second = sim.evaluate_state(state)  # evaluated again (the first was not settled): nothing left to reset
    assert second["guard_resets_eval"] == 0 and second["accuracy"] == first["accuracy"]
