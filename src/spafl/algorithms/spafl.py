"""SpaFL (Kim, Saad, Debbah, Hong; NeurIPS 2024): only per-unit thresholds travel.

Every client keeps its own weights for the whole run. Per round t the server
sends the global thresholds tau_g(t) to the sampled clients; each copies
them into its model, feeds the change of the global thresholds back into its
weights (the importance update), trains weights and thresholds on

    CE + c(t) * sum_layers sum_i exp(-tau_i)

and sends its thresholds back; the server averages them. Every reference
variant is a config key (see :class:`spafl.config.Config` and SPEC §3-§4).

Message names: ``thresholds/<layer>`` (tau_g down, tau_k up) and
``delta/<layer>`` (Delta tau_g, only with ``importance_delta=server_sends``
where the importance update needs it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spafl.algorithms.base import Algorithm, check_named_tensors, ClientData, ClientResult, ClientTask, Message, State
from spafl.data.batches import train_batches
from spafl.metrics.flops import batches_per_epoch, dense_macs_per_sample, training_flops
from spafl.nn import get_thresholds, masked_layers, num_masked_weights, set_thresholds
from spafl.nn.chain import RowGradients, chain_gradients, chain_stages
from spafl.seeding import generator

THRESHOLDS = "thresholds/"
DELTA = "delta/"


def pack(prefix: str, tensors: dict[str, torch.Tensor]) -> Message:
    return {prefix + name: tensor for name, tensor in tensors.items()}


def unpack(prefix: str, message: Message, expected: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix<layer>``; with ``expected``, all those layers must be present."""
    found = {name[len(prefix):]: tensor for name, tensor in message.items() if name.startswith(prefix)}
    if expected is not None and set(found) != set(expected):
        missing = sorted(set(expected) - set(found))
        raise ValueError(f"message lacks {prefix}* tensors for layers {missing[:5]} (has {sorted(message)[:5]}...)")
    return found


@torch.no_grad()
def importance_update(model: nn.Module, delta: dict[str, torch.Tensor], sign_rule: str) -> None:
    """Feed the global threshold change back into the weights, in place (SPEC §4 step 3).

    ``W_i,: -= delta_i * sign(...) / n_i'`` with n_i' = kh*kw for a conv and
    ``in`` for a linear. ``row_sum`` uses sign(sum_j W_ij) for the whole row
    (reference); ``per_weight`` uses sign(W_ij), so a rising threshold
    shrinks every |W_ij| of the unit.
    """
    for name, layer in masked_layers(model):
        weight = layer.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        change = delta[name].to(weight.device, weight.dtype).view(shape)
        if sign_rule == "row_sum":
            sign = torch.sign(weight.flatten(1).sum(dim=1)).view(shape)
        elif sign_rule == "per_weight":
            sign = torch.sign(weight)
        else:
            raise ValueError(f"unknown importance_sign {sign_rule!r}; allowed: row_sum, per_weight")
        weight.sub_(change * sign / layer.importance_fan_in)


def threshold_penalty_coefficient(th_coeff: float, warmup: float, round_index: int) -> float:
    """c(t): constant, or the FMNIST reference's sigmoid warm-up when ``warmup`` > 0."""
    if warmup <= 0:
        return th_coeff
    return th_coeff / (1.0 + math.exp(5.0 - 10.0 * round_index / warmup))


def add_penalty_gradient(thresholds: list[torch.Tensor], coefficient: float) -> None:
    """Add the gradient of ``coefficient * sum_i exp(-tau_i)``, that is ``-coefficient * exp(-tau)``, to each threshold's ``.grad``.

    Bit for bit what autograd gives when the penalty is part of the
    objective: autograd multiplies ``exp(-tau)`` by the coefficient (rounded
    to the thresholds' dtype), negates, and sums with the loss's gradient;
    ``x - y`` equals ``x + (-y)`` exactly. Four list operations instead of
    building and differentiating the penalty's graph, about 45 operators
    per step for LeNet-5's four layers.
    """
    with torch.no_grad():
        terms = torch._foreach_exp(torch._foreach_neg(thresholds))
        torch._foreach_mul_(terms, coefficient)
        for threshold, term in zip(thresholds, terms):
            if threshold.grad is None:
                threshold.grad = term.neg_()
            else:
                threshold.grad.sub_(term)


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


