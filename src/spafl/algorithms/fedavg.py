"""FedAvg (McMahan, Moore, Ramage, Hampson, Agüera y Arcas; AISTATS 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data").

One dense global model. Per round t the server sends the global weights to
the sampled clients; each loads them, trains all weights for E local epochs
with a fresh SGD (lr = ``round_lr(lr, lr_decay, lr_min, t)``, ``momentum``,
``weight_decay``, ``grad_clip`` from the config) and sends its weights back;
the server replaces the global weights by their mean weighted by the
clients' numbers of training samples (uniform if every client has 0). The
global model is evaluated on every client's own test split (SPEC §5), so
all clients report the same model.

The model is built from masked layers (:mod:`spafl.nn`); FedAvg switches
masking off in its workspace (:func:`spafl.nn.set_masking`), so every layer
is a plain dense layer, thresholds take no part and are never trained, and
the reported density is 1.0.

What travels (both ways, per sampled client): ``weights/<state-dict key>``
for every floating-point entry of the model's state dict except the masked
layers' ``*.threshold`` and ``*.kept_fraction``. That is every trainable
weight and bias, plus BatchNorm's ``running_mean`` / ``running_var`` for
models that have BatchNorm (they are averaged like weights); the integer
``num_batches_tracked`` does not travel (each client starts it from 0; it is
unused with BatchNorm's default momentum). For LeNet-5 the message is
exactly its 430,500 weights, so a round costs 2 · K · 430,500 · 32 bits.

Clients keep no state: there is no per-client model and no optimizer state
across rounds (``optimizer_scope`` does not apply). ``aggregation_weighting``
(SpaFL's threshold averaging) does not apply either: FedAvg always weights
by samples.

:class:`DenseAlgorithm` holds what FedAvg and :class:`spafl.algorithms.local.Local`
share: the dense workspace, the set of transmitted tensors and local
training with frozen thresholds.
"""

from __future__ import annotations

import torch
from torch import nn

from spafl.algorithms.base import Algorithm, check_named_tensors, ClientData, ClientResult, ClientTask, Message, State
from spafl.algorithms.spafl import client_optimizer, pack, train_local, unpack
from spafl.metrics.flops import batches_per_epoch, dense_macs_per_sample, training_flops
from spafl.nn import masked_layers, set_masking

WEIGHTS = "weights/"


class DenseAlgorithm(Algorithm):
    """Base of the dense baselines: masking off, thresholds frozen, all weights trained."""

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        probe = spec.factory()
        self.dense_macs = dense_macs_per_sample(probe, spec.input_shape)
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
            grad_clip=c.grad_clip, penalty=0.0, thresholds_trainable=None,
        )
        self._freeze_thresholds(model)  # train_local leaves thresholds trainable
        flops = training_flops(
            self.dense_macs, self.full_density, data.num_train, c.local_epochs,
            c.local_epochs * batches_per_epoch(data.num_train, c.batch_size), num_thresholds=0, num_masked_weights=0,
        )
        return optimizer, {"train_loss": loss, "steps": steps, "flops": flops, "num_samples": data.num_train}

    def check_weights(self, message: Message) -> str | None:
        """Why ``message`` is not exactly the model's transmitted tensors (None: it is)."""
        expected = {name: (self.weight_shapes[name], self.weight_dtypes[name]) for name in self.weight_names}
        return check_named_tensors(message, WEIGHTS, expected, "weights")


class FedAvg(DenseAlgorithm):
    """FedAvg (McMahan et al., AISTATS 2017): a dense global model, sample-weighted averaging."""

    name = "fedavg"

    # -- state -----------------------------------------------------------------
    def init_server(self, initial_model):
        return {"model": dict(initial_model)}  # a new dict; the tensors are never changed in place

    def init_client(self, client_id, initial_model):
        return {}  # stateless clients

    # -- messages --------------------------------------------------------------
    def server_message(self, server, client_id, round_index):
        return pack(WEIGHTS, {name: server["model"][name] for name in self.weight_names})

    # -- local training --------------------------------------------------------
    def client_update(self, client, message, data, task):
        received = unpack(WEIGHTS, message, self.weight_names)
        model = self.workspace({**self.untransmitted, **received})
        _, stats = self.train_dense(model, data, task, {})
        trained = self.export(model)
        up = pack(WEIGHTS, {name: trained[name] for name in self.weight_names})
        return ClientResult(client, up, stats)

    # -- server ----------------------------------------------------------------
    def validate_reply(self, server, reply):
        return self.check_weights(reply.message)

    def aggregate(self, server, replies, round_index):
        if not replies:
            return server
        weights = [float(r.num_samples) for r in replies]
        if sum(weights) <= 0:
            weights = [1.0] * len(replies)
        total = sum(weights)
        model = dict(server["model"])
        for name in self.weight_names:
            mean = torch.zeros(model[name].shape, dtype=torch.float64)
            for reply, weight in zip(replies, weights):
                mean.add_(reply.message[WEIGHTS + name].to(torch.float64), alpha=weight / total)
            model[name] = mean.to(model[name].dtype)
        return {"model": model}

    def evaluation_state(self, client, server):
        return server["model"]
