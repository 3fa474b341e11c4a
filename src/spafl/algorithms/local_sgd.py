"""Local training, shared by every algorithm: epochs of minibatch SGD on a client's data.

:func:`train_local` runs the epochs and batches; what an algorithm adds to
plain SGD comes in as :class:`Hooks` (SpaFL's threshold schedule, penalty
and clipping are its hooks). The optimizer is momentum SGD at the round's
learning rate (:func:`round_lr`), fresh each round or resumed from the
client's saved state (:func:`client_optimizer`, ``optimizer_scope``); global
gradient-norm clipping is ``grad_clip``. A step is the model's
``training_step`` where the engine gave it one (compact execution:
:class:`spafl.fast.LocalStep`, the same results computed faster), else
:class:`AutogradStep`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spafl.algorithms.base import ClientData, ClientTask, State
from spafl.data.batches import train_batches
from spafl.seeding import generator


@dataclass(frozen=True)
class Hooks:
    """What an algorithm adds to plain local SGD, each called at its moment of every run of :func:`train_local`."""

    #: before epoch ``e`` (0-based) starts
    epoch_start: Callable[[int], None] | None = None
    #: after the loss's gradients are in ``.grad``, before clipping and the update
    after_gradients: Callable[[], None] | None = None
    #: after the optimizer's update
    after_update: Callable[[], None] | None = None


NO_HOOKS = Hooks()


class AutogradStep:
    """One SGD step by autograd: the loss's gradients into ``.grad`` (:meth:`gradients`), then ``optimizer.step()``.

    Between the two, the ``.grad`` of every parameter may be changed (hooks, clipping).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0) -> None:
        self.model, self.optimizer = model, optimizer

    def gradients(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model(inputs), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def update(self) -> None:
        self.optimizer.step()


def round_lr(lr: float, lr_decay: float, lr_min: float, round_index: int) -> float:
    return max(lr * lr_decay**round_index, lr_min)


def client_optimizer(parameters, config, client: State, round_index: int) -> torch.optim.Optimizer:
    """SGD at round ``round_index``'s lr; with ``optimizer_scope=persistent`` it resumes the client's saved state.

    The saved state is ``client["optimizer"]`` (None before the client's
    first round); the saved lr is overridden by the round's lr.
    """
    c = config
    lr = round_lr(c.lr, c.lr_decay, c.lr_min, round_index)
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
    if c.optimizer_scope == "persistent" and client.get("optimizer") is not None:
        optimizer.load_state_dict(client["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = lr
    return optimizer


def export_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every tensor copied to the CPU (for the client state)."""
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {key: (value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value) for key, value in slot.items()}
        for index, slot in saved["state"].items()
    }
    return saved


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_local(
    model: nn.Module,
    data: ClientData,
    task: ClientTask,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip: float,
    hooks: Hooks = NO_HOOKS,
) -> tuple[float, int]:
    """Minibatch SGD over the client's data; returns (mean CE loss, batches run).

    The order of samples and any augmentation come from a generator seeded
    by (seed, client, round) only. A client without training samples takes
    no step (loss NaN, 0 batches). A trailing batch of one sample is skipped
    when the model has BatchNorm (training-mode BatchNorm cannot normalize a
    single sample).
    """
    n = data.num_train
    if n == 0:
        return float("nan"), 0
    rng = generator(task.seed, "client_train", task.client_id, task.round_index)
    skip_singletons = has_batchnorm(model)
    model.train()
    step = getattr(model, "training_step", AutogradStep)(model, optimizer, grad_clip)
    total_loss = 0.0
    steps = 0
    for epoch in range(epochs):
        if hooks.epoch_start is not None:
            hooks.epoch_start(epoch)
        order = torch.randperm(n, generator=rng)
        for inputs, labels in train_batches(data, order, batch_size, rng, skip_singletons):
            inputs = inputs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = step.gradients(inputs, labels)
            if hooks.after_gradients is not None:
                hooks.after_gradients()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            step.update()
            if hooks.after_update is not None:
                hooks.after_update()
            total_loss += float(loss.detach())
            steps += 1
    return (total_loss / steps if steps else float("nan")), steps
