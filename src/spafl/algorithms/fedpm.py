"""FedPM (Isik, Pase, Gunduz, Weissman, Zorzi; ICLR 2023, "Sparse Random Networks for
Communication-Efficient Federated Learning"): train a probability mask over frozen random weights.

What it does. Every weight of the model's masked layers is frozen at a
random signed constant ``±c_l`` (``c_l = sqrt(2 / fan_in_l)``, the standard
deviation of Kaiming-normal initialisation for layer l's fan-in; the signs
drawn from the run's seed, so server and clients build the same weights
without sending them, as the official code shares its seed). Each weight
has a trainable score ``s``; ``θ = sigmoid(s)`` is the probability that it
is kept. In every forward pass of local training a mask ``m ~ Bernoulli(θ)``
is drawn and the layer computes with ``W ⊙ m``; the backward pass is
straight-through (``∂L/∂θ := ∂L/∂m``), then through the sigmoid.

One round t, per sampled client: the server sends the global probabilities
θ_g (float32); the client sets ``s = logit(θ_g)`` (θ clamped to
[1e-6, 1 - 1e-6]), trains the scores for E local epochs with a fresh
optimizer (``fedpm_optimizer``, default Adam at ``fedpm_lr`` = 0.1, what the
official code uses whatever its config says; ``sgd`` takes ``momentum``
and ``weight_decay`` from the config), then draws ONE mask from its final
θ and sends it as a bool tensor per layer (1 bit per weight). The server
keeps a Beta posterior per weight: ``α += Σ_k m_k``, ``β += Σ_k (1 - m_k)``
over the round's replies, with the priors reset to α = β = 1 every
``fedpm_prior_reset`` rounds (default 1, every round, as the official code:
θ is then the round's mean mask), and sets θ_g to the posterior mode
``(α - 1) / (α + β - 2)`` — where that is 0/0 (no reply since the reset) θ_g
keeps its previous value. Initial θ_g = 0.5 everywhere. A reply from a
client without training samples (an untrained draw from θ_g) is left out
of the posterior. Clients keep no
state: θ_g comes down every round and the score optimizer is fresh each
round (the official code's choice; ``optimizer_scope`` does not apply).
All sampling is seeded by (seed, client, round).

Evaluation: the GLOBAL model with the deterministic mask ``θ_g > 0.5``
(frozen weights where it holds, 0 elsewhere), evaluated on each client's
own test split (not personalized). Density = the fraction of masked
weights with ``θ_g > 0.5``: layer-mean and parameter-weighted.

FLOPs: dense. The frozen weights are multiplied by a sampled mask and the
product goes through a dense conv/linear, forward and backward, so each
layer counts at density 1.0 in :func:`spafl.metrics.flops.training_flops`
(the scores' sigmoid and sampling, O(N) per step, are not counted).

Bits per round, per direction (exact; K sampled clients, N_w masked
weights; for LeNet-5 N_w = 430,500 and there is no other parameter)::

    down = K * 32 * N_w     = K * 13,776,000 bits   (θ_g, float32)
    up   = K * N_w          = K *    430,500 bits   (one bool mask per layer)

and ``bits_up_coded`` (``reports_coded_bits``): per mask tensor
``ceil(H(p) * n + log2 n)`` with p its fraction of ones, the entropy-coded
size the official code reports (:func:`spafl.metrics.bits.entropy_coded_bits`).

Deviations from the paper / official code, and why:

* Only the model's masked layers' weights are scored. Any other parameter
  (biases, BatchNorm affine parameters) stays frozen at the common initial
  model's values and never travels, and BatchNorm running statistics are
  not shared (a global model with BatchNorm evaluates with the initial
  running statistics); LeNet-5 has neither.
* The down link carries θ_g in float32 (the paper discusses quantizing it;
  we count what we send).
* Frozen-weight scale: the standard deviation of Kaiming-normal for the
  layer's fan-in with the ReLU gain, for every layer (also the last).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from spafl.algorithms.base import ClientResult, check_named_tensors, pack, unpack
from spafl.algorithms.dense import DenseAlgorithm
from spafl.algorithms.local_sgd import train_local
from spafl.algorithms.weight_masks import MASKS, PerWeightMasking
from spafl.seeding import derive_seed

THETA = "theta/"
MASK_UP = "mask/"
#: θ is clamped to [EPSILON, 1 - EPSILON] before its logit becomes the scores
EPSILON = 1e-6
#: ids distinguishing FedPM's random streams from the others of the same purpose
_SIGNS_ID, _SAMPLE_ID = 7101, 7102


class _SampledMaskNet(nn.Module):
    """The model with every masked weight multiplied by a fresh ``Bernoulli(sigmoid(s))`` mask, straight-through."""

    def __init__(self, model: nn.Module, frozen: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], generator):
        super().__init__()
        self.model = model  # masking off: plain conv/linear layers
        self.frozen = frozen
        self.keys = list(scores)
        self.scores = nn.ParameterList([nn.Parameter(scores[key]) for key in self.keys])
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {}
        for key, score in zip(self.keys, self.scores):
            theta = torch.sigmoid(score)
            sample = torch.bernoulli(theta.detach(), generator=self.generator)
            weights[key] = self.frozen[key] * (sample + theta - theta.detach())  # value: the sample; gradient: to θ
        return functional_call(self.model, weights, (x,), strict=False)


class FedPM(PerWeightMasking, DenseAlgorithm):
    """FedPM (Isik et al., ICLR 2023): Bernoulli masks over frozen signed-constant weights, Beta-posterior aggregation."""

    name = "fedpm"
    reports_coded_bits = True

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        self.frozen_weights = self._signed_constants(config.seed)
        #: the model every client and the server share: the common initial state with the signed constants
        self.frozen_state = {**spec.initial_state(config.seed), **self.frozen_weights}

    def _signed_constants(self, seed: int) -> dict[str, torch.Tensor]:
        """``±sqrt(2 / fan_in)`` per masked weight, the signs from the seed (the same in every process)."""
        generator = torch.Generator().manual_seed(derive_seed(seed, "model_init", _SIGNS_ID))
        weights = {}
        for key, shape in self.mask_shapes.items():
            fan_in = math.prod(shape[1:])
            signs = torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2 - 1
            weights[key] = signs * math.sqrt(2.0 / fan_in)
        return weights

    # -- state -----------------------------------------------------------------
    def init_server(self, initial_model):
        theta = {key: torch.full(shape, 0.5) for key, shape in self.mask_shapes.items()}
        ones = {key: torch.ones(shape) for key, shape in self.mask_shapes.items()}
        return {"theta": theta, "alpha": ones, "beta": dict(ones)}

    def init_client(self, client_id, initial_model):
        return {}  # stateless clients

    # -- messages --------------------------------------------------------------
    def server_message(self, server, client_id, round_index):
        return pack(THETA, server["theta"])

    # -- local training --------------------------------------------------------
    def _optimizer(self, parameters) -> torch.optim.Optimizer:
        c = self.config
        if c.fedpm_optimizer == "adam":
            return torch.optim.Adam(parameters, lr=c.fedpm_lr)
        return torch.optim.SGD(parameters, lr=c.fedpm_lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def client_update(self, client, message, data, task):
        c = self.config
        theta = unpack(THETA, message, list(self.mask_shapes))
        model = self.workspace(self.frozen_state)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        device_generator = torch.Generator(device=self.device)
        device_generator.manual_seed(derive_seed(task.seed, "client_train", task.client_id, task.round_index, _SAMPLE_ID))
        scores = {key: torch.logit(value.clamp(EPSILON, 1 - EPSILON)).to(self.device) for key, value in theta.items()}
        frozen = {key: value.to(self.device) for key, value in self.frozen_weights.items()}
        net = _SampledMaskNet(model, frozen, scores, device_generator)
        loss, steps = train_local(
            net, data, task, epochs=c.local_epochs, batch_size=c.batch_size, optimizer=self._optimizer(net.scores.parameters()),
            device=self.device, grad_clip=c.grad_clip,
        )
        with torch.no_grad():
            up = {
                key: torch.bernoulli(torch.sigmoid(score), generator=device_generator).to("cpu", torch.bool)
                for key, score in zip(net.keys, net.scores)
            }
        stats = {"train_loss": loss, "steps": steps, "flops": self.dense_flops(data.num_train), "num_samples": data.num_train}
        return ClientResult(client, pack(MASK_UP, up), stats)

    # -- server ----------------------------------------------------------------
    def validate_reply(self, server, reply):
        expected = {key: (shape, torch.bool) for key, shape in self.mask_shapes.items()}
        return check_named_tensors(reply.message, MASK_UP, expected, "masked weights")

    def aggregate(self, server, replies, round_index):
        trained = [reply for reply in replies if reply.num_samples > 0]  # a client without data sent an untrained draw
        if not replies:
            return server
        reset = round_index % self.config.fedpm_prior_reset == 0
        theta, alpha, beta = {}, {}, {}
        for key, shape in self.mask_shapes.items():
            ones = sum((reply.message[MASK_UP + key].to(torch.float32) for reply in trained), torch.zeros(shape))
            alpha[key] = (1.0 if reset else server["alpha"][key]) + ones
            beta[key] = (1.0 if reset else server["beta"][key]) + (len(trained) - ones)
            spread = alpha[key] + beta[key] - 2
            mode = (alpha[key] - 1) / spread.clamp(min=1)
            theta[key] = torch.where(spread > 0, mode, server["theta"][key])
        return {"theta": theta, "alpha": alpha, "beta": beta}

    # -- evaluation ------------------------------------------------------------
    def evaluation_state(self, client, server):
        """The frozen model masked by ``θ_g > 0.5``, with the masks (``mask/<weight>``) for the density."""
        masks = {key: value > 0.5 for key, value in server["theta"].items()}
        state = self.frozen_state
        masked = {key: state[key] * masks[key] for key in masks}
        return {**state, **masked, **pack(MASKS, masks)}
