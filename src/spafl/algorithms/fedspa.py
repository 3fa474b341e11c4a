"""FedSpa (Huang, Liu, Shen, Tao, Ye, Wang; 2022, "Achieving Personalized Federated Learning
with Sparse Local Models", arXiv 2201.11380): personal sparse masks of fixed density,
sparse-to-sparse local training with prune-and-regrow, sparse updates to one dense global model.

What it does. Every client k has a personal 0/1 mask m_k over the masked
layers' weights with a fixed density d (``fedspa_density``, default 0.5:
half of the weights kept, as in the paper's experiments), spread over the
layers by Erdős–Rényi-Kernel (ERK, :func:`~spafl.algorithms.weight_masks.erk_densities`);
its initial mask is random within each layer, drawn from (seed, k), so
server and client build it alike without sending it. The server holds one
dense global model w_g.

One round t, per sampled client k:

1. down: the global weights at the client's mask positions only, per layer
   a 1-D float32 tensor of the kept values in row-major mask order (the
   client knows its mask); plus every other floating-point parameter
   (biases, BatchNorm; none in LeNet-5) dense.
2. the client starts from ``w = m_k ⊙ w_g`` and trains E local epochs of
   SGD (config ``lr``, ``momentum``...; a fresh optimizer each round) on
   the kept weights only: pruned weights are zero, their gradients are
   zeroed after every backward pass and they are set to zero again after
   every update (:class:`spafl.algorithms.local_sgd.Hooks`).
3. mask search: with ``α_t = fedspa_prune_rate * (1 + cos(π t / T)) / 2``
   (T = ``rounds``; cosine-annealed towards 0), each layer prunes its
   ``round(α_t * kept_l)`` kept weights of smallest magnitude, then regrows
   as many positions not kept after pruning, those of largest gradient
   magnitude. The gradient is that of the client's LAST local step (the
   dense gradient of the loss w.r.t. every weight, taken before masking;
   no extra batch). A newly grown weight starts at 0; a weight pruned and
   regrown in the same search keeps its trained value (RigL's default).
   So a layer's kept count never changes, and a dense layer (ERK makes
   small layers dense) never changes at all.
4. up: the sparse update ``w_trained - w_start`` at the mask positions the
   round started with (1-D float32 per layer, the order of step 1), dense
   updates of the other parameters, and, for each layer whose mask changed
   in step 3, the new mask (bool: 1 bit per weight).
5. server: per coordinate, the mean of the received updates over the
   clients whose (round-start) mask holds it is ADDED to w_g (coordinates
   no client holds keep their value; the other parameters get the plain
   mean update). Replies from clients with no training sample (a zero
   update) are left out of the mean. The server then stores the new masks:
   it keeps every client's current mask (only those that differ from the
   initial one take space), so it can place the next values.

Evaluation (personalized, ``personal_evaluation``): each client's own sparse
model, the weights it trained in its last round under its new mask, on its
own test split; a client never sampled evaluates the initial model under
its initial mask. Density: from its mask, layer-mean and weighted (the
weighted density is d up to rounding of the per-layer counts).

FLOPs: dense. The pruned weights are zeros inside dense conv/linear
kernels, forward and backward, so every layer counts at density 1.0 in
:func:`spafl.metrics.flops.training_flops` (the paper's sparse-kernel figure
would scale each layer's forward by its density d_l).

Bits per round, per direction (exact; K sampled clients, n_l weights and
k_l = round(d_l^ERK * n_l) kept weights of masked layer l; M = the total
size of the layers whose mask changed)::

    down = K * 32 * Σ_l k_l
    up   = K * 32 * Σ_l k_l + Σ_clients M_k

For LeNet-5 (N_w = 430,500) at d = 0.5, ERK keeps conv1 (500) and fc2
(5,000) dense and conv2 12,159 of 25,000, fc1 197,591 of 400,000: Σ k_l =
215,250 = 0.5 * N_w, so ``down = K * 6,888,000`` and, while α_t > 0 changes
both sparse layers' masks, ``up = K * (6,888,000 + 425,000)``.

Deviations and choices (the paper leaves them open or we could not check
its code): the initial masks differ per client (random ERK); the update is
defined on the round-start mask (the server knows it, so no mask needs to
travel with the values); gradients for regrowth come from the last local
step; the server mean is uniform over the clients holding a coordinate
(a public third-party port subtracts the update, i.e. flips its sign: here
the update is ``trained - start`` and it is added); ``optimizer_scope``
does not apply (a fresh SGD every round).
"""

