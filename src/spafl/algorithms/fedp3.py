"""FedP3 (Yi, Gazagnadou, Richtárik, Lyu; ICLR 2024, "FedP3: Federated Personalized and
Privacy-friendly Network Pruning under Model Heterogeneity"), its OPU2/OPU3 variants.

Sources: the paper and its public code (``SonyResearch/FedP3``, ``main.py`` and
``models/distributed_training_utils.py``). What that code does, in our words:

* **Layer assignment.** Of the model's L layers, the last is the final layer
  and the other M = L - 1 are the body. Client k's group is
  ``g = floor(k * M / N)`` (the code's ``int(client.id / 25)`` for N = 100
  and M = 4: blocks of consecutive client ids). Under OPU2 it uploads body
  layers ``g`` and ``(g + 1) mod M`` plus the final layer; under OPU3 body
  layers ``g, g + 1, g + 2 (mod M)`` plus the final layer. Here the layers are
  the model's masked layers in module order (a layer's bias, if any, travels
  with its weight). For LeNet-5 (conv1, conv2, fc1 | fc2; M = 3) OPU2 gives
  group 0: conv1, conv2, fc2; group 1: conv2, fc1, fc2; group 2: fc1,
  conv1, fc2 (the pairs wrap around, as in the code); OPU3 uploads all four.
* **Server -> client.** Every layer the client does not upload is
  magnitude-pruned per layer to keep ``fedp3_global_keep`` of its weights
  (the code's ``global_prune = 0.9``: the ``round(0.9 * n_l)`` largest |w|
  here, ``int(0.9 * n_l)`` there, the same for LeNet-5); the client's upload
  layers come dense. A pruned layer travels as its kept values (float32, in
  row-major order) plus its mask (a bool tensor: a 1-bit-per-weight bitmask);
  a dense one as float32: ``weights/<key>``, ``kept/<key>`` + ``mask/<key>``.
* **The final layer** is never sent down in the code: ``synchronize_with_server``
  copies only the body layers, so each client keeps its own final layer
  (a personal head) although it uploads it every round and the server
  averages it. ``fedp3_final_layer = personal`` does that; ``global``
  (default) sends the server's final layer down dense, as the paper's
  description (the client receives the whole pruned global model) reads.
* **Client.** The received layers replace the client's; the final layer
  (``personal``) and any parameter outside the masked layers (BatchNorm,
  unmasked layers: none in LeNet-5) stay the client's own. Optional local
  pruning (``fedp3_local_prune`` = p > 0) then prunes ``round(p * kept)`` of
  every layer's kept weights by magnitude. The client trains this
  subnetwork for E local epochs (:mod:`spafl.algorithms.masked_training`:
  pruned weights stay exactly 0) and uploads its upload layers dense,
  float32, ``weights/<key>``.
* **Server.** Per layer, the mean over the replies that carry it
  (``fedp3_weighting = uniform``: the code's default ``aggregation=mean``;
  ``samples``: weighted by training-sample counts, uniform when all are 0);
  a layer nobody uploaded keeps its value.
* **Client state and evaluation.** A client keeps its trained model and its
  masks until it is next sampled, and is evaluated with that model on its own
  test split (personal evaluation, as the code's ``client.evaluate``); a
  client never sampled keeps the initial model (dense). Reported density:
  the masks' kept fractions (server pruning and local pruning), in both
  definitions (layer mean, parameter-weighted).

Deviations from the code, and why:

* The code hard-codes full participation (``m = num_users``, "TODO: allow
  partial participation"); here K of N clients are sampled per round like
  every other spafl method, so a round's layers are averaged over the
  sampled clients of the groups that upload them.
* In the code the pruned weights are zeroed when received but trained like
  the others (no mask), so they grow back during local training; here the
  client trains the pruned subnetwork (they stay 0), as the paper describes
  it ("clients train a subset of the global model").
* The code has no local pruning (the paper names several local pruning
  strategies); ``fedp3_local_prune`` defaults to 0 (off), as the code runs.
  It prunes by magnitude, per layer, from the round's received mask.
* The code's optimizer (lr 0.01 decayed by 0.997 per round, no momentum,
  gradient-norm clip 10) is not fixed by the paper; the run's lr, momentum,
  ``lr_decay`` and ``grad_clip`` apply, with a fresh SGD every round.

Bits per round for LeNet-5 (K = clients per round; n = 500, 25,000,
400,000, 5,000 for conv1, conv2, fc1, fc2; keep = 0.9; client k in group
``g = floor(3k / N)``)::

    bits_up   = sum_k 32 * sum_{l in U_g} n_l
    bits_down = sum_k [ sum_{l in D_g, l in U_g} 32 * n_l + sum_{l in D_g, l not in U_g} (32 * round(keep * n_l) + n_l) ]

with D = all four layers (``global``) or all but fc2 (``personal``). Per
client, OPU2::

    group  uploads            up            down (personal)   down (global)
    0      conv1, conv2, fc2     976,000    12,736,000        12,896,000
    1      conv2, fc1, fc2    13,760,000    13,614,900        13,774,900
    2      fc1, conv1, fc2    12,976,000    13,561,000        13,721,000

(down, group 0, personal: 32 * (500 + 25,000) + 32 * 360,000 + 400,000.)
OPU3 uploads every layer: up 32 * 430,500 = 13,776,000 per client, down
32 * 425,500 = 13,616,000 (personal) or 13,776,000 (global).

FLOPs: the reference formula at density 1.0 in every layer (the masked
computation is dense).
"""

