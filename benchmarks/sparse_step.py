"""Training-step and inference time of LeNet-5 and Conv4 at fixed densities, relative to dense.

Every hidden masked layer keeps the same fraction d of its units (the units
with the highest scores s_i = mean|W_i|), so its input channels shrink by d
as well; the last layer keeps all its units. Thresholds are frozen (the
paper's local epochs before the last), weights train with SGD + momentum.

For each model and density it times, interleaved in rounds so that machine
noise hits every configuration alike:

* ``train_compact`` / ``infer_compact``: compact execution, trained as
  ``spafl run`` trains it (LeNet-5, a chain model: gradients by hand and
  the momentum step from kept rows, ``spafl.fast.chain``; Conv4: autograd);
* ``train_masked`` / ``infer_masked``: the dense layer times the 0/1 mask (autograd).

Each figure is the median over rounds of the mean step time in a round.
Ratios are relative to the dense model (d = 1.0) on the same path, measured
in the same run. One JSON line per (model, density), then one JSON object
with everything.

    python benchmarks/sparse_step.py [--models lenet5,conv4] [--densities 1,0.5,0.25,0.1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from spafl import fast
from spafl.algorithms.local_sgd import AutogradStep
from spafl.models import build_model
from spafl.nn import layer_densities, masked_layers

SETTINGS = {  # model -> (input shape, batch size of its paper setting)
    "lenet5": ((1, 28, 28), 64),
    "conv4": ((3, 32, 32), 16),
}


def keep_fraction(model: torch.nn.Module, density: float) -> None:
    """Thresholds that keep the top ``density`` of each hidden layer's units and every unit of the last layer."""
    layers = [layer for _, layer in masked_layers(model)]
    with torch.no_grad():
        for position, layer in enumerate(layers):
            scores = layer.weight.abs().flatten(1).mean(dim=1)
            keep = layer.num_units if position == len(layers) - 1 else max(1, round(density * layer.num_units))
            if keep == layer.num_units:
                layer.threshold.fill_(float(scores.min()) - 1.0)
            else:
                ranked = scores.sort(descending=True).values
                layer.threshold.fill_(float(ranked[keep - 1] + ranked[keep]) / 2)
            layer.threshold.requires_grad_(False)


def make(name: str, density: float, compact: bool, seed: int = 0):
    torch.manual_seed(seed)
    shape, batch = SETTINGS[name]
    model = build_model(name, 10, shape[0])
    keep_fraction(model, density)
    if compact:
        fast.enable(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *shape) * 50
    y = torch.randint(0, 10, (batch,))
    return model, optimizer, x, y


def train_steps(model, optimizer, x, y, steps: int) -> float:
    model.train()
    step = getattr(model, "training_step", AutogradStep)(model, optimizer)  # as spafl.algorithms.local_sgd.train_local takes a step
    began = time.perf_counter()
    for _ in range(steps):
        step.gradients(x, y)
        step.update()
    return (time.perf_counter() - began) / steps


@torch.no_grad()
def infer_steps(model, optimizer, x, y, steps: int) -> float:
    model.eval()
    began = time.perf_counter()
    for _ in range(steps):
        model(x)
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,conv4")
    parser.add_argument("--densities", default="1,0.5,0.25,0.1")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds (median taken)")
    parser.add_argument("--steps", type=int, default=0, help="steps per round and configuration (0: about 0.2 s worth)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]
    if 1.0 not in densities:
        densities.insert(0, 1.0)
    results = []
    for name in args.models.split(","):
        configs = {}
        for density in densities:
            for compact in (True, False):
                configs[(density, compact)] = make(name, density, compact)
        steps = args.steps or max(3, round(0.2 / max(train_steps(*configs[(1.0, True)], steps=2), 1e-4)))
        times: dict[tuple, list[float]] = {(key, kind): [] for key in configs for kind in ("train", "infer")}
        for _ in range(args.rounds):
            for key, config in configs.items():
                times[(key, "train")].append(train_steps(*config, steps=steps))
                times[(key, "infer")].append(infer_steps(*config, steps=steps))
        median = {k: statistics.median(v) for k, v in times.items()}
        for density in densities:
            model = configs[(density, True)][0]
            row = {
                "model": name, "density": density,
                "layer_densities": {k: round(v, 4) for k, v in layer_densities(model).items()},
                "batch": SETTINGS[name][1], "steps_per_round": steps, "rounds": args.rounds,
            }
            for kind in ("train", "infer"):
                for compact, label in ((True, "compact"), (False, "masked")):
                    seconds = median[((density, compact), kind)]
                    row[f"{kind}_{label}_ms"] = round(seconds * 1e3, 3)
                    row[f"{kind}_{label}_ratio"] = round(seconds / median[((1.0, compact), kind)], 3)
            row["train_target_ratio"] = round(density + 0.15, 3)
            print(json.dumps(row), flush=True)
            results.append(row)
    print(json.dumps({
        "benchmark": "sparse_step", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(), "results": results,
    }))


if __name__ == "__main__":
    main()
