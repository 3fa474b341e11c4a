"""Seconds per round on the fmnist-paper settings: reference-style path vs spafl's fast path.

Both paths run the same algorithm code on the same client states, in the
same process, timed interleaved (reference, fast, reference, fast, ...) so
that machine noise hits both alike. A timed round is what a round of
``spafl run`` does: train the sampled clients, aggregate, evaluate every
client.

* reference-style (``execution=reference``, ``workers=1``): run as the
  reference code runs, one client after another in one process with
  PyTorch's default threads; a per-sample dataset behind a ``DataLoader``,
  dense conv/linear layers with weights multiplied by the 0/1 mask,
  evaluation of all clients;
* reference-style in workers (``execution=reference``, default workers):
  the same, but with the fast path's worker processes (one per core, one
  thread each), which the reference code does not have;
* fast (``execution=fast``, default workers, what ``spafl run`` uses):
  contiguous client tensors, compact execution (only kept units are
  computed where that is exact), worker processes, evaluation of only the
  clients whose state changed.

Before each timed round the state is evaluated once, untimed, as a run
evaluates it at the end of the previous round; the fast path then
re-evaluates only the clients whose state the timed round changed (the
sampled ones), the reference-style path evaluates every client again.

Two starting points: a checkpoint of a fmnist-paper run at round >=
``--steady-round`` (the steady-state density; created once in ``--cache``
with the fast path and reused afterwards), and round 0 (the dense initial
model). Each repetition starts from a fresh copy of the same state.

The last line printed is one JSON object: ``ratio`` (steady state,
reference-style seconds / fast seconds), ``ratio_same_workers`` (the
reference-style path in workers / fast), both again from round 0
(``..._from_start``), the seconds, and the densities of the clients'
models at both starting points.

    python benchmarks/round_time.py [--cache DIR] [--steady-round 100] [--repeats 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from spafl.config import build_config, parse_assignment
from spafl.engine import checkpoint as ckpt
from spafl.runtime.federation import build_federation
from spafl.engine.simulator import Simulator
from spafl.errors import UserError

#: Each timed path: its name and the settings it runs with (over the benchmark's config).
PATHS = {
    "reference": {"execution": "reference", "workers": 1},
    "reference_workers": {"execution": "reference"},
    "fast": {"execution": "fast"},
}


def steady_checkpoint(cache: Path, config, steady_round: int) -> dict:
    """A checkpoint of ``config`` at round >= ``steady_round``, made (or finished) in ``cache`` if needed."""
    saved = ckpt.load_checkpoint(cache) if (cache / ckpt.CHECKPOINT).exists() else None
    if saved is not None and saved["round"] >= steady_round:
        return saved
    print(f"round_time: creating the round-{steady_round} checkpoint in {cache} (once; resumable)", file=sys.stderr, flush=True)
    making = config.replace(rounds=steady_round, eval_every=10, checkpoint_every=10, execution="fast")
    Simulator(making, cache, progress=True).run(resume=saved is not None)
    return ckpt.load_checkpoint(cache)


#: Rounds of one path that differ by more than this fraction mean the timing was disturbed.
SPREAD_WARNING = 0.3


def time_round(simulator: Simulator, state: dict, round_index: int) -> tuple[float, dict]:
    began = time.perf_counter()
    simulator.run_round(state, round_index)
    evaluation = simulator.evaluate_state(state)
    return time.perf_counter() - began, evaluation


def compare(simulators: dict[str, Simulator], make_state, repeats: int) -> dict:
    """Median seconds per path over ``repeats`` interleaved rounds, each from a new copy of the same state."""
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    evaluations = {}
    for _ in range(repeats):
        for path in PATHS:
            state = make_state(simulators[path])
            simulators[path].evaluate_state(state)  # untimed: the evaluation a run did at the end of the previous round
            round_index = state["round"]
            elapsed, evaluations[path] = time_round(simulators[path], state, round_index)
            seconds[path].append(elapsed)
            del state
    median = {path: statistics.median(values) for path, values in seconds.items()}
    return {
        "round": round_index + 1,
        **{f"{path}_seconds": round(median[path], 3) for path in PATHS},
        "ratio": round(median["reference"] / median["fast"], 3),
        "ratio_same_workers": round(median["reference_workers"] / median["fast"], 3),
        "all_seconds": {path: [round(s, 3) for s in values] for path, values in seconds.items()},
        # slowest / fastest round of each path, minus 1: how much the machine disturbed the timing
        "spread": {path: round(max(values) / min(values) - 1, 3) for path, values in seconds.items()},
        "density_after": round(evaluations["fast"]["density"], 4),
        "density_weighted_after": round(evaluations["fast"]["density_weighted"], 4),
        "accuracy_after": {path: round(evaluations[path]["accuracy"], 3) for path in PATHS},
    }


def warn_if_disturbed(label: str, spread: dict[str, float]) -> None:
    """Say on stderr when rounds of one path differ by more than :data:`SPREAD_WARNING`: the machine was busy."""
    disturbed = {path: value for path, value in spread.items() if value > SPREAD_WARNING}
    if disturbed:
        listed = ", ".join(f"{path} {100 * value:.0f} %" for path, value in disturbed.items())
        print(
            f"round_time: from {label}, the slowest round exceeded the fastest by {listed}; something else was using "
            "the CPU, so the ratios are not reliable: run again on a quiet machine",
            file=sys.stderr, flush=True,
        )


def start_density(simulator: Simulator, state: dict) -> tuple[float, float]:
    evaluation = simulator.evaluate_state(state)
    return round(evaluation["density"], 4), round(evaluation["density_weighted"], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "spafl", "bench-fmnist-paper"))
    parser.add_argument("--steady-round", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a fmnist-paper setting")
    args = parser.parse_args()
    try:
        overrides = dict(parse_assignment(text) for text in args.set)
        config = build_config("fmnist-paper", overrides=overrides)
    except UserError as error:
        parser.exit(2, f"round_time: {error}\n")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    saved = steady_checkpoint(cache, config, args.steady_round)

    with tempfile.TemporaryDirectory() as scratch:
        dataset = build_federation(config).dataset
        simulators = {}
        for path, settings in PATHS.items():
            path_config = config.replace(**settings)
            simulators[path] = Simulator(path_config, Path(scratch) / path, build_federation(path_config, dataset), progress=False)
        starts = {
            "steady": lambda simulator: simulator.restore_state(copy.deepcopy(saved)),
            "start": lambda simulator: simulator.fresh_state(),
        }
        density_steady = start_density(simulators["fast"], starts["steady"](simulators["fast"]))
        density_start = start_density(simulators["fast"], starts["start"](simulators["fast"]))
        results = {}
        for label, make_state in starts.items():
            results[label] = compare(simulators, make_state, args.repeats)
            print(json.dumps({"start": label, **results[label]}), flush=True)
            warn_if_disturbed(label, results[label]["spread"])
    print(json.dumps({
        "benchmark": "round_time",
        "ratio": results["steady"]["ratio"],
        "ratio_from_start": results["start"]["ratio"],
        "ratio_same_workers": results["steady"]["ratio_same_workers"],
        "ratio_same_workers_from_start": results["start"]["ratio_same_workers"],
        "steady_round": saved["round"],
        "density": density_steady[0],
        "density_weighted": density_steady[1],
        "density_from_start": density_start[0],
        "density_weighted_from_start": density_start[1],
        **{f"{path}_seconds": results["steady"][f"{path}_seconds"] for path in PATHS},
        **{f"{path}_seconds_from_start": results["start"][f"{path}_seconds"] for path in PATHS},
        "spread_max": max(spread for result in results.values() for spread in result["spread"].values()),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "settings": {key: value for key, value in config.to_dict().items() if key in ("num_clients", "clients_per_round", "local_epochs", "batch_size", "threads", "workers")},
    }))


if __name__ == "__main__":
    main()