from __future__ import annotations

import torch

from spafl.algorithms.base import ClientResult, check_named_tensors, pack, unpack
from spafl.algorithms.dense import WEIGHTS
from spafl.algorithms.masked_training import MASK, MaskedDenseAlgorithm, pack_kept, unpack_kept
from spafl.algorithms.weight_masks import full_masks, magnitude_masks, prune_fraction

#: body layers each client uploads (besides the final layer)
UPLOAD_WIDTH = {"opu2": 2, "opu3": 3}


class FedP3(MaskedDenseAlgorithm):
    """FedP3: server-pruned subnetworks per client; each client uploads its group's layers and the final layer."""

    name = "fedp3"
    personal_evaluation = True

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        #: the state-dict entries of each masked layer that travel with it (weight, then bias)
        self.entries = {
            layer: [key for key in (f"{layer}.weight", f"{layer}.bias") if key in self.weight_shapes]
            for layer in self.layer_names
        }
        self.final = self.layer_names[-1]
        self.body = self.layer_names[:-1]

    # -- who uploads what ---------------------------------------------------------------
    def upload_layers(self, client_id: int) -> list[str]:
        """The layers client ``client_id`` trains for the server: its group's consecutive body layers, then the final layer."""
        if not self.body:
            return [self.final]
        group = client_id * len(self.body) // self.config.num_clients
        chosen = {(group + j) % len(self.body) for j in range(UPLOAD_WIDTH[self.config.fedp3_upload])}
        return [self.body[i] for i in sorted(chosen)] + [self.final]

    def sent_layers(self) -> list[str]:
        """The layers the server sends down (all, or all but the final layer when it is personal)."""
        return self.layer_names if self.config.fedp3_final_layer == "global" else self.body

    # -- state ------------------------------------------------------------------------------
    def init_server(self, initial_model):
        return {"model": dict(initial_model)}  # a new dict; the tensors are never changed in place

    def init_client(self, client_id, initial_model):
        return {"model": initial_model, "masks": None}  # masks None: dense

    # -- messages ---------------------------------------------------------------------------
    def server_message(self, server, client_id, round_index):
        model, keep = server["model"], self.config.fedp3_global_keep
        uploads = set(self.upload_layers(client_id))
        message = {}
        for layer in self.sent_layers():
            key = f"{layer}.weight"
            if layer in uploads or keep >= 1.0:
                message[WEIGHTS + key] = model[key]
            else:
                message.update(pack_kept(model, magnitude_masks(model, {key: keep})))
            message.update(pack(WEIGHTS, {entry: model[entry] for entry in self.entries[layer][1:]}))
        return message

    def _received(self, own: dict[str, torch.Tensor], message) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The client's model with the received layers in place of its own, and the masks of the round."""
        pruned = {key: mask.to(torch.bool) for key, mask in unpack(MASK, message).items()}
        weights = {**own, **unpack(WEIGHTS, message), **unpack_kept(message, pruned)}
        return weights, {**full_masks(self.mask_shapes), **pruned}

    # -- local training ---------------------------------------------------------------------
    def client_update(self, client, message, data, task):
        weights, masks = self._received(client["model"], message)
        if self.config.fedp3_local_prune > 0:
            masks = prune_fraction(masks, weights, self.config.fedp3_local_prune)
        model = self.workspace(weights)
        loss, steps = self.train_masked(model, masks, data, task)
        trained = self.export(model)
        up = pack(WEIGHTS, {entry: trained[entry] for layer in self.upload_layers(task.client_id) for entry in self.entries[layer]})
        stats = {"train_loss": loss, "steps": steps, "flops": self.dense_flops(data.num_train), "num_samples": data.num_train}
        return ClientResult({"model": trained, "masks": masks}, up, stats)

    # -- server -----------------------------------------------------------------------------
    def validate_reply(self, server, reply):
        expected = {
            entry: (self.weight_shapes[entry], self.weight_dtypes[entry])
            for layer in self.upload_layers(reply.client_id) for entry in self.entries[layer]
        }
        return check_named_tensors(reply.message, WEIGHTS, expected, f"upload layers of client {reply.client_id}")

    def aggregate(self, server, replies, round_index):
        model = dict(server["model"])
        for layer in self.layer_names:
            senders = [reply for reply in replies if WEIGHTS + f"{layer}.weight" in reply.message]
            if not senders:
                continue  # nobody uploaded this layer: it keeps its value
            weights = [float(reply.num_samples) for reply in senders]
            if self.config.fedp3_weighting == "uniform" or sum(weights) <= 0:
                weights = [1.0] * len(senders)
            total = sum(weights)
            for entry in self.entries[layer]:
                mean = torch.zeros(model[entry].shape, dtype=torch.float64)
                for reply, weight in zip(senders, weights):
                    mean.add_(reply.message[WEIGHTS + entry].to(torch.float64), alpha=weight / total)
                model[entry] = mean.to(model[entry].dtype)
        return {"model": model}

    def evaluation_state(self, client, server):
        return self.evaluation_weights(client["model"], client["masks"])
