"""HeteroFL (Diao, Ding, Tarokh; ICLR 2021, "HeteroFL: Computation and Communication Efficient
Federated Learning for Heterogeneous Clients").

One global model; a client of model rate r trains the sub-model made of the
first ``ceil(r * C)`` output units of every hidden layer (with the matching
input columns of the next layer; the input channels and the classes are
kept), a physically smaller model (:mod:`spafl.algorithms.widths`). Per round
t the server sends each sampled client the slice of the global model at the
client's rate; the client trains all of it for E local epochs of SGD (a fresh
optimizer each round, lr = ``round_lr(lr, lr_decay, lr_min, t)``, ``momentum``,
``weight_decay``, ``grad_clip``) and sends the trained slice back; the server
sets every coordinate to the mean over the clients whose slice holds it.

Sources: the paper and the authors' public code
(``diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients``,
``src/fed.py``, ``src/models/conv.py``, ``src/utils.py``). Facts taken from them:

* rates ``{1, 1/2, 1/4, 1/8, 1/16}`` (letters a-e), ``int(np.ceil(C * rate))``
  units per hidden layer, the output layer keeps all classes;
* a *scaler* after every hidden layer divides its output by r during
  training and is the identity in evaluation (here: a forward hook on each
  hidden masked layer of the sub-model; it sits where the official
  ``Scaler`` does, between the layer and its BatchNorm/ReLU);
* static BatchNorm (sBN): no running statistics while training;
* aggregation by plain counts: ``tmp_v[idx] += local; count[idx] += 1``,
  the mean over the clients holding a coordinate, not weighted by samples;
  coordinates no client holds keep their value;
* label-split masking (non-IID): during local training the logits of the
  labels a client has no data of are set to 0 (``masked_fill``), and the
  server takes the output layer's rows only from the clients holding that
  label;
* "fix" (a rate per client for the whole run) and "dynamic" (redrawn every
  round) rate assignment. The early official code gives the rates to
  contiguous groups of client ids (``np.repeat`` over proportions); the later
  code draws them with ``torch.multinomial``.

Choices and deviations:

* Rates: ``heterofl_rates`` in equal proportions. ``fix`` (default; the
  paper reports both assignments): client k of N gets rate number
  ``k * R // N`` of the R listed, i.e. equal contiguous groups in client-id
  order (client ids carry no meaning here: the data partition is random).
  ``dynamic``: every sampled client draws one of the R rates uniformly each
  round, from (seed, client, round) only.
* Label split: the client's label set is the set of labels present in its
  training split. The server cannot know it (the official code reads the
  split from the server's memory), so the client sends it: a ``labels``
  bitmask of C bits (one per class) beside its weights; the server ignores
  the output-layer rows of the labels not set. ``heterofl_label_split=false``
  turns both the logit masking and the row selection off (and sends no mask).
* A reply of a client without training samples (it trained nothing) counts 0.
* Static BN at evaluation: the official code recomputes the global model's
  statistics over the training data of all clients after training; here
  each client computes them on its own training split before evaluating
  (see :mod:`spafl.algorithms.widths`). LeNet-5 has no BatchNorm.
* Thresholds (SpaFL's masking) are off; ``optimizer_scope`` does not apply:
  clients are stateless, with a fresh SGD each round (as the official code).
  The optimizer is the run's (the official code uses its own SGD settings
  and clips the gradient norm to 1: ``grad_clip=1`` does that here).
* Evaluation: the global model at full width (rate 1, scalers off), the
  paper's "global" accuracy, on each client's own test split; density 1.0.

What travels, per sampled client of rate r: down ``weights/<key>`` (float32),
the global model's slice at rate r; up the trained slice, plus ``labels``
(C bits) with label split. For LeNet-5 (no biases) the slice holds

    N_r = ceil(20r)*1*25 + ceil(50r)*ceil(20r)*25 + ceil(500r)*ceil(50r)*16 + 10*ceil(500r)

weights: N_1 = 430,500, N_1/2 = 109,000, N_1/4 = 29,000, N_1/8 = 8,286,
N_1/16 = 2,618. Per round: bits_down = sum over sampled clients k of
32 * N_{r_k}; bits_up = sum over sampled clients of (32 * N_{r_k} + 10),
or without the + 10 when ``heterofl_label_split=false``.

FLOPs: the reference formula (:func:`spafl.metrics.flops.training_flops`) at
density 1 over the sub-model's own layer shapes, 3 * E * n_k * MACs(r) (about
r^2 of the full model's).
"""

from __future__ import annotations

