"""Every config key: its type, default, allowed values, documentation and owner (:class:`Config`).

Every key has one owner, declared at its field: ``common``, ``data`` or
``engine`` (read whatever the method, :data:`SHARED_OWNERS`) or the one
method that alone reads it; an algorithm's keys (``Algorithm.keys()``) are
derived from the owners (:func:`keys_of`). The names a method, dataset or
model may take come from their registries (:data:`spafl.algorithms.ALGORITHMS`,
:data:`spafl.data.registry.DATASETS`, :data:`spafl.models.MODELS`).
:mod:`spafl.config` resolves and validates values.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spafl.errors import UserError


#: Owners every algorithm's keys include; every other owner is a method name (a key of
#: :data:`spafl.algorithms.ALGORITHMS`) whose algorithm alone reads the keys it owns.
SHARED_OWNERS: tuple[str, ...] = ("common", "data", "engine")

#: What each shared owner's keys are about (the headers of `spafl keys`).
OWNER_DOCS: dict[str, str] = {
    "common": "every method: what to run, the federation, local training",
    "data": "every method: the dataset, its split over clients, its preprocessing",
    "engine": "every method: how a run is executed, evaluated and recorded",
}


def _field(owner: str, doc: str, **metadata: Any) -> dict[str, Any]:
    return {"owner": owner, "doc": doc, **metadata}


def _choice(default: str, choices: tuple[str, ...] | Callable[[], tuple[str, ...]], doc: str, *, owner: str) -> Any:
    """A string out of ``choices``: a tuple, or a function returning the names of a registry (looked up when needed)."""
    return field(default=default, metadata=_field(owner, doc, choices=choices))


def _num(
    default: float | int, doc: str, low: float | None = None, high: float | None = None, low_open: bool = False, *, owner: str,
) -> Any:
    return field(default=default, metadata=_field(owner, doc, low=low, high=high, low_open=low_open))


def _flag(default: bool, doc: str, *, owner: str) -> Any:
    return field(default=default, metadata=_field(owner, doc))


def _text(default: str, doc: str, *, owner: str) -> Any:
    return field(default=default, metadata=_field(owner, doc))


def _int_list(doc: str, *, owner: str) -> Any:
    return field(default_factory=tuple, metadata=_field(owner, doc, list=True))


def _fractions(default: str, doc: str, *, owner: str) -> Any:
    """A comma-separated list of distinct fractions in (0, 1] (model widths), checked by :func:`parse_fractions`."""
    return field(default=default, metadata=_field(owner, doc, fractions=True))


def parse_fractions(key: str, text: str) -> tuple[float, ...]:
    """The distinct fractions in (0, 1] that ``text`` lists, comma-separated, in its order; a UserError names ``key`` otherwise."""
    try:
        values = tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"{key} must be comma-separated numbers in (0, 1], e.g. 1,0.5,0.25; got {text!r}") from None
    if not values or any(not (0 < v <= 1) for v in values) or len(set(values)) != len(values):
        raise UserError(f"{key} must list distinct numbers in (0, 1], e.g. 1,0.5,0.25; got {text!r}")
    return values


# The choices of method, dataset and model are the names of their registries. Those are imported
# when first needed (they import no torch, but config is imported by the modules they load).
def _method_names() -> tuple[str, ...]:
    from spafl.algorithms import ALGORITHMS

    return tuple(ALGORITHMS)


def _dataset_names() -> tuple[str, ...]:
    from spafl.data.registry import DATASETS

    return tuple(DATASETS)


def _model_names() -> tuple[str, ...]:
    from spafl.models import MODELS

    return tuple(MODELS)


@dataclass
class Config:
    """All settings of one run. Defaults reproduce the FMNIST reference (SPEC §8).

    Every field names its ``owner`` in its metadata: ``common``, ``data`` or
    ``engine`` (read whatever the method; :data:`SHARED_OWNERS`), or the one
    method whose algorithm alone reads it. ``Algorithm.keys()`` is derived from
    the owners (:func:`keys_of`).
    """

    # -- common: what to run, the federation, local training (every method) ----------------
    method: str = _choice("spafl", _method_names, "federated algorithm", owner="common")
    model: str = _choice("lenet5", _model_names, "model architecture", owner="common")
    rounds: int = _num(500, "communication rounds", 1, owner="common")
    num_clients: int = _num(100, "clients N", 1, owner="common")
    clients_per_round: int = _num(10, "clients sampled per round |S_t| (<= num_clients)", 1, owner="common")
    local_epochs: int = _num(5, "local epochs E", 1, owner="common")
    batch_size: int = _num(64, "local minibatch size", 1, owner="common")
    lr: float = _num(0.001, "SGD learning rate at round 0", 0, low_open=True, owner="common")
    lr_decay: float = _num(1.0, "lr at round t is max(lr * lr_decay**t, lr_min)", 0, 1, low_open=True, owner="common")
    lr_min: float = _num(0.0, "lower bound of the decayed lr", 0, owner="common")
    momentum: float = _num(0.9, "SGD momentum", 0, 1, owner="common")
    weight_decay: float = _num(0.0, "SGD weight decay", 0, owner="common")
    grad_clip: float = _num(0.0, "global gradient-norm clip (0 = off)", 0, owner="common")
    # read by the methods whose clients keep state (spafl, local); fedavg's clients are stateless
    optimizer_scope: str = _choice(
        "persistent", ("persistent", "per_round"),
        "persistent: one SGD per client for the whole run (FMNIST ref.); per_round: fresh SGD each round (CIFAR ref.)",
        owner="common",
    )
    seed: int = _num(0, "seed of the initial model, partition, sampling and client randomness", 0, owner="common")
    # -- data: the dataset, its split over clients, its preprocessing (every method) ----------
    dataset: str = _choice("fmnist", _dataset_names, "dataset", owner="data")
    partition: str = _choice(
        "dirichlet", ("dirichlet", "dirichlet_capped", "iid"),
        "how data is split over clients: dirichlet (SPEC §6: test split by the same proportions); dirichlet_capped "
        "(CIFAR-100 ref.: a client stops receiving samples once it holds num_train/num_clients, and draws its own test set "
        "of ~100 images in its training class proportions, overlapping other clients'); iid",
        owner="data",
    )
    alpha: float = _num(0.2, "Dirichlet concentration", 0, low_open=True, owner="data")
    min_client_samples: int = _num(
        0, "re-draw the Dirichlet split until every client has this many training samples", 0, owner="data",
    )
    pixels: str = _choice(
        "raw", ("raw", "normalized"), "raw: float 0..255 (FMNIST ref.); normalized: [0,1] then per-channel standardization",
        owner="data",
    )
    augment: bool = _flag(False, "pad-4 random crop + horizontal flip during training (CIFAR)", owner="data")
    data_dir: str = _text(
        "", "directory with the dataset files (empty: search $SPAFL_DATA, ~/.cache/spafl, system dirs, then download)",
        owner="data",
    )
    # -- engine: how a run is executed, evaluated and recorded (every method) -----------------
    eval_every: int = _num(
        1, "evaluate the clients (all, or the eval_clients subset) every this many rounds (and always at the last round)", 1,
        owner="engine",
    )
    eval_batch_size: int = _num(
        0, "batch size for evaluation (0: batch_size, as the reference code; SpaFL's collapse guard acts between batches)", 0,
        owner="engine",
    )
    checkpoint_every: int = _num(10, "write a checkpoint every this many rounds (and at the last round)", 1, owner="engine")
    device: str = _choice("cpu", ("cpu", "cuda"), "where to compute", owner="engine")
    threads: int = _num(
        0, "torch CPU threads of the main process, and of each client's computation when workers=1 (0 = number of cores)", 0,
        owner="engine",
    )
    workers: int = _num(
        0, "processes that run a round's clients side by side, one thread each; results equal workers=1 with threads=1 "
        "(0 = one per core on a multi-core Linux CPU, at most clients_per_round; 1 = all in the main process)", 0,
        owner="engine",
    )
    record_masks: tuple = _int_list("rounds at which to record every client's kept-unit masks (comma-separated)", owner="engine")
    execution: str = _choice(
        "fast", ("fast", "reference"),
        "fast: contiguous client tensors, compact (kept-units-only) compute where exact, and no re-evaluation of a client "
        "whose state has not changed since its last evaluation; reference: a per-sample dataset behind a DataLoader, "
        "dense layers times the 0/1 mask and every client evaluated anew, as the reference code",
        owner="engine",
    )
    client_store: str = _choice(
        "auto", ("auto", "memory", "disk"),
        "where per-client state lives: memory, disk (run_dir/clients, loaded only for sampled/evaluated clients), "
        "auto: disk when all clients' states would not fit in 1 GiB",
        owner="engine",
    )
    eval_clients: int = _num(
        0, "evaluate this many clients (a fixed seeded subset, the same every round); 0 = all clients", 0, owner="engine",
    )
    # -- spafl: SpaFL's own keys --------------------------------------------------------------
    th_coeff: float = _num(0.002, "threshold regularizer coefficient c in c*sum(exp(-tau))", 0, owner="spafl")
    th_coeff_warmup: float = _num(
        1.0, "penalty_scheduler of the FMNIST ref.: c(t) = c / (1 + exp(5 - 10 t / value)); 0 = constant c", 0,
        owner="spafl",
    )
    ste: str = _choice(
        "identity", ("identity", "outside_unit", "long_tailed"), "straight-through estimator of step", owner="spafl",
    )
    threshold_schedule: str = _choice(
        "every_step", ("every_step", "last_epoch"),
        "every_step: thresholds and weights trained jointly (reference code); last_epoch: thresholds only in the last local epoch, "
        "earlier epochs train the kept units' weights under a fixed mask (paper)",
        owner="spafl",
    )
    importance_update: str = _choice(
        "before_training", ("before_training", "all_after_aggregation", "off"),
        "when Delta tau_g is fed back into weights (FMNIST ref.: before_training; CIFAR ref.: all_after_aggregation)",
        owner="spafl",
    )
    importance_sign: str = _choice(
        "row_sum", ("row_sum", "per_weight"), "sign used by the importance update", owner="spafl",
    )
    importance_delta: str = _choice(
        "server_sends", ("server_sends", "since_last_seen"),
        "server_sends: Delta tau_g travels in the down message; since_last_seen: client uses tau_g(t) - tau_g(last seen)",
        owner="spafl",
    )
    aggregation_weighting: str = _choice(
        "uniform", ("uniform", "samples"), "threshold averaging weights", owner="spafl",
    )
    frozen_weights: bool = _flag(False, "train thresholds only; weights stay at their initial values", owner="spafl")
    collapse_guard: bool = _flag(True, "reset a layer's thresholds when its kept fraction falls to <= 1%", owner="spafl")
    threshold_clip: float = _num(
        0.0, "clip thresholds to [-v, v] after each step (0 = off; the reference never clips)", 0, owner="spafl",
    )
    # -- fedpm: FedPM's own keys (Isik et al., ICLR 2023) ----------------------------------------
    fedpm_optimizer: str = _choice(
        "adam", ("adam", "sgd"),
        "optimizer of the mask scores (the official code uses Adam whatever its config says); sgd uses momentum/weight_decay",
        owner="fedpm",
    )
    fedpm_lr: float = _num(0.1, "learning rate of the mask scores (official code: Adam at 0.1)", 0, low_open=True, owner="fedpm")
    fedpm_prior_reset: int = _num(
        1, "reset the server's Beta(1, 1) priors every this many rounds (official code: every round, theta = mean mask)", 1,
        owner="fedpm",
    )
    # -- fedspa: FedSpa's own keys (Huang et al., 2022) ------------------------------------------
    fedspa_density: float = _num(
        0.5, "density d of every client's personal mask (kept weights / all masked weights; ERK over layers)", 0, 1,
        low_open=True, owner="fedspa",
    )
    fedspa_prune_rate: float = _num(
        0.5, "initial fraction of each layer's kept weights pruned and regrown after local training (cosine-annealed to 0)",
        0, 1, owner="fedspa",
    )
    # -- heterofl: HeteroFL's own keys (Diao et al., ICLR 2021) ----------------------------------
    heterofl_rates: str = _fractions(
        "1,0.5,0.25,0.125,0.0625",
        "model rates r (a client of rate r trains the first ceil(r*C) channels of every hidden layer), given to clients "
        "in equal proportions",
        owner="heterofl",
    )
    heterofl_mode: str = _choice(
        "fix", ("fix", "dynamic"),
        "fix: each client keeps one rate (equal groups in client-id order); dynamic: every sampled client draws its rate anew "
        "each round",
        owner="heterofl",
    )
    heterofl_label_split: bool = _flag(
        True,
        "label-split masking (official code, non-IID): a client trains only the logits of the labels in its training data and "
        "the server averages the last layer's class rows only over the clients holding that label",
        owner="heterofl",
    )
    # -- fjord: FjORD's own keys (Horvath et al., NeurIPS 2021) ----------------------------------
    fjord_widths: str = _fractions(
        "0.2,0.4,0.6,0.8,1.0",
        "ordered-dropout widths p; each client's tier p_max is one of them (uniform), each local step trains a width p <= p_max",
        owner="fjord",
    )
    fjord_distill: bool = _flag(
        False, "self-distillation from the p_max model (the paper's optional extension; not implemented: true is refused)",
        owner="fjord",
    )

    # -- fedp3: FedP3's own keys (Yi et al., ICLR 2024) -----------------------------------------
    fedp3_upload: str = _choice(
        "opu2", ("opu2", "opu3"),
        "layers a client uploads: its group's 2 (opu2) or 3 (opu3) consecutive non-final layers, plus the final layer",
        owner="fedp3",
    )
    fedp3_global_keep: float = _num(
        0.9, "fraction of each non-uploaded layer's weights the server keeps (largest |w|) in a client's model (code: 0.9)",
        0, 1, low_open=True, owner="fedp3",
    )
    fedp3_local_prune: float = _num(
        0.0, "fraction of each layer's kept weights a client prunes by magnitude before training (0 = off, as the code)",
        0, 0.99, owner="fedp3",
    )
    fedp3_final_layer: str = _choice(
        "global", ("global", "personal"),
        "global: the final layer comes down dense with the client's upload layers (the paper's OPU); "
        "personal: the server never sends it, each client keeps its own (the official code)",
        owner="fedp3",
    )
    fedp3_weighting: str = _choice(
        "uniform", ("uniform", "samples"),
        "per-layer averaging over the clients that uploaded it: plain mean (the code) or weighted by training samples",
        owner="fedp3",
    )
    # -- lotteryfl: LotteryFL's own keys (Li et al., 2020) ---------------------------------------
    lotteryfl_start_acc: float = _num(
        0.5, "a client prunes only when its model's accuracy on its training data exceeds this", 0, 1, owner="lotteryfl",
    )
    lotteryfl_end_density: float = _num(
        0.5, "a client prunes only while its mask's density (kept / all masked weights) is above this target", 0, 1,
        owner="lotteryfl",
    )
    lotteryfl_prune_percent: float = _num(
        20.0, "percent of each layer's remaining weights a pruning removes (smallest |w|), then rewinds to the initial weights",
        0, 99, owner="lotteryfl",
    )

    @property
    def evaluation_batch(self) -> int:
        """The batch size clients evaluate with: ``eval_batch_size``, or ``batch_size`` where that is 0."""
        return self.eval_batch_size or self.batch_size

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["record_masks"] = list(self.record_masks)
        return data


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def unknown_key(key: str, where: str) -> UserError:
    """The error for a key no field has, with the closest names."""
    close = difflib.get_close_matches(key, FIELDS, n=3, cutoff=0.7)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `spafl keys` lists every key"
    location = f" {where}" if where else ""
    return UserError(f"unknown config key {key!r}{location}{hint}")


def owner_of(key: str) -> str:
    """The owner of config key ``key`` (see :class:`Config`)."""
    if key not in FIELDS:
        raise unknown_key(key, "")
    return FIELDS[key].metadata["owner"]


def owners() -> tuple[str, ...]:
    """Every owner a key may have: the shared owners, then the method names."""
    return SHARED_OWNERS + _method_names()


def keys_of(*owner_names: str) -> frozenset[str]:
    """The config keys owned by any of ``owner_names`` (each a shared owner or a method name)."""
    known = owners()
    for owner in owner_names:
        if owner not in known:
            raise ValueError(f"unknown config key owner {owner!r}; owners: {', '.join(known)}")
    return frozenset(name for name, spec in FIELDS.items() if spec.metadata["owner"] in owner_names)


def choices_of(key: str) -> tuple[str, ...] | None:
    """The allowed values of key ``key`` (None: it is not a choice)."""
    choices = FIELDS[key].metadata.get("choices")
    return choices() if callable(choices) else choices
