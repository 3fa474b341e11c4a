"""The hand-written training step of a chain model equals autograd's bit for bit."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from spafl.algorithms import ClientData, ClientTask
from spafl.algorithms.local_sgd import AutogradStep, Hooks, train_local
from spafl.algorithms.spafl import add_penalty_gradient
from spafl.data import preprocess_for
from spafl.models import build_model
from spafl.fast import disable, kernels, models as fast_models
from spafl.fast import enable as set_compact
from spafl.fast.chain import chain_gradients, chain_stages
from spafl.models import LeNet5
from spafl.nn import STE_NAMES, masked_layers


def lenet(ste: str, pruning: str) -> torch.nn.Module:
    """A compact LeNet-5 whose thresholds keep some units.

    ``mixed``: in every layer a third of the units far above their
    threshold (|s - tau| = 2, where ``outside_unit``'s derivative is 1), a
    third far below, the rest just below or above it. ``near``: every unit
    just below or above its threshold. ``all``: every unit kept;
    ``fc1_none``: no unit of fc1 kept.
    """
    torch.manual_seed(5)
    model = set_compact(build_model("lenet5", 10, 1, ste=ste))
    with torch.no_grad():
        for name, layer in masked_layers(model):
            scores = layer.weight.abs().flatten(1).mean(dim=1)
            units = torch.arange(layer.num_units)
            if pruning == "all" or (pruning == "fc1_none" and name != "fc1"):
                offsets = torch.full_like(scores, -1.0)
            elif pruning == "fc1_none":
                offsets = torch.full_like(scores, 1.0)
            else:
                offsets = near = torch.where(units % 2 == 0, 1e-4, -1e-4)
                if pruning == "mixed":
                    offsets = torch.where(units % 3 == 0, -2.0, torch.where(units % 3 == 1, 2.0, near))
            layer.threshold.copy_(scores + offsets)
    return model


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def layer_state(model: torch.nn.Module) -> list[tuple[int, float]]:
    return [(layer.computed_units, float(layer.kept_fraction)) for _, layer in masked_layers(model)]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """The thread count, and how often NNPACK computed a conv (conv2's, on one thread and a batch of 2 or more)."""
    calls = []
    nnpack = kernels._nnpack
    monkeypatch.setattr(kernels, "_nnpack", lambda *args: calls.append(1) or nnpack(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param, calls
    torch.set_num_threads(before)


def expected_nnpack(threads: int, batch: int) -> bool:
    return threads == 1 and batch > 1 and torch.backends.nnpack.is_available()


@pytest.mark.parametrize("pruning", ["mixed", "near", "all", "fc1_none"])
@pytest.mark.parametrize("thresholds", ["train", "frozen"])
@pytest.mark.parametrize("ste", STE_NAMES)
@pytest.mark.parametrize("batch", [7, 1])
def test_chain_gradients_are_autograds_bit_for_bit(ste, thresholds, pruning, batch, threads):
    by_autograd = lenet(ste, pruning)
    by_hand = copy.deepcopy(by_autograd)
    for model in (by_autograd, by_hand):
        for _, layer in masked_layers(model):
            layer.threshold.requires_grad_(thresholds == "train")
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 255
    y = torch.arange(batch) % 10

    expected = F.cross_entropy(by_autograd(x), y)
    expected.backward()
    stages = chain_stages(by_hand)
    assert stages is not None and [stage for _, stage in stages] == ["relu_pool2", "relu_pool2", "relu", "logits"]
    loss = chain_gradients(stages, x, y)

    assert torch.equal(loss, expected.detach())
    assert layer_state(by_hand) == layer_state(by_autograd)
    expected_grads, got = grads(by_autograd), grads(by_hand)
    for name, grad in expected_grads.items():
        if grad is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None and torch.equal(got[name], grad), name
    assert (expected_grads["conv1.threshold"] is None) == (thresholds == "frozen")
    if pruning in ("mixed", "near"):  # kept units only, in every hidden layer
        assert [units for units, _ in layer_state(by_hand)][:3] == [10, 25, 250]
    # forward and two gradients, by autograd and by hand
    assert len(threads[1]) == (6 if expected_nnpack(threads[0], batch) else 0)


def test_the_pruning_fixture_takes_each_path_of_the_logits_layer():
    """The logits layer computes kept units only where no pruned logit gets a gradient (5 of 10 kept)."""
    cases = [("identity", "mixed", 10), ("outside_unit", "mixed", 10), ("long_tailed", "near", 10), ("outside_unit", "near", 5)]
    for ste, pruning, computed in cases:
        model = lenet(ste, pruning)
        F.cross_entropy(model(torch.rand(2, 1, 28, 28) * 255), torch.tensor([0, 1])).backward()
        # outside_unit's derivative is 1 at a pruned logit with |s - tau| = 2, and 0 at one with |s - tau| = 1e-4
        assert model.fc2.computed_units == computed, (ste, pruning)
    frozen = lenet("identity", "mixed")
    for _, layer in masked_layers(frozen):
        layer.threshold.requires_grad_(False)
    F.cross_entropy(frozen(torch.rand(2, 1, 28, 28) * 255), torch.tensor([0, 1])).backward()
    assert frozen.fc2.computed_units == 5  # frozen thresholds: pruned logits are constants 0


def test_chain_applies_only_to_compact_chains_with_trainable_weights(monkeypatch):
    model = lenet("identity", "mixed")
    assert chain_stages(model) is not None
    assert chain_stages(disable(copy.deepcopy(model))) is None  # the masked dense (reference) path
    frozen = copy.deepcopy(model)
    frozen.conv2.weight.requires_grad_(False)
    assert chain_stages(frozen) is None
    assert chain_stages(set_compact(build_model("conv4", 10, 3))) is None  # declares no chain
    wrong = dataclasses.replace(fast_models.MODELS[LeNet5], chain=(("conv1", "relu_pool2"), ("fc2", "softmax")))
    monkeypatch.setitem(fast_models.MODELS, LeNet5, wrong)
    with pytest.raises(ValueError, match="unknown stages \\['softmax'\\]; allowed: relu_pool2, relu, logits"):
        chain_stages(model)


def test_train_local_by_hand_matches_autograd_over_two_epochs(threads):
    """Gradients by hand and the momentum step from kept rows, against autograd and ``optimizer.step()``."""
    images = torch.randint(0, 256, (45, 1, 28, 28), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    labels = torch.arange(45) % 10
    data = ClientData(images, labels, images[:5], labels[:5], preprocess_for("fmnist", "raw"), 10)
    results = []
    for by_hand in (True, False):
        model = lenet("identity", "mixed")
        if not by_hand:
            model.training_step = AutogradStep  # autograd through the same compact layers
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        thresholds = [layer.threshold for _, layer in masked_layers(model)]

        def last_epoch_only(epoch, thresholds=thresholds):
            for threshold in thresholds:
                threshold.requires_grad_(epoch == 1)

        def penalty(thresholds=thresholds):
            if thresholds[0].requires_grad:
                add_penalty_gradient(thresholds, 0.002)

        loss, steps = train_local(
            model, data, ClientTask(client_id=3, round_index=1, seed=0), epochs=2, batch_size=16, optimizer=optimizer,
            device=torch.device("cpu"), grad_clip=0.0, hooks=Hooks(epoch_start=last_epoch_only, after_gradients=penalty),
        )
        buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
        results.append((loss, steps, {k: v.clone() for k, v in model.state_dict().items()}, buffers))
    (loss_hand, steps_hand, hand, hand_buffers), (loss_auto, steps_auto, auto, auto_buffers) = results
    assert (loss_hand, steps_hand) == (loss_auto, steps_auto) and steps_hand == 6
    assert all(torch.equal(hand[name], auto[name]) for name in auto)
    assert all(torch.equal(a, b) for a, b in zip(hand_buffers, auto_buffers))
    assert not torch.equal(hand["fc1.threshold"], lenet("identity", "mixed").fc1.threshold)  # thresholds trained
    assert bool(threads[1]) == expected_nnpack(threads[0], 16)
