"""Personalized evaluation (SPEC §5): every client, its own model, its own test split."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spafl.data.batches import test_batches
from spafl.errors import UserError
from spafl.nn import model_density


@dataclass
class ClientEval:
    """One client's evaluation: counts, not ratios, so means can be taken either way."""

    correct: int
    loss_sum: float
    num_test: int
    majority_correct: int
    density: float
    density_weighted: float
    #: per masked layer, kept weights / all weights (methods that report it: SpaFL)
    layer_density: dict[str, float] | None = None
    #: collapse-guard resets while evaluating (SpaFL; None where there is no guard)
    guard_resets: int | None = None
    #: the evaluated weights as evaluating left them, where that changed them (the collapse guard): the engine
    #: stores them as the client's (:meth:`Algorithm.absorb_evaluation`); never sent over a network
    after: dict | None = field(default=None, repr=False)
    #: whether evaluating ``after`` (or the weights given, when ``after`` is None) again gives this same result
    settled: bool = True


@torch.no_grad()
def evaluate_model(model: nn.Module, data, batch_size: int, device: torch.device) -> tuple[int, float]:
    """(correct predictions, summed cross-entropy) of ``model`` on the client's test split."""
    model.eval()
    correct = 0
    loss_sum = 0.0
    for inputs, labels in test_batches(data, batch_size):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return correct, loss_sum


def majority_correct(train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int) -> int:
    """Test hits of a predictor that always answers the client's most frequent training class.

    Ties go to the lowest class index; a client without training data answers class 0.
    """
    if test_y.numel() == 0:
        return 0
    counts = torch.bincount(train_y, minlength=num_classes)
    majority = int(counts.argmax()) if train_y.numel() else 0
    return int((test_y == majority).sum())


def evaluate_client(model: nn.Module, data, batch_size: int, device: torch.device) -> ClientEval:
    correct, loss_sum = evaluate_model(model, data, batch_size, device)
    density, density_weighted = model_density(model)
    return ClientEval(
        correct=correct,
        loss_sum=loss_sum,
        num_test=data.num_test,
        majority_correct=majority_correct(data.train_y, data.test_y, data.num_classes),
        density=density,
        density_weighted=density_weighted,
    )


def summarize(evals: list[ClientEval]) -> dict[str, float]:
    """Round metrics from per-client evaluations.

    ``accuracy`` and ``accuracy_majority`` are unweighted means over clients
    that have test data (percent), ``accuracy_std_clients`` the (population)
    standard deviation of per-client accuracy; ``accuracy_weighted`` pools all test
    samples; ``loss`` is the pooled mean test cross-entropy; densities are
    means over all evaluated clients, ``density_layers`` per masked layer
    (where every evaluation reports it); ``guard_resets_eval`` the collapse
    guard's resets summed over clients (where the method has the guard).
    """
    with_data = [e for e in evals if e.num_test > 0]
    total = sum(e.num_test for e in with_data)
    if not with_data:
        raise UserError("no evaluated client has test data; evaluate more clients (eval_clients=0 evaluates all)")
    per_client = [100.0 * e.correct / e.num_test for e in with_data]
    mean = sum(per_client) / len(per_client)
    return {
        "accuracy": mean,
        "accuracy_std_clients": (sum((a - mean) ** 2 for a in per_client) / len(per_client)) ** 0.5,
        "accuracy_weighted": 100.0 * sum(e.correct for e in with_data) / total,
        "accuracy_majority": 100.0 * sum(e.majority_correct / e.num_test for e in with_data) / len(with_data),
        "loss": sum(e.loss_sum for e in with_data) / total,
        "density": sum(e.density for e in evals) / len(evals),
        "density_weighted": sum(e.density_weighted for e in evals) / len(evals),
        "clients_evaluated": len(with_data),
        **_layer_figures(evals),
    }


def _layer_figures(evals: list[ClientEval]) -> dict[str, object]:
    figures: dict[str, object] = {}
    if evals and all(e.layer_density is not None and e.layer_density.keys() == evals[0].layer_density.keys() for e in evals):
        names = list(evals[0].layer_density)
        figures["density_layers"] = {name: sum(e.layer_density[name] for e in evals) / len(evals) for name in names}
    if any(e.guard_resets is not None for e in evals):
        figures["guard_resets_eval"] = sum(e.guard_resets or 0 for e in evals)
    return figures
