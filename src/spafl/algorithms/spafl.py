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

The collapse guard (:class:`spafl.nn.MaskedLayer`) acts at every forward
pass, evaluation included, on the kept fraction of the pass before, as in
the reference: evaluating a client is part of its history. A layer at
<= 1 % in a client's last training forward pass is reset at the client's
first evaluation batch; one that fell to <= 1 % only with the last
optimizer step is reset at the second batch (clients evaluate in the
reference's batches, ``eval_batch_size=0``; with one test batch, at the
client's next forward pass). The client keeps the reset thresholds and the
kept fraction its evaluation last measured, so the global thresholds it
receives next are reset at its next round only if its own last forward
pass had collapsed. Rows count the resets (``guard_resets_train``,
``guard_resets_eval``). The reference evaluates every client after every
round; with ``eval_every`` > 1 or an ``eval_clients`` subset, clients make
fewer forward passes between rounds and the guard acts accordingly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spafl.algorithms.aggregate import stacked_mean
from spafl.algorithms.base import Algorithm, ClientResult, Message, State, check_named_tensors, pack, unpack
from spafl.algorithms.local_sgd import Hooks, client_optimizer, export_optimizer, train_local
from spafl.metrics.evaluation import ClientEval, evaluate_client
from spafl.metrics.flops import batches_per_epoch, dense_macs_per_sample, training_flops
from spafl.nn import COLLAPSE_FRACTION, get_thresholds, layer_densities, masked_layers, num_masked_weights, set_thresholds

THRESHOLDS = "thresholds/"
DELTA = "delta/"


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

    Bit for bit what autograd gives when the penalty is part of the objective
    (``x - y`` equals ``x + (-y)`` exactly), in four list operations instead
    of the penalty's graph (about 45 operators per step for LeNet-5).
    """
    with torch.no_grad():
        terms = torch._foreach_exp(torch._foreach_neg(thresholds))
        torch._foreach_mul_(terms, coefficient)
        for threshold, term in zip(thresholds, terms):
            if threshold.grad is None:
                threshold.grad = term.neg_()
            else:
                threshold.grad.sub_(term)


class SpaFL(Algorithm):
    """SpaFL: personalized structured-sparse models, thresholds-only communication."""

    name = "spafl"
    personal_evaluation = True
    reports_true_flops = True

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        probe = spec.factory()
        self.layer_names = [name for name, _ in masked_layers(probe)]
        self.dense_macs = dense_macs_per_sample(probe, spec.input_shape)
        self.true_macs = dense_macs_per_sample(probe, spec.input_shape, count="true")
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
    def server_message(self, server, client_id, round_index):
        c = self.config
        message = pack(THRESHOLDS, server["thresholds"])
        if c.importance_update == "before_training" and c.importance_delta == "server_sends" and not c.frozen_weights:
            message.update(pack(DELTA, server["delta"]))
        return message

    @property
    def has_collapse_guard(self) -> bool:
        return self.config.collapse_guard

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
    def _hooks(self, model: nn.Module, round_index: int) -> Hooks:
        """SpaFL's additions to local SGD: when thresholds train, their penalty's gradient, optional clipping."""
        c = self.config
        thresholds = [layer.threshold for _, layer in masked_layers(model)]
        penalty = threshold_penalty_coefficient(c.th_coeff, c.th_coeff_warmup, round_index)

        def epoch_start(epoch: int) -> None:
            trainable = c.threshold_schedule == "every_step" or epoch == c.local_epochs - 1
            for threshold in thresholds:
                threshold.requires_grad_(trainable)

        def after_gradients() -> None:
            if penalty > 0 and thresholds and thresholds[0].requires_grad:
                add_penalty_gradient(thresholds, penalty)

        @torch.no_grad()
        def clip() -> None:
            for threshold in thresholds:
                threshold.clamp_(-c.threshold_clip, c.threshold_clip)

        return Hooks(epoch_start, after_gradients, clip if c.threshold_clip > 0 else None)

    def client_update(self, client, message, data, task):
        c = self.config
        client = dict(client)
        model = self.workspace(client["model"])
        updates_now = c.importance_update == "before_training" and not c.frozen_weights
        delta = self._received_delta(client, message) if updates_now else None
        set_thresholds(model, unpack(THRESHOLDS, message, self.layer_names))
        if delta is not None:
            importance_update(model, delta, c.importance_sign)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith("threshold") or not c.frozen_weights)
        optimizer = client_optimizer(model.parameters(), c, client, task.round_index)
        resets_before = guard_resets(model)
        loss, steps = train_local(
            model, data, task, epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
            grad_clip=c.grad_clip, hooks=self._hooks(model, task.round_index),
        )
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        resets = guard_resets(model) - resets_before
        densities = layer_densities(model)
        batches = c.local_epochs * batches_per_epoch(data.num_train, c.batch_size)
        flops, flops_true = (
            training_flops(macs, densities, data.num_train, c.local_epochs, batches, self.num_thresholds, self.num_masked_weights)
            for macs in (self.dense_macs, self.true_macs)
        )
        client["model"] = self.export(model)
        client["optimizer"] = export_optimizer(optimizer) if c.optimizer_scope == "persistent" else None
        up = pack(THRESHOLDS, {name: tensor.to("cpu") for name, tensor in get_thresholds(model).items()})
        stats = {"train_loss": loss, "steps": steps, "flops": flops, "flops_true": flops_true, "num_samples": data.num_train,
                 "guard_resets": resets}
        return ClientResult(client, up, stats)

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
        new = {name: stacked_mean([unpack(THRESHOLDS, r.message)[name].to(old[name].dtype) for r in replies], weights) for name in old}
        return {"thresholds": new, "delta": {name: new[name] - old[name] for name in old}}

    def evaluation_state(self, client, server):
        return client["model"]

    def evaluate(self, weights, data, batch_size) -> ClientEval:
        """The client's own model on its test split, with per-layer densities and what the collapse guard did.

        ``after`` holds the weights as evaluating left them where the guard
        reset thresholds or the kept fractions changed; ``settled`` is False
        where evaluating them again would differ (a reset mid-evaluation, or
        a layer left at <= 1 %, which the next forward pass resets).
        """
        model = self.workspace(weights)
        layers = [layer for _, layer in masked_layers(model)]
        fired = guard_resets(model)
        kept = [float(layer.kept_fraction) for layer in layers]
        result = evaluate_client(model, data, batch_size, self.device)
        resets = guard_resets(model) - fired
        changed = resets > 0 or kept != [float(layer.kept_fraction) for layer in layers]
        collapsed = any(layer.collapse_guard and float(layer.kept_fraction) <= COLLAPSE_FRACTION for layer in layers)
        result.layer_density = layer_densities(model)
        result.guard_resets = resets
        result.after = self.export(model) if changed else None
        result.settled = resets == 0 and not collapsed
        return result

    def absorb_evaluation(self, client, weights):
        return {**client, "model": weights}


def guard_resets(model: nn.Module) -> int:
    """How many times the collapse guards of ``model``'s masked layers have fired since it was built."""
    return sum(layer.guard_resets for _, layer in masked_layers(model))
