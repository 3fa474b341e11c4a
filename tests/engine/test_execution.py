"""The fast path (compact compute, batched tensors) and the reference-style path give the same run."""

from __future__ import annotations

from spafl.engine.federation import build_federation
from spafl.engine.rundir import METRICS, read_metrics
from spafl.engine.simulator import Simulator
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
    for a, b in zip(fast, reference):
        for key in ("round", "sampled", "bits_up", "bits_down", "bits_cum", "density", "density_weighted", "clients_evaluated"):
            assert a[key] == b[key], key
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.5
        assert abs(a["flops_cum"] - b["flops_cum"]) <= 1e-6 * max(1.0, b["flops_cum"])


def test_worker_processes_give_exactly_the_serial_single_thread_run(tmp_path, synthetic):
    rows = {}
    for workers in (1, 2):
        config = small_config(rounds=2, num_clients=6, clients_per_round=3, workers=workers, threads=1)
        simulator = Simulator(config, tmp_path / str(workers), federation=build_federation(config, synthetic), progress=False)
        assert simulator.workers == workers
        simulator.run()
        rows[workers] = [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(tmp_path / str(workers) / METRICS)]
    assert rows[1] == rows[2]
    assert rows[2][-1]["replies"] == 3
