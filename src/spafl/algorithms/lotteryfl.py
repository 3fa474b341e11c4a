"""LotteryFL (Li, Sun, Wang, Cao, Li, Wang, Chen; 2020/2021, "LotteryFL: Personalized and
Communication-Efficient Federated Learning with Lottery Ticket Hypothesis on Non-IID Datasets",
IEEE SEC 2021 as "LotteryFL: Empower Edge Intelligence with Personalized and Communication-Efficient
Federated Learning").

Sources: the paper and its public code (``charleslipku/LotteryFL``,
``src/lotteryFL.py``, ``src/update.py``, ``src/utils.py``, ``README.md``).
What that code does, in our words:

* Each client holds a personal per-weight mask over the global model
  (initially all ones). Its model in a round is the global model under its
  mask.
* Before training, the client measures the accuracy of that model. If the
  accuracy exceeds ``lotteryfl_start_acc`` (``prune_start_acc``) and its
  density is above ``lotteryfl_end_density`` (``prune_end_rate``, the kept
  fraction it aims at), it prunes ``lotteryfl_prune_percent`` % of each
  layer's remaining weights, those of smallest magnitude, and rewinds the
  whole model to the initial weights of the run under the new mask (the
  lottery ticket). The density can end below the target by up to one
  pruning step (the code's README says so too).
* It trains the masked model (gradients of pruned weights zeroed) and sends
  its masked weights and its mask.
* The server averages per coordinate over the clients whose masks keep it,
  ``sum_k w_k / sum_k m_k`` (unweighted), and coordinates no reply keeps
  retain their old global value (``average_weights_with_masks`` then
  ``mix_global_weights``). Entries outside the masked layers (biases,
  BatchNorm: none in LeNet-5) are averaged over all replies.
* A client is evaluated with the global model under its own mask.

Defaults: the code's README commands all use ``prune_percent=20``; its
MNIST and EMNIST commands ``prune_start_acc=0.5`` (CIFAR-10: 0.1); its
argparse default and CIFAR-10 command ``prune_end_rate=0.5`` (MNIST,
EMNIST: 0.1). Here: 20 %, 0.5, 0.5.

What travels (``kept/<key>``: the kept values of a masked weight in
row-major order, float32; ``mask/<key>``: a bool mask, a 1-bit-per-weight
bitmask on the channel; ``weights/<key>``: any other float entry, dense):

* down: the global weights at the positions of the client's mask as the
  server knows it (``kept/<key>``), no mask: the server keeps every client's
  last uploaded mask (bit-packed, N/8 bytes per client whose mask prunes
  something, in its state) and the client its own. A client that has never
  replied has a full mask. The two copies agree as long as every reply
  that a client sends is aggregated; a client whose reply was lost after it
  trained (a Flower node that answered too late) no longer matches the
  server's copy, and its next update fails with an error that says so.
  (Flower's evaluate messages carry the whole server state, the masks
  included.)
* up: ``kept/<key>`` at the positions of the client's new mask, and
  ``mask/<key>``.

Bits per round for LeNet-5 (K = clients per round, N = 430,500;
``|m_k|`` = kept weights of client k's mask before the round, ``|m'_k|``
after its pruning, if any)::

    bits_down = sum_k 32 * |m_k|
    bits_up   = sum_k (32 * |m'_k| + 430,500)

A mask starts full (430,500) and each pruning removes ``round(0.2 * kept)``
per layer: 500, 25,000, 400,000, 5,000 -> 400, 20,000, 320,000, 4,000
(344,400 in all) -> 320, 16,000, 256,000, 3,200 (275,520). So a client that
prunes in its first round sends 32 * 344,400 + 430,500 = 11,451,300 bits
up after receiving 32 * 430,500 = 13,776,000.

Deviations from the code, and why:

* The code measures the pre-training accuracy on (at most two batches of)
  the client's *test* split, so test data steer the pruning; here it is
  measured on the client's whole training split.
* The code prints each client's best accuracy ever seen ("best_acc"); spafl
  reports the final round's, like every other method.
* The code tracks the density as a nominal product ``prod (1 - p)`` and
  prunes below a percentile of |w| (ties and interpolation aside); here
  each pruning removes exactly ``round(p * kept)`` weights per layer
  (:func:`spafl.algorithms.weight_masks.prune_fraction`) and the density
  compared with the target is the mask's parameter-weighted kept fraction.
* The code hard-codes SGD with momentum 0.5 (lr 0.01, 10-sample batches);
  here the run's optimizer settings apply, with a fresh SGD each round.

FLOPs: the reference formula at density 1.0 (the masked computation is
dense), plus one forward pass over the training split (the accuracy check).
"""

