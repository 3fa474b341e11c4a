"""Local training: every client trains its own dense model and never communicates.

Each client starts from the common initial model and trains all its
weights (masking off, thresholds frozen, as in
:class:`spafl.algorithms.fedavg.FedAvg`, see :mod:`spafl.algorithms.dense`) for E local epochs with SGD at the
round's lr. A client trains ONLY in the rounds in which it is sampled, so
its compute budget is the same as under the federated methods; a client
that is never sampled keeps the initial model. Each client is evaluated
with its own model on its own test split.

Messages are empty both ways (0 bits) and the server has no state. The
client state is its model, plus its SGD state across rounds when
``optimizer_scope=persistent`` (as in SpaFL); with ``per_round`` a fresh
SGD each round. All clients share the initial weights dict until they
train; it is never modified in place.
"""

from __future__ import annotations

from spafl.algorithms.base import ClientResult
from spafl.algorithms.dense import DenseAlgorithm
from spafl.algorithms.local_sgd import export_optimizer


class Local(DenseAlgorithm):
    """Local-only baseline: personal dense models, no communication."""

    name = "local"
    reports_true_flops = True
    personal_evaluation = True

    def init_server(self, initial_model):
        return {}

    def init_client(self, client_id, initial_model):
        return {"model": initial_model, "optimizer": None}

    def server_message(self, server, client_id, round_index):
        return {}

    def client_update(self, client, message, data, task):
        model = self.workspace(client["model"])
        optimizer, stats = self.train_dense(model, data, task, client)
        persistent = self.config.optimizer_scope == "persistent"
        state = {"model": self.export(model), "optimizer": export_optimizer(optimizer) if persistent else None}
        return ClientResult(state, {}, stats)

    def validate_reply(self, server, reply):
        if reply.message:
            return f"local training sends nothing, got tensors {sorted(reply.message)[:3]}"
        return None

    def aggregate(self, server, replies, round_index):
        return server

    def evaluation_state(self, client, server):
        return client["model"]