from __future__ import annotations

import math

import torch

from spafl.algorithms.base import ClientResult, check_named_tensors, pack, unpack
from spafl.algorithms.dense import DenseAlgorithm
from spafl.algorithms.local_sgd import Hooks, client_optimizer, train_local
from spafl.algorithms.weight_masks import (
    MASKS, Masks, PerWeightMasking, apply_masks, apply_masks_, erk_densities, gather_kept, mask_gradients_,
    prune_smallest, random_masks, regrow_largest, scatter_kept,
)
from spafl.seeding import generator

VALUES = "values/"  # down: the global weights at the client's mask positions
UPDATE = "update/"  # up: the sparse update at the round-start mask positions
DENSE = "dense/"  # both ways: every other floating-point parameter (dense)
NEW_MASK = "mask/"  # up: a layer's new mask, when it changed
_MASK_ID = 7201  # distinguishes the initial-mask stream from the others of the same purpose


class FedSpa(PerWeightMasking, DenseAlgorithm):
    """FedSpa (Huang et al., 2022): personal fixed-density masks, prune-and-regrow, sparse updates."""

    name = "fedspa"
    personal_evaluation = True

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        self.layer_density = erk_densities(self.mask_shapes, config.fedspa_density)
        #: other floating-point parameters (biases, BatchNorm): they travel dense
        self.dense_names = [name for name in self.weight_names if name not in self.mask_shapes]
        self.initial = spec.initial_state(config.seed)

    def initial_masks(self, client_id: int) -> Masks:
        """Client ``client_id``'s initial mask: random per layer at its ERK density, from (seed, client)."""
        return random_masks(self.mask_shapes, self.layer_density, generator(self.config.seed, "model_init", _MASK_ID, client_id))

    def prune_rate(self, round_index: int) -> float:
        """α_t: ``fedspa_prune_rate`` cosine-annealed from round 0 towards 0 at round ``rounds``."""
        return self.config.fedspa_prune_rate * (1 + math.cos(math.pi * round_index / self.config.rounds)) / 2

    # -- state -----------------------------------------------------------------
    def init_server(self, initial_model):
        # masks: only those of clients whose mask differs from their initial one, by str(client id)
        return {"model": dict(initial_model), "masks": {}}

    def init_client(self, client_id, initial_model):
        # "masks"/"weights" appear once the client has trained; until then they derive from the id and the initial model
        return {"client_id": client_id}

    def _client_masks(self, client) -> Masks:
        return client["masks"] if "masks" in client else self.initial_masks(int(client["client_id"]))

    def _server_masks(self, server, client_id: int) -> Masks:
        return server.get("masks", {}).get(str(client_id)) or self.initial_masks(client_id)

    # -- messages --------------------------------------------------------------
    def server_message(self, server, client_id, round_index):
        model = server["model"]
        values = gather_kept(model, self._server_masks(server, client_id))
        return {**pack(VALUES, values), **pack(DENSE, {name: model[name] for name in self.dense_names})}

    # -- local training --------------------------------------------------------
    def client_update(self, client, message, data, task):
        c = self.config
        masks = self._client_masks(client)
        values = unpack(VALUES, message, list(self.mask_shapes))
        for key, mask in masks.items():
            if values[key].numel() != int(mask.sum()):
                raise ValueError(f"{key}: {values[key].numel()} values for a mask keeping {int(mask.sum())}")
        zeros = {key: torch.zeros(shape) for key, shape in self.mask_shapes.items()}
        start = {**self.untransmitted, **scatter_kept(values, masks, zeros), **unpack(DENSE, message, self.dense_names)}
        model = self.workspace(start)
        parameters = dict(model.named_parameters())
        device_masks = {key: mask.to(self.device) for key, mask in masks.items()}
        last_gradients: dict[str, torch.Tensor] = {}

        def after_gradients() -> None:
            for key in self.mask_shapes:  # the dense gradient of this step, kept for the regrowth
                last_gradients[key] = parameters[key].grad.detach().clone()
            mask_gradients_(model, device_masks)

        optimizer = client_optimizer(self._freeze_thresholds(model), c, {}, task.round_index)
        loss, steps = train_local(
            model, data, task, epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
            grad_clip=c.grad_clip, hooks=Hooks(after_gradients=after_gradients, after_update=lambda: apply_masks_(model, device_masks)),
        )
        trained = self.export(model)
        update = gather_kept({key: trained[key] - start[key] for key in self.mask_shapes}, masks)
        dense_update = {name: trained[name] - start[name] for name in self.dense_names}
        new_masks = self.search(masks, trained, last_gradients, task.round_index) if steps else masks
        changed = {key: new_masks[key] for key in self.mask_shapes if not torch.equal(new_masks[key], masks[key])}
        state = {
            "client_id": task.client_id,
            "masks": new_masks,
            "weights": apply_masks({name: trained[name] for name in self.weight_names}, new_masks),
        }
        up = {**pack(UPDATE, update), **pack(DENSE, dense_update), **pack(NEW_MASK, changed)}
        stats = {"train_loss": loss, "steps": steps, "flops": self.dense_flops(data.num_train), "num_samples": data.num_train}
        return ClientResult(state, up, stats)

    def search(self, masks: Masks, weights: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor], round_index: int) -> Masks:
        """Step 3: per layer, prune the ``round(α_t * kept)`` smallest kept weights, regrow as many by largest ``|gradient|``."""
        rate = self.prune_rate(round_index)
        searched = {}
        for key, mask in masks.items():
            count = int(round(rate * int(mask.sum())))
            pruned = prune_smallest(mask, weights[key], count)
            searched[key] = regrow_largest(pruned, gradients[key].abs(), count)
        return searched

    # -- server ----------------------------------------------------------------
    def validate_reply(self, server, reply):
        masks = self._server_masks(server, reply.client_id)
        message = reply.message
        unknown = [name for name in message if not name.startswith((UPDATE, DENSE, NEW_MASK))]
        if unknown:
            return f"unexpected tensors {unknown[:3]}"
        updates = {name: message[name] for name in message if name.startswith(UPDATE)}
        expected = {key: ((int(mask.sum()),), torch.float32) for key, mask in masks.items()}
        why = check_named_tensors(updates, UPDATE, expected, "masked weights' kept values")
        if why is None:
            dense = {name: message[name] for name in message if name.startswith(DENSE)}
            expected = {name: (self.weight_shapes[name], self.weight_dtypes[name]) for name in self.dense_names}
            why = check_named_tensors(dense, DENSE, expected, "other parameters")
        if why is not None:
            return why
        for key, new in unpack(NEW_MASK, message).items():
            if key not in masks:
                return f"a new mask for unknown layer {key}"
            if new.dtype != torch.bool or tuple(new.shape) != self.mask_shapes[key]:
                return f"{key}: new mask must be bool of shape {self.mask_shapes[key]}, got {new.dtype} {tuple(new.shape)}"
            if int(new.sum()) != int(masks[key].sum()):
                return f"{key}: new mask keeps {int(new.sum())} weights, the density is fixed at {int(masks[key].sum())}"
        return None

    def aggregate(self, server, replies, round_index):
        if not replies:
            return server
        model = dict(server["model"])
        trained = [reply for reply in replies if reply.num_samples > 0]  # the others sent a zero update
        held = {reply.client_id: self._server_masks(server, reply.client_id) for reply in replies}  # at the round's start
        for key, shape in self.mask_shapes.items():
            total = torch.zeros(math.prod(shape), dtype=torch.float64)
            holders = torch.zeros(math.prod(shape), dtype=torch.float64)
            for reply in trained:
                mask = held[reply.client_id][key].reshape(-1)
                total[mask] += reply.message[UPDATE + key].to(torch.float64)
                holders[mask] += 1
            mean = torch.where(holders > 0, total / holders.clamp(min=1), torch.zeros_like(total))
            model[key] = (model[key].to(torch.float64) + mean.view(shape)).to(model[key].dtype)
        for name in self.dense_names:
            if trained:
                mean = sum(reply.message[DENSE + name].to(torch.float64) for reply in trained) / len(trained)
                model[name] = (model[name].to(torch.float64) + mean).to(model[name].dtype)
        masks = dict(server.get("masks", {}))
        for reply in replies:
            changed = unpack(NEW_MASK, reply.message)
            if changed:
                masks[str(reply.client_id)] = {**held[reply.client_id], **changed}
        return {"model": model, "masks": masks}

    # -- evaluation ------------------------------------------------------------
    def evaluation_state(self, client, server):
        """The client's own sparse model (its trained weights, or the initial ones under its initial mask), with its masks."""
        masks = self._client_masks(client)
        weights = client["weights"] if "weights" in client else apply_masks(
            {name: self.initial[name] for name in self.weight_names}, masks,
        )
        return {**self.untransmitted, **weights, **pack(MASKS, masks)}
