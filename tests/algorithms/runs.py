"""Runs on synthetic data shared by the baselines' tests: bits, resume and Flower-equals-in-process checks."""

from __future__ import annotations

import pytest

from spafl.config import build_config
from spafl.engine import Simulator
from spafl.engine.checkpoint import load_checkpoint
from spafl.runtime.federation import build_federation
from spafl.runtime.record import read_metrics

try:  # the Flower tests' in-memory grid and row comparison
    from tests.flower.test_app import _run_local, _same_rows, spafl_config
except pytest.skip.Exception:  # Flower is not installed
    _run_local = None

#: LeNet-5's masked weights and multiply-accumulates per sample (SPEC §8)
LENET_WEIGHTS = 430_500
LENET_MACS = 20 * 25 * 24 * 24 + 50 * 500 * 8 * 8 + 800 * 500 + 500 * 10

SETTINGS = {"dataset": "synthetic", "num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_epochs": 1,
            "eval_every": 1, "checkpoint_every": 1, "threads": 1, "workers": 1}

needs_flower = pytest.mark.skipif(_run_local is None, reason="Flower is not installed")


def quick_config(method, **overrides):
    """The ``fmnist-quick`` preset (LeNet-5) on the synthetic dataset: 4 clients, 2 per round, 2 rounds."""
    return build_config("fmnist-quick", overrides={"method": method, **SETTINGS, **overrides})


def simulate(tmp_path, synthetic, method, name="run", **overrides):
    config = quick_config(method, **overrides)
    return Simulator(config, tmp_path / name, federation=build_federation(config, synthetic), progress=False)


def recorded_run(tmp_path, synthetic, method, **overrides):
    """A run's rows, its simulator and every upload ``(round, client) -> (message, samples)``."""
    simulator = simulate(tmp_path, synthetic, method, **overrides)
    uploads = {}
    original = simulator.algorithm.client_update

    def recording(client, message, data, task):
        result = original(client, message, data, task)
        uploads[task.round_index, task.client_id] = (result.message, data.num_train)
        return result

    simulator.algorithm.client_update = recording
    simulator.run()
    return read_metrics(tmp_path / "run" / "metrics.jsonl"), simulator, uploads


def assert_dense_flops(rows, simulator):
    """Dense compute: 3 x MACs x samples per sampled client (forward + backward), summed and divided by N = 4."""
    sizes = [c.num_train for c in simulator.federation.clients]
    expected = sum(3 * sizes[k] * LENET_MACS for r in rows[1:] for k in r["sampled"]) / 4
    assert rows[-1]["flops_cum"] == pytest.approx(expected)


def resumed_run_equals_uninterrupted(tmp_path, monkeypatch, simulate) -> None:
    """``simulate(name)`` (a 2-round Simulator, checkpoint every round) run straight, and stopped in round 2 then resumed:
    the same metrics rows."""
    simulate("full").run()
    original = Simulator.run_round

    def crash_in_round_two(self, state, round_index):
        if round_index == 1:
            raise RuntimeError("power cut")
        return original(self, state, round_index)

    monkeypatch.setattr(Simulator, "run_round", crash_in_round_two)
    with pytest.raises(RuntimeError, match="power cut"):
        simulate("crashed").run()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "crashed")["round"] == 1
    simulate("crashed").run(resume=True)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "crashed" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))


def assert_resume_is_identical(tmp_path, synthetic, method, monkeypatch):
    """A run stopped after round 1's checkpoint and resumed has the rows of an uninterrupted 2-round run."""
    resumed_run_equals_uninterrupted(tmp_path, monkeypatch, lambda name: simulate(tmp_path, synthetic, method, name))


def flower_rows_equal_inprocess(tmp_path, extra: str) -> list[dict]:
    """The rows of the Flower strategy over the in-memory LocalGrid, checked equal to the in-process run's (``extra``: overrides)."""
    Simulator(spafl_config(extra), tmp_path / "inprocess", progress=False).run()
    run_dir = _run_local(tmp_path, extra=extra)
    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(tmp_path / "inprocess" / "metrics.jsonl")
    _same_rows(ours, theirs)
    return ours


def assert_flower_equals_inprocess(tmp_path, method):
    """The Flower strategy over the in-memory LocalGrid gives the in-process run's rows (2 rounds)."""
    rows = flower_rows_equal_inprocess(tmp_path, f"method={method}; rounds=2; eval_every=1")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["bits_up"] > 0
