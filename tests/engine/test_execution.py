"""The fast path (compact compute, batched tensors) and the reference-style path give the same run."""

from __future__ import annotations

import pytest

from spafl.engine import parallel
from spafl.runtime.federation import build_federation
from spafl.runtime.record import METRICS, read_metrics
from spafl.engine.simulator import Simulator
from spafl.seeding import sample_clients
from tests.helpers import small_config


def run(tmp_path, synthetic, execution):
    config = small_config(rounds=3, th_coeff=0.2, lr=0.01, execution=execution)
    Simulator(config, tmp_path / execution, federation=build_federation(config, synthetic), progress=False).run()
    return read_metrics(tmp_path / execution / METRICS)


def test_fast_and_reference_paths_give_the_same_metrics(tmp_path, synthetic):
    fast = run(tmp_path, synthetic, "fast")
    reference = run(tmp_path, synthetic, "reference")
    assert len(fast) == len(reference) == 4
    assert fast[-1]["density"] < 0.9  # units were pruned, so the fast path did compute less
    # a layer collapsed after the first batch of an evaluation: the paths agree on where the guard acted
    assert sum(row["guard_resets_eval"] for row in fast) >= 1
    for a, b in zip(fast, reference):
        for key in ("round", "sampled", "bits_up", "bits_down", "bits_cum", "density", "density_weighted", "clients_evaluated",
                    "density_layers", "guard_resets_train", "guard_resets_eval"):
            assert a[key] == b[key], key
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.5
        assert abs(a["flops_cum"] - b["flops_cum"]) <= 1e-6 * max(1.0, b["flops_cum"])


@pytest.mark.parametrize("forked_eval_from", [0, 10**9])  # evaluations in forked workers / in the parent
def test_worker_processes_give_exactly_the_serial_single_thread_run(tmp_path, synthetic, monkeypatch, forked_eval_from):
    monkeypatch.setattr(parallel, "PARALLEL_EVAL_MIN_SAMPLES", forked_eval_from)
    rows = {}
    for workers in (1, 2):
        # the parent has two threads; whatever runs in it for the workers=2 run must use one, as workers do
        config = small_config(rounds=2, num_clients=6, clients_per_round=3, workers=workers, threads=workers)
        simulator = Simulator(config, tmp_path / str(workers), federation=build_federation(config, synthetic), progress=False)
        assert simulator.workers == workers
        simulator.run()
        rows[workers] = [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(tmp_path / str(workers) / METRICS)]
    assert rows[1] == rows[2]
    assert rows[2][-1]["replies"] == 3


def evaluated_ids(simulator):
    """Record which clients are evaluated, one pair per evaluation of a round.

    A pair holds the clients evaluated after training, by the processes that
    trained them, and those the evaluation itself evaluated, both sorted.
    """
    calls, after_training = [], []
    train, evaluate = simulator.runner.train, simulator.runner.evaluate

    def recording_train(jobs):
        after_training.extend(job[0] for job in jobs if job[4] is not None)
        return train(jobs)

    def recording(jobs, evaluated):
        for job in jobs:
            evaluated.append(job[0])
            yield job
        evaluated.sort()

    def recording_evaluate(jobs):
        calls.append((sorted(after_training), []))
        after_training.clear()
        return evaluate(recording(jobs, calls[-1][1]))

    simulator.runner.train = recording_train
    simulator.runner.evaluate = recording_evaluate
    return calls


@pytest.mark.parametrize("update", ["before_training", "all_after_aggregation"])
def test_fast_path_evaluates_again_only_changed_clients_and_gives_the_same_rows(tmp_path, synthetic, monkeypatch, update):
    rows, calls = {}, {}
    for memo in (True, False):
        config = small_config(rounds=3, num_clients=6, clients_per_round=2, importance_update=update)
        simulator = Simulator(config, tmp_path / str(memo), federation=build_federation(config, synthetic), progress=False)
        calls[memo] = evaluated_ids(simulator)
        if not memo:
            monkeypatch.setattr(simulator, "_memoizes", lambda: False)
        simulator.run()
        rows[memo] = [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(tmp_path / str(memo) / METRICS)]
    assert rows[True] == rows[False]
    assert calls[False] == [([], list(range(6)))] * 4
    if update == "before_training":  # only the trained clients changed, and each was evaluated where it trained
        assert calls[True] == [([], list(range(6)))] + [(sorted(sample_clients(0, t, 6, 2)), []) for t in range(3)]
    else:  # every client received the broadcast, so every state changed; none is evaluated before it
        assert calls[True] == calls[False]
