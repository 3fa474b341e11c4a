"""What the dense baselines (FedAvg, Local) share: masking off, thresholds frozen, every weight trained.

The model is built from masked layers (:mod:`spafl.nn`); a dense algorithm
switches masking off in its workspace (:func:`spafl.nn.set_masking`), so
every layer is a plain dense layer, thresholds take no part and are never
trained, and the reported density is 1.0. The tensors that travel are
``weights/<state-dict key>`` for every floating-point entry of the model's
state dict except the masked layers' ``*.threshold`` and ``*.kept_fraction``.
"""

from __future__ import annotations

import torch
from torch import nn

from spafl.algorithms.base import Algorithm, ClientData, ClientTask, Message, State, check_named_tensors
from spafl.algorithms.local_sgd import client_optimizer, train_local
from spafl.metrics.flops import batches_per_epoch, dense_macs_per_sample, training_flops
from spafl.nn import masked_layers, set_masking

WEIGHTS = "weights/"


class DenseAlgorithm(Algorithm):
    """Base of the dense baselines: masking off, thresholds frozen, all weights trained."""

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        probe = spec.factory()
        self.dense_macs = dense_macs_per_sample(probe, spec.input_shape)
        self.true_macs = dense_macs_per_sample(probe, spec.input_shape, count="true")
        self.full_density = {name: 1.0 for name in self.dense_macs}
        self.frozen = {f"{name}.{part}" for name, _ in masked_layers(probe) for part in ("threshold", "kept_fraction")}
        state = probe.state_dict()
        #: state-dict entries that travel: floating point, not a threshold or kept fraction
        self.weight_names = [k for k, v in state.items() if v.is_floating_point() and k not in self.frozen]
        self.weight_shapes = {k: tuple(state[k].shape) for k in self.weight_names}
        self.weight_dtypes = {k: state[k].dtype for k in self.weight_names}
        #: the rest of a fresh model's state: thresholds 0, kept fractions 1, BN counters 0
        transmitted = set(self.weight_names)
        self.untransmitted = {k: v.detach().clone() for k, v in state.items() if k not in transmitted}

    def workspace(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The shared working model, always dense (masking off)."""
        return set_masking(super().workspace(weights), False)

    def _freeze_thresholds(self, model: nn.Module) -> list[nn.Parameter]:
        """Thresholds get no gradient; returns the parameters that are trained."""
        trained = []
        for name, parameter in model.named_parameters():
            frozen = name in self.frozen
            parameter.requires_grad_(not frozen)
            if not frozen:
                trained.append(parameter)
        return trained

    def train_dense(
        self, model: nn.Module, data: ClientData, task: ClientTask, optimizer_state: State,
    ) -> tuple[torch.optim.Optimizer, dict[str, float]]:
        """E local epochs of SGD on all weights (thresholds frozen, no penalty); returns (optimizer, stats)."""
        c = self.config
        optimizer = client_optimizer(self._freeze_thresholds(model), c, optimizer_state, task.round_index)
        loss, steps = train_local(
            model, data, task,
            epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
            grad_clip=c.grad_clip,
        )
        batches = c.local_epochs * batches_per_epoch(data.num_train, c.batch_size)
        flops, flops_true = (
            training_flops(macs, self.full_density, data.num_train, c.local_epochs, batches, num_thresholds=0, num_masked_weights=0)
            for macs in (self.dense_macs, self.true_macs)
        )
        return optimizer, {"train_loss": loss, "steps": steps, "flops": flops, "flops_true": flops_true, "num_samples": data.num_train}

    def check_weights(self, message: Message) -> str | None:
        """Why ``message`` is not exactly the model's transmitted tensors (None: it is)."""
        expected = {name: (self.weight_shapes[name], self.weight_dtypes[name]) for name in self.weight_names}
        return check_named_tensors(message, WEIGHTS, expected, "weights")
