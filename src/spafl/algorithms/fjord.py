"""FjORD (Horváth, Laskaridis, Almeida, Leontiadis, Venieris, Lane; NeurIPS 2021, "FjORD: Fair and
Accurate Federated Learning under heterogeneous targets with Ordered Dropout").

One global model trained with *ordered dropout*: a width p keeps the first
``ceil(p * C)`` output units of every hidden layer (with the matching input
columns of the next layer; input channels and classes kept), so the
sub-models of the widths are nested. Every client k has a tier
p_max(k) out of the widths ``fjord_widths`` (uniform over the tiers, drawn
from (seed, k) only, fixed for the run). Per round t the server sends each
sampled client the global model's slice at its p_max; the client trains it
for E local epochs of SGD (a fresh optimizer each round, lr =
``round_lr(lr, lr_decay, lr_min, t)``, ``momentum``, ``weight_decay``,
``grad_clip``) where *every step* draws a width p uniformly among the widths
<= p_max and runs the physically smaller width-p sub-model on the leading
block of the p_max weights (:class:`OrderedDropout`), so the step's compute
really shrinks and its gradient reaches only that block. The client sends its
trained p_max slice back; for every nested slice, the server takes the
sample-weighted mean over the clients with p_max >= p, i.e. per coordinate
the sample-weighted mean over the clients whose p_max slice holds it;
coordinates no client holds keep their value.

Sources: the paper (ordered dropout, uniform D_p over the widths, tiers
p_max per device, nested aggregation "for each p, over the clients with
p_max >= p") and Flower's public FjORD baseline (``baselines/fjord``:
``ceil(p * C)`` units, a fresh SGD each round over the whole model for all
widths, per-width BatchNorm statistics with a shared affine transform,
optional distillation from the p_max output).

Choices and deviations:

* Up and down carry the p_max slice, not the full model (Flower's baseline
  sends the full model both ways; a device of tier p_max never needs more).
* One SGD over the p_max model for all the round's steps (as Flower's
  baseline): with momentum, a coordinate outside the step's slice keeps
  moving by its momentum buffer though it got no gradient in that step.
* BatchNorm (Conv4): static BN, as for HeteroFL (no running statistics in
  training; statistics from the client's training split at evaluation), in
  place of Flower's per-width running statistics. LeNet-5 has no BatchNorm.
* Self-distillation from the p_max model (the paper's optional extension,
  ``fjord_distill``) is not implemented: ``fjord_distill=true`` is refused.
* A reply of a client without training samples has weight 0; if every
  reply has 0 samples the global model is unchanged.
* Thresholds (SpaFL's masking) are off; ``optimizer_scope`` does not apply
  (stateless training; the client state is only its tier).
* Evaluation: the global model at each client's p_max, on its own test
  split (what that device would run); density = that slice's share of the
  full model's weights (see :mod:`spafl.algorithms.widths`).

What travels, per sampled client of tier p: ``weights/<key>`` (float32) of the
global model's p slice, down and up. For LeNet-5 (no biases) that is

    N_p = ceil(20p)*1*25 + ceil(50p)*ceil(20p)*25 + ceil(500p)*ceil(50p)*16 + 10*ceil(500p)

weights: N_0.2 = 18,100, N_0.4 = 70,200, N_0.6 = 156,300, N_0.8 = 276,400,
N_1 = 430,500. Per round: bits_up = bits_down = sum over sampled clients k
of 32 * N_{p_max(k)}.

FLOPs: over the steps actually run, 3 * sum over steps of (batch size x the
MACs per sample of the step's width-p sub-model), the reference formula
(:func:`spafl.metrics.flops.training_flops`) at density 1 with the width
drawn at each step.
"""

from __future__ import annotations

import torch
from torch import nn

from spafl.algorithms.base import ClientResult, unpack
from spafl.algorithms.local_sgd import client_optimizer, train_local
from spafl.algorithms.widths import WEIGHTS, Shapes, SlicedAlgorithm, covered_mean, prefix, slice_state, width_generator
from spafl.config import parse_fractions
from spafl.errors import UserError