from __future__ import annotations

import dataclasses

import torch

from spafl.algorithms.base import ClientResult, check_named_tensors, pack, unpack
from spafl.algorithms.dense import WEIGHTS
from spafl.algorithms.masked_training import KEPT, MASK, MaskedDenseAlgorithm, pack_kept, unpack_kept
from spafl.algorithms.weight_masks import Masks, apply_masks, full_masks, mask_densities, prune_fraction
from spafl.metrics.evaluation import evaluate_model

_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's elements (row-major) as bits, eight to a uint8, the first in the highest bit (as ``np.packbits``)."""
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (padded * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed.view(-1, 1) & _BIT_VALUES).ne(0).view(-1)
    return bits[:numel].view(shape)


class LotteryFL(MaskedDenseAlgorithm):
    """LotteryFL: personal masks pruned by magnitude with rewinding to the initial weights; masked averaging."""

    name = "lotteryfl"

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        #: float entries outside the masked layers' weights (biases, BatchNorm): dense both ways
        self.other_names = [name for name in self.weight_names if name not in self.mask_shapes]
        self._initial: dict[str, torch.Tensor] | None = None

    @property
    def initial(self) -> dict[str, torch.Tensor]:
        """The common initial model of the run, to which a pruning client rewinds."""
        if self._initial is None:
            self._initial = self.spec.initial_state(self.config.seed)
        return self._initial

    # -- state ------------------------------------------------------------------------------
    def init_server(self, initial_model):
        # masks: client id (str) -> {weight key: bit-packed mask}, for clients whose last uploaded mask prunes something
        return {"model": dict(initial_model), "masks": {}}

    def init_client(self, client_id, initial_model):
        return {"mask": None}  # None: nothing pruned yet

    def server_mask(self, server, client_id: int) -> Masks:
        """Client ``client_id``'s mask as the server knows it (from its last accepted reply; full before any)."""
        packed = server.get("masks", {}).get(str(client_id))
        if packed is None:
            return full_masks(self.mask_shapes)
        return {key: unpack_bits(packed[key], shape) for key, shape in self.mask_shapes.items()}

    # -- messages ---------------------------------------------------------------------------
    def server_message(self, server, client_id, round_index):
        model = server["model"]
        message = pack_kept(model, self.server_mask(server, client_id), with_masks=False)
        message.update(pack(WEIGHTS, {name: model[name] for name in self.other_names}))
        return message

    def _received(self, mask: Masks, message) -> dict[str, torch.Tensor]:
        """The global model under ``mask`` as a full state dict, from a down message."""
        for key, values in unpack(KEPT, message, list(self.mask_shapes)).items():
            if values.numel() != int(mask[key].sum()):
                raise ValueError(
                    f"{key}: the server sent {values.numel()} kept values for a mask that keeps {int(mask[key].sum())}; "
                    "the server's copy of this client's mask differs from the client's (a reply was lost)"
                )
        return {**self.untransmitted, **unpack(WEIGHTS, message, self.other_names), **unpack_kept(message, mask)}

    # -- local training ---------------------------------------------------------------------
    def train_accuracy(self, model, data) -> float:
        """Accuracy of ``model`` on the client's training split (0 without training data)."""
        if data.num_train == 0:
            return 0.0
        on_train = dataclasses.replace(data, test_x=data.train_x, test_y=data.train_y)
        correct, _ = evaluate_model(model, on_train, self.config.evaluation_batch, self.device)
        return correct / data.num_train

    def client_update(self, client, message, data, task):
        c = self.config
        mask = client["mask"] if client["mask"] is not None else full_masks(self.mask_shapes)
        weights = self._received(mask, message)
        model = self.workspace(weights)
        accuracy = self.train_accuracy(model, data)
        pruned = client["mask"] is not None
        if accuracy > c.lotteryfl_start_acc and mask_densities(mask)[1] > c.lotteryfl_end_density:
            mask = prune_fraction(mask, weights, c.lotteryfl_prune_percent / 100.0)
            model = self.workspace(self.initial)  # rewind: train_masked applies the new mask
            pruned = True
        loss, steps = self.train_masked(model, mask, data, task)
        trained = self.export(model)
        up = pack_kept(trained, mask)
        up.update(pack(WEIGHTS, {name: trained[name] for name in self.other_names}))
        stats = {
            "train_loss": loss, "steps": steps, "num_samples": data.num_train,
            "flops": self.dense_flops(data.num_train, extra_forward_samples=data.num_train),
        }
        return ClientResult({"mask": mask if pruned else None}, up, stats)

    # -- server -----------------------------------------------------------------------------
    def validate_reply(self, server, reply):
        message = reply.message
        expected = {MASK + key for key in self.mask_shapes} | {KEPT + key for key in self.mask_shapes}
        expected |= {WEIGHTS + name for name in self.other_names}
        if set(message) != expected:
            return f"tensor names differ from masks, kept values and other weights (missing {sorted(expected - set(message))[:3]}, " \
                   f"unexpected {sorted(set(message) - expected)[:3]})"
        known = self.server_mask(server, reply.client_id)
        for key, shape in self.mask_shapes.items():
            mask, values = message[MASK + key], message[KEPT + key]
            if mask.dtype != torch.bool or tuple(mask.shape) != shape:
                return f"{key}: mask of dtype {mask.dtype} and shape {tuple(mask.shape)}, expected bool {shape}"
            if bool((mask & ~known[key]).any()):
                return f"{key}: the mask keeps weights the client had pruned"
            if values.dtype != self.weight_dtypes[key] or tuple(values.shape) != (int(mask.sum()),):
                return f"{key}: {tuple(values.shape)} kept values of dtype {values.dtype}, expected ({int(mask.sum())},) {self.weight_dtypes[key]}"
            if not torch.isfinite(values).all():
                return f"{key}: non-finite kept values"
        others = {name: tensor for name, tensor in message.items() if name.startswith(WEIGHTS)}
        shapes = {name: (self.weight_shapes[name], self.weight_dtypes[name]) for name in self.other_names}
        return check_named_tensors(others, WEIGHTS, shapes, "weights outside the masked layers")

    def aggregate(self, server, replies, round_index):
        if not replies:
            return server
        model, stored = dict(server["model"]), dict(server.get("masks", {}))
        masks = [{key: reply.message[MASK + key] for key in self.mask_shapes} for reply in replies]
        for key in self.mask_shapes:
            total = torch.zeros(model[key].shape, dtype=torch.float64)
            count = torch.zeros(model[key].shape, dtype=torch.float64)
            for reply, mask in zip(replies, masks):
                total.add_(unpack_kept(reply.message, {key: mask[key]})[key].to(torch.float64))
                count.add_(mask[key].to(torch.float64))
            mean = total / count.clamp(min=1.0)
            model[key] = torch.where(count > 0, mean, model[key].to(torch.float64)).to(model[key].dtype)
        for name in self.other_names:
            stacked = torch.stack([reply.message[WEIGHTS + name].to(torch.float64) for reply in replies])
            model[name] = stacked.mean(dim=0).to(model[name].dtype)
        for reply, mask in zip(replies, masks):
            if all(bool(m.all()) for m in mask.values()):
                stored.pop(str(reply.client_id), None)
            else:
                stored[str(reply.client_id)] = {key: pack_bits(m) for key, m in mask.items()}
        return {"model": model, "masks": stored}

    def evaluation_state(self, client, server):
        if client["mask"] is None:
            return server["model"]
        return self.evaluation_weights(apply_masks(server["model"], client["mask"]), client["mask"])
