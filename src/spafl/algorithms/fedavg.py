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

:class:`spafl.algorithms.dense.DenseAlgorithm` holds what FedAvg and
:class:`spafl.algorithms.local.Local` share.
"""

from __future__ import annotations


from spafl.algorithms.aggregate import weighted_mean
from spafl.algorithms.base import ClientResult, pack, unpack
from spafl.algorithms.dense import WEIGHTS, DenseAlgorithm


class FedAvg(DenseAlgorithm):
    """FedAvg (McMahan et al., AISTATS 2017): a dense global model, sample-weighted averaging."""

    name = "fedavg"
    reports_true_flops = True

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
        model = dict(server["model"])
        for name in self.weight_names:  # validate_reply made every reply's dtype the model's
            model[name] = weighted_mean([reply.message[WEIGHTS + name] for reply in replies], weights)
        return {"model": model}

    def evaluation_state(self, client, server):
        return server["model"]