class OrderedDropout(nn.Module):
    """The p_max model, trained one drawn width p <= p_max per forward (each training step).

    Its parameters are those of ``model`` (the p_max sub-model). In training
    each forward draws a width from ``narrower`` and the widest uniformly and
    runs that width's sub-model on the leading blocks of ``model``'s
    parameters (:func:`torch.func.functional_call`), so gradients reach only
    those blocks. In evaluation it is ``model``.
    """

    def __init__(
        self, model: nn.Module, widest: float, narrower: dict[float, nn.Module], shapes: dict[float, Shapes],
        macs: dict[float, int], generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.model = model
        self.widest = widest
        self.narrower = dict(narrower)  # a plain dict: their own parameters take no part
        self.shapes, self.macs, self.generator = shapes, macs, generator
        self.widths = sorted([*self.narrower, widest])
        #: the widths drawn, one per training forward, and the MACs they ran
        self.drawn: list[float] = []
        self.macs_run = 0

    def forward(self, x):
        if not self.training:
            return self.model(x)
        width = self.widths[int(torch.randint(len(self.widths), (1,), generator=self.generator))]
        self.drawn.append(width)
        self.macs_run += x.shape[0] * self.macs[width]
        if width == self.widest:
            return self.model(x)
        sub = self.narrower[width].train()
        parameters = dict(self.model.named_parameters())
        blocks = {name: parameters[name][prefix(shape)] for name, shape in self.shapes[width].items() if name in parameters}
        return torch.func.functional_call(sub, blocks, (x,))


class FjORD(SlicedAlgorithm):
    """FjORD (Horváth et al., NeurIPS 2021): ordered dropout, nested sample-weighted aggregation."""

    name = "fjord"

    def __init__(self, config, spec) -> None:
        if config.fjord_distill:
            raise UserError("fjord_distill=true: FjORD's self-distillation is not implemented; set fjord_distill=false")
        widths = tuple(sorted(parse_fractions("fjord_widths", config.fjord_widths)))
        super().__init__(config, spec, widths)

    def tier_of(self, client_id: int) -> float:
        """p_max of client ``client_id``: uniform over the widths, from (seed, client) only."""
        draw = torch.randint(len(self.widths), (1,), generator=width_generator(self.config.seed, 2, client_id))
        return self.widths[int(draw)]

    # -- state and messages ------------------------------------------------------------
    def init_client(self, client_id, initial_model):
        return {"width": self.tier_of(client_id)}

    def server_message(self, server, client_id, round_index):
        return self.message_for(server, self.tier_of(client_id))

    # -- local training ----------------------------------------------------------------
    def client_update(self, client, message, data, task):
        c = self.config
        widest = self.tier_of(task.client_id)
        received = unpack(WEIGHTS, message)
        if not self.fits(received, widest):
            raise ValueError(f"client {task.client_id}: the message is not a slice at its width {widest}")
        model = self.load(self.sliced_model(widest), received, widest)
        narrower = {width: self.sliced_model(width) for width in self.widths if width < widest}
        macs = {width: sum(self.macs[width].values()) for width in [*narrower, widest]}
        generator = width_generator(c.seed, 3, task.client_id, task.round_index)
        dropout = OrderedDropout(model, widest, narrower, self.shapes, macs, generator)
        optimizer = client_optimizer(self.trainable(model), c, {}, task.round_index)
        loss, steps = train_local(
            dropout, data, task, epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
            grad_clip=c.grad_clip,
        )
        state = model.state_dict()
        up = {WEIGHTS + name: state[name].detach().to("cpu", copy=True) for name in self.shapes[widest]}
        stats = {"train_loss": loss, "steps": steps, "flops": 3.0 * dropout.macs_run, "num_samples": data.num_train}
        return ClientResult(client, up, stats)

    # -- server ------------------------------------------------------------------------
    def validate_reply(self, server, reply):
        return self.check_slice(reply, self.tier_of(reply.client_id), {})

    def aggregate(self, server, replies, round_index):
        """Per coordinate the sample-weighted mean over the replies whose slice holds it."""
        contributions = [(unpack(WEIGHTS, reply.message), float(reply.num_samples), {}) for reply in replies]
        return {"model": covered_mean(server["model"], contributions)}

    def evaluation_state(self, client, server):
        return slice_state(server["model"], self.shapes[client["width"]])