import torch

from spafl.algorithms.base import ClientResult, unpack
from spafl.algorithms.local_sgd import client_optimizer, train_local
from spafl.algorithms.widths import WEIGHTS, SlicedAlgorithm, covered_mean, width_generator
from spafl.config import parse_fractions
from spafl.metrics.flops import batches_per_epoch, training_flops

LABELS = "labels"


class HeteroFL(SlicedAlgorithm):
    """HeteroFL (Diao et al., ICLR 2021): nested width slices of one global model, averaged where they overlap."""

    name = "heterofl"

    def __init__(self, config, spec) -> None:
        self.rates = parse_fractions("heterofl_rates", config.heterofl_rates)
        super().__init__(config, spec, self.rates)

    def rate_of(self, client_id: int, round_index: int) -> float:
        """Client ``client_id``'s rate in round ``round_index``."""
        count = len(self.rates)
        if self.config.heterofl_mode == "fix":
            return self.rates[client_id * count // self.config.num_clients]
        draw = torch.randint(count, (1,), generator=width_generator(self.config.seed, 1, client_id, round_index))
        return self.rates[int(draw)]

    # -- state and messages ------------------------------------------------------------
    def init_client(self, client_id, initial_model):
        return {}  # stateless clients

    def server_message(self, server, client_id, round_index):
        return self.message_for(server, self.rate_of(client_id, round_index))

    # -- local training ----------------------------------------------------------------
    def _hooks(self, model: torch.nn.Module, rate: float, present: torch.Tensor | None) -> list:
        """The scalers (output / rate in training) after the hidden layers and the label-split logit mask."""
        handles = []
        if rate < 1.0:
            def scale(module, inputs, output):
                return output / rate if module.training else output

            for entry in self.table:
                if entry.hidden:
                    handles.append(model.get_submodule(entry.name).register_forward_hook(scale))
        if present is not None:
            absent = ~present.to(self.device)

            def mask_logits(module, inputs, output):
                return output.masked_fill(absent, 0.0) if module.training else output

            handles.append(model.get_submodule(self.table[-1].name).register_forward_hook(mask_logits))
        return handles

    def client_update(self, client, message, data, task):
        c = self.config
        rate = self.rate_of(task.client_id, task.round_index)
        received = unpack(WEIGHTS, message)
        if not self.fits(received, rate):
            raise ValueError(f"client {task.client_id}: the message is not a slice at its rate {rate}")
        model = self.load(self.sliced_model(rate), received, rate)
        present = None
        if c.heterofl_label_split:
            present = torch.bincount(data.train_y, minlength=self.spec.num_classes)[: self.spec.num_classes] > 0
        handles = self._hooks(model, rate, present)
        try:
            optimizer = client_optimizer(self.trainable(model), c, {}, task.round_index)
            loss, steps = train_local(
                model, data, task, epochs=c.local_epochs, batch_size=c.batch_size, optimizer=optimizer, device=self.device,
                grad_clip=c.grad_clip,
            )
        finally:
            for handle in handles:
                handle.remove()
        state = model.state_dict()
        up = {WEIGHTS + name: state[name].detach().to("cpu", copy=True) for name in self.shapes[rate]}
        if present is not None:
            up[LABELS] = present.cpu()
        macs = self.macs[rate]
        flops = training_flops(
            macs, dict.fromkeys(macs, 1.0), data.num_train, c.local_epochs,
            c.local_epochs * batches_per_epoch(data.num_train, c.batch_size), num_thresholds=0, num_masked_weights=0,
        )
        return ClientResult(client, up, {"train_loss": loss, "steps": steps, "flops": flops, "num_samples": data.num_train})

    # -- server ------------------------------------------------------------------------
    def validate_reply(self, server, reply):
        fixed = self.rate_of(reply.client_id, 0) if self.config.heterofl_mode == "fix" else None
        extra = {LABELS: ((self.spec.num_classes,), torch.bool)} if self.config.heterofl_label_split else {}
        return self.check_slice(reply, fixed, extra)

    def aggregate(self, server, replies, round_index):
        """Per coordinate the plain mean over the replies holding it (class rows: only those holding the label)."""
        contributions = []
        for reply in replies:
            rows = {name: reply.message[LABELS] for name in self.class_rows} if self.config.heterofl_label_split else {}
            contributions.append((unpack(WEIGHTS, reply.message), 1.0 if reply.num_samples > 0 else 0.0, rows))
        return {"model": covered_mean(server["model"], contributions)}

    def evaluation_state(self, client, server):
        return server["model"]