def steps_by_rows(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`momentum_step` can stand in for ``optimizer.step()``: plain SGD with momentum, nothing else."""
    return type(optimizer) is torch.optim.SGD and all(
        group["momentum"] > 0 and group["dampening"] == 0 and group["weight_decay"] == 0 and not torch.is_tensor(group["lr"])
        and not (group["nesterov"] or group["maximize"] or group["fused"] or group.get("differentiable"))
        for group in optimizer.param_groups
    )


@torch.no_grad()
def momentum_step(optimizer: torch.optim.SGD, rows: RowGradients) -> None:
    """``optimizer.step()`` (SGD with momentum, see :func:`steps_by_rows`), where the weights in ``rows`` have only their kept rows' gradient.

    Bit for bit what ``optimizer.step()`` does with each such weight's
    full-size gradient (0 outside the rows): ``buf = momentum * buf + grad``,
    ``param -= lr * buf``. Adding a 0 leaves every value as it is (a -0.0
    can become +0.0, which compares equal). So the ``index_add_`` of the
    rows does the second pass, without writing, scattering and adding a
    full-size gradient: for LeNet-5's fc1, three passes over 1.6 MB fewer
    per step. Parameters without a gradient (frozen thresholds) are skipped,
    as ``optimizer.step()`` skips them. Each pass runs over all parameters
    at once (``torch._foreach_*``), with the same arithmetic per value.
    """
    for group in optimizer.param_groups:
        params, buffers, decaying, dense, dense_grads, by_rows = [], [], [], [], [], []
        for param in group["params"]:
            kept = rows.get(param)
            if kept is None and param.grad is None:
                continue
            state = optimizer.state[param]
            buf = state.get("momentum_buffer")
            if buf is None:  # the first step: the buffer is the gradient
                if kept is None:
                    buf = param.grad.detach().clone()
                else:
                    buf = torch.zeros_like(param).index_copy_(0, kept[0], kept[1])
                state["momentum_buffer"] = buf
            else:
                decaying.append(buf)
                if kept is None:
                    dense.append(buf)
                    dense_grads.append(param.grad)
                else:
                    by_rows.append((buf, kept))
            params.append(param)
            buffers.append(buf)
        if decaying:
            torch._foreach_mul_(decaying, group["momentum"])
        if dense:
            torch._foreach_add_(dense, dense_grads)
        for buf, (index, grad) in by_rows:
            buf.index_add_(0, index, grad)
        if params:
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its bookkeeping (0.15 ms for LeNet-5's eight parameters)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


class LocalStep:
    """A local SGD step's gradients and update: by hand for a chain model, by autograd otherwise.

    A model that is a chain of masked layers in compact execution is
    differentiated by hand (:mod:`spafl.nn.chain`, bit-identical to
    autograd); plain momentum SGD without gradient clipping then updates it
    from the kept rows' gradients (:func:`momentum_step`, bit-identical to
    ``optimizer.step()``). Between :meth:`gradients` and :meth:`update`, the
    ``.grad`` of every other parameter can be changed (penalty, clipping).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0) -> None:
        self.model, self.optimizer = model, optimizer
        self.chain = chain_stages(model)
        self.by_rows = self.chain is not None and grad_clip <= 0 and steps_by_rows(optimizer)
        self.rows: RowGradients = {}

    def gradients(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the batch; the gradients are in ``.grad`` (and the kept rows')."""
        if self.chain is None:
            loss = F.cross_entropy(self.model(inputs), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return loss
        zero_grad(self.optimizer)
        self.rows.clear()
        return chain_gradients(self.chain, inputs, labels, self.rows if self.by_rows else None)

    def update(self) -> None:
        if self.rows:
            momentum_step(self.optimizer, self.rows)  # type: ignore[arg-type]
        else:
            self.optimizer.step()


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
    penalty: float = 0.0,
    thresholds_trainable: Callable[[int], bool] | None = None,
    threshold_clip: float = 0.0,
) -> tuple[float, int]:
    """Minibatch SGD over the client's data; returns (mean CE loss, batches run).

    The order of samples and any augmentation come from a generator seeded
    by (seed, client, round) only. ``thresholds_trainable(epoch)`` says
    whether thresholds get gradients in that epoch (None: never touched).
    A trailing batch of one sample is skipped when the model has BatchNorm
    (training-mode BatchNorm cannot normalize a single sample). Each step is
    a :class:`LocalStep` (by hand for a chain model).
    """
    rng = generator(task.seed, "client_train", task.client_id, task.round_index)
    layers = [layer for _, layer in masked_layers(model)]
    thresholds = [layer.threshold for layer in layers]
    skip_singletons = has_batchnorm(model)
    model.train()
    step = LocalStep(model, optimizer, grad_clip)
    total_loss = 0.0
    steps = 0
    n = data.num_train
    for epoch in range(epochs):
        if thresholds_trainable is not None:
            trainable = thresholds_trainable(epoch)
            for layer in layers:
                layer.threshold.requires_grad_(trainable)
        order = torch.randperm(n, generator=rng)
        for inputs, labels in train_batches(data, order, batch_size, rng, skip_singletons):
            inputs = inputs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = step.gradients(inputs, labels)
            if penalty > 0 and thresholds and thresholds[0].requires_grad:
                add_penalty_gradient(thresholds, penalty)
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            step.update()
            if threshold_clip > 0:
                with torch.no_grad():
                    for layer in layers:
                        layer.threshold.clamp_(-threshold_clip, threshold_clip)
            total_loss += float(loss.detach())
            steps += 1
    for layer in layers:
        layer.threshold.requires_grad_(True)
    return (total_loss / steps if steps else float("nan")), steps


class SpaFL(Algorithm):
    """SpaFL: personalized structured-sparse models, thresholds-only communication."""

    name = "spafl"
    personal_evaluation = True
    own_keys = frozenset({
        "optimizer_scope", "th_coeff", "th_coeff_warmup", "ste", "threshold_schedule", "importance_update",
        "importance_sign", "importance_delta", "aggregation_weighting", "frozen_weights", "collapse_guard", "threshold_clip",
    })

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        probe = spec.factory()
        self.layer_names = [name for name, _ in masked_layers(probe)]
        self.dense_macs = dense_macs_per_sample(probe, spec.input_shape)
        self.num_thresholds = sum(layer.num_units for _, layer in masked_layers(probe))
        self.num_masked_weights = num_masked_weights(probe)

    # -- state -----------------------------------------------------------------
    def _thresholds_of(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: weights[f"{name}.threshold"].clone() for name in self.layer_names}

    def init_server(self, initial_model):
        thresholds = self._thresholds_of(initial_model)
        return {"thresholds": thresholds, "delta": {n: torch.zeros_like(t) for n, t in thresholds.items()}}

    def init_client(self, client_id, initial_model):
        state: State = {"model": initial_model, "optimizer": None}
        if self.config.importance_delta == "since_last_seen" and self.config.importance_update != "off":
            state["last_seen"] = self._thresholds_of(initial_model)
        return state

    # -- messages --------------------------------------------------------------
    def _sends_delta_down(self) -> bool:
        c = self.config
        return c.importance_update == "before_training" and c.importance_delta == "server_sends" and not c.frozen_weights

    def server_message(self, server, client_id, round_index):
        message = pack(THRESHOLDS, server["thresholds"])
        if self._sends_delta_down():
            message.update(pack(DELTA, server["delta"]))
        return message

    @property
    def may_broadcast(self) -> bool:
        return self.config.importance_update == "all_after_aggregation" and not self.config.frozen_weights

    def broadcast_message(self, server, round_index):
        c = self.config
        if not self.may_broadcast:
            return None
        if c.importance_delta == "server_sends":
            return pack(DELTA, server["delta"])
        return pack(THRESHOLDS, server["thresholds"])

    def _received_delta(self, client: State, message: Message) -> dict[str, torch.Tensor]:
        """Delta tau_g as this client can know it, and the client's new 'last seen'."""
        if self.config.importance_delta == "server_sends":
            return unpack(DELTA, message, self.layer_names)
        received = unpack(THRESHOLDS, message, self.layer_names)
        delta = {name: received[name] - client["last_seen"][name] for name in received}
        client["last_seen"] = {name: tensor.clone() for name, tensor in received.items()}
        return delta

    def client_receive(self, client, message, round_index):
        client = dict(client)
        delta = self._received_delta(client, message)
        model = self.workspace(client["model"])
        importance_update(model, delta, self.config.importance_sign)
        client["model"] = self.export(model)
        return client

    # -- local training --------------------------------------------------------
    def _optimizer(self, model: nn.Module, client: State, round_index: int) -> torch.optim.Optimizer:
        return client_optimizer(model.parameters(), self.config, client, round_index)

    @staticmethod
    def _export_optimizer(optimizer: torch.optim.Optimizer) -> dict:
        return export_optimizer(optimizer)

    def client_update(self, client, message, data, task):
        c = self.config
        client = dict(client)
        model = self.workspace(client["model"])
        received = unpack(THRESHOLDS, message, self.layer_names)
        if c.importance_update == "before_training" and not c.frozen_weights:
            delta = self._received_delta(client, message)
            set_thresholds(model, received)
            importance_update(model, delta, c.importance_sign)
        else:
            set_thresholds(model, received)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith("threshold") or not c.frozen_weights)
        optimizer = self._optimizer(model, client, task.round_index)
        schedule = (lambda epoch: True) if c.threshold_schedule == "every_step" else (lambda epoch: epoch == c.local_epochs - 1)
        loss, steps = train_local(
            model, data, task,
            epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
            grad_clip=c.grad_clip,
            penalty=threshold_penalty_coefficient(c.th_coeff, c.th_coeff_warmup, task.round_index),
            thresholds_trainable=schedule, threshold_clip=c.threshold_clip,
        )
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        densities = {name: layer.density() for name, layer in masked_layers(model)}
        flops = training_flops(
            self.dense_macs, densities, data.num_train, c.local_epochs,
            c.local_epochs * batches_per_epoch(data.num_train, c.batch_size), self.num_thresholds, self.num_masked_weights,
        )
        client["model"] = self.export(model)
        client["optimizer"] = self._export_optimizer(optimizer) if c.optimizer_scope == "persistent" else None
        up = pack(THRESHOLDS, {name: tensor.to("cpu") for name, tensor in get_thresholds(model).items()})
        return ClientResult(client, up, {"train_loss": loss, "steps": steps, "flops": flops, "num_samples": data.num_train})

    # -- server ----------------------------------------------------------------
    def validate_reply(self, server, reply):
        expected = {name: (tuple(t.shape), t.dtype) for name, t in server["thresholds"].items()}
        return check_named_tensors(reply.message, THRESHOLDS, expected, "thresholds")

    def aggregate(self, server, replies, round_index):
        old = server["thresholds"]
        if not replies:
            return {"thresholds": old, "delta": {n: torch.zeros_like(t) for n, t in old.items()}}
        if self.config.aggregation_weighting == "samples" and sum(r.num_samples for r in replies) > 0:
            weights = [float(r.num_samples) for r in replies]
        else:
            weights = [1.0] * len(replies)
        total = sum(weights)
        new = {}
        for name in old:
            stacked = torch.stack([unpack(THRESHOLDS, r.message)[name].to(old[name].dtype) for r in replies])
            coefficients = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1))) / total
            new[name] = (stacked * coefficients).sum(dim=0)
        return {"thresholds": new, "delta": {name: new[name] - old[name] for name in old}}

    def evaluation_state(self, client, server):
        return client["model"]
