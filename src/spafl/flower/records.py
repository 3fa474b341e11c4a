"""Conversions between spafl's objects and Flower records, and the App's config keys.

A spafl message is a flat dict of named tensors (``thresholds/<layer>``,
``delta/<layer>``, ...); on the wire it is an ``ArrayRecord`` with the same
names, in the same order, each in its encoding (:mod:`spafl.metrics.bits`):
a NumPy array of the tensor's dtype, or for a bool tensor a bitmask (its
bits packed eight to a byte, stype :data:`BITMASK_STYPE`). Payload bits are
counted by :func:`spafl.metrics.message_bits` on the tensors read back;
:func:`wire_bytes` measures what Flower serializes.

States (the server's, sent for evaluation; a client's, kept in
``context.state`` and on disk) are nested dicts: the server state travels as a
flattened ``ArrayRecord`` (``thresholds/conv1``, ``delta/conv1``, ...), a
client state (weights, optimizer state, own thresholds) is serialized with
``torch.save`` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

from spafl.config import Config, build_config, parse_assignment
from spafl.errors import UserError
from spafl.metrics import ClientEval
from spafl.metrics.bits import BITMASK, encoded_bits, encoding_of

# -- message types (category[.action], as Flower routes them) -------------------
QUERY = "query"  # "which partition do you hold?" (node discovery)
TRAIN = "train"  # the server's message to a sampled client; reply: the client's message up
BROADCAST = "train.broadcast"  # a message to every client after aggregation (variants that have one)
EVALUATE = "evaluate"  # evaluate the client's model on its own test split

# -- records inside a message's RecordDict --------------------------------------
ARRAYS = "arrays"  # ArrayRecord: the algorithm's message (named tensors)
METRICS = "metrics"  # MetricRecord: train stats / evaluation counts / partition id
CONFIG = "config"  # ConfigRecord: round index, intended partition id
SERVER_STATE = "server"  # ArrayRecord: the flattened server state (evaluate messages)
INFO = "info"  # ConfigRecord: what a node reports about its data (query replies)
BROADCASTS = "broadcasts"  # ArrayRecord: broadcasts to apply in round order (pack_rounds) before anything else

# -- keys of the messages' ConfigRecord and the replies' MetricRecord --------------
RUN_TOKEN = "run-token"  # the spafl run a node's state belongs to (the same after a server restart)
RESUMED_AT = "resumed-at"  # the round each resume of the run started from ("2,5"): states written later are void
LAST_BROADCAST = "last-broadcast"  # round index of the last broadcast a node applied (-1: none)

# -- run config ([tool.flwr.app.config] and --run-config) -----------------------
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "preset": "fmnist-quick",
    "set": "",
    "out-dir": "",
    "round-timeout": 120.0,
    "resume": False,
}

# -- node config (--node-config of a SuperNode; Flower sets the first two in simulation)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"
DATA_DIR = "data-dir"

SEPARATOR = "/"
BITMASK_STYPE = "spafl.bitmask"  # an Array whose data are a bool tensor's bits, packed (np.packbits)


# -- named tensors <-> ArrayRecord -----------------------------------------------
def _array(name: str, tensor: torch.Tensor) -> Array:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    encoding_of(tensor.dtype)  # a dtype the channel cannot carry fails here, with the allowed ones
    values = tensor.detach().to("cpu").contiguous().numpy()
    if values.dtype == np.bool_:
        return Array(dtype="bool", shape=tuple(values.shape), stype=BITMASK_STYPE, data=np.packbits(values.reshape(-1)).tobytes())
    return Array.from_numpy_ndarray(values)


def _tensor(array: Array) -> torch.Tensor:
    if array.stype == BITMASK_STYPE:
        shape = tuple(int(size) for size in array.shape)
        count = math.prod(shape)
        packed = np.frombuffer(array.data, dtype=np.uint8)
        if packed.size != (count + 7) // 8:
            raise ValueError(f"a bitmask of shape {shape} needs {(count + 7) // 8} bytes, got {packed.size}")
        return torch.from_numpy(np.unpackbits(packed, count=count).astype(np.bool_).reshape(shape))
    values = array.numpy()
    if not values.flags.writeable or not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(values)


def to_array_record(message: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding exactly ``message``'s tensors: same names, order, dtypes, values, each in its encoding."""
    record = ArrayRecord()
    for name, tensor in message.items():
        record[name] = _array(name, tensor)
    return record


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The named tensors of ``record`` (CPU tensors owning their memory)."""
    return {name: _tensor(array) for name, array in record.items()}


def record_payload_bits(record: ArrayRecord | None) -> int:
    """Payload bits of a record that cannot be read back into tensors, from its arrays' metadata alone."""
    if record is None:
        return 0
    total = 0
    for array in record.values():
        try:
            encoding = BITMASK if array.stype == BITMASK_STYPE else encoding_of(np.dtype(array.dtype).name)
            total += encoded_bits(math.prod(int(size) for size in array.shape), encoding)
        except (TypeError, ValueError):
            total += 8 * len(array.data)
    return total


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes of ``record`` as Flower serializes it: every object of its tree (the record, its arrays, their chunks)."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    except ImportError:  # another Flower layout: the arrays' data and names
        return record.count_bytes()
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def format_rounds(rounds: list[int]) -> str:
    """Round indices as a ConfigRecord value: ``[2, 5]`` -> ``"2,5"`` (an empty list has no type on the wire)."""
    return ",".join(str(int(r)) for r in rounds)


def parse_rounds(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part.strip()]


def pack_rounds(messages: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several rounds' messages as one: ``{7: {"delta/conv1": t}}`` -> ``{"7:delta/conv1": t}``."""
    return {f"{round_index}:{name}": tensor for round_index, message in messages.items() for name, tensor in message.items()}


def unpack_rounds(packed: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Inverse of :func:`pack_rounds`, rounds in increasing order."""
    messages: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in packed.items():
        round_text, sep, name = key.partition(":")
        if not sep:
            raise ValueError(f"{key!r} is not a round's tensor name (expected '<round>:<name>')")
        messages.setdefault(int(round_text), {})[name] = tensor
    return dict(sorted(messages.items()))


# -- nested states ------------------------------------------------------------------
def flatten_state(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"thresholds": {"conv1": t}}`` -> ``{"thresholds/conv1": t}``; every leaf must be a tensor."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if SEPARATOR in str(key):
            raise ValueError(f"state key {key!r} contains {SEPARATOR!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_state(value, name + SEPARATOR))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            raise TypeError(f"state entry {name!r} is a {type(value).__name__}, not a tensor")
    return flat


def unflatten_state(flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`flatten_state`."""
    state: dict[str, Any] = {}
    for name, tensor in flat.items():
        *parents, leaf = name.split(SEPARATOR)
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return state


def encode_state(obj: Any) -> bytes:
    """A client state as bytes (``torch.save``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def decode_state(data: bytes) -> Any:
    """Inverse of :func:`encode_state`; only tensors and plain containers/values are accepted."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# -- evaluation counts ------------------------------------------------------------
EVAL_FIELDS = ("correct", "loss_sum", "num_test", "majority_correct", "density", "density_weighted")
_INT_FIELDS = {"correct", "num_test", "majority_correct"}


#: Optional evaluation figures (SpaFL's): ``density/<layer>`` per masked layer, and the collapse guard's resets.
LAYER_DENSITY = "density/"
GUARD_RESETS = "guard_resets"


def eval_to_metrics(evaluation: ClientEval) -> dict[str, int | float]:
    metrics: dict[str, int | float] = {
        name: (int(getattr(evaluation, name)) if name in _INT_FIELDS else float(getattr(evaluation, name)))
        for name in EVAL_FIELDS
    }
    for layer, density in (evaluation.layer_density or {}).items():
        metrics[LAYER_DENSITY + layer] = float(density)
    if evaluation.guard_resets is not None:
        metrics[GUARD_RESETS] = int(evaluation.guard_resets)
    return metrics


def eval_from_metrics(metrics: Mapping[str, Any]) -> ClientEval:
    missing = [name for name in EVAL_FIELDS if name not in metrics]
    if missing:
        raise ValueError(f"evaluation reply lacks {missing}")
    values = {name: _reading(name, metrics[name], count=name in _INT_FIELDS) for name in EVAL_FIELDS}
    if values["correct"] > values["num_test"] or values["majority_correct"] > values["num_test"]:
        raise ValueError(f"correct {values['correct']} / majority {values['majority_correct']} exceed the {values['num_test']} samples tested")
    if values["density"] > 1 or values["density_weighted"] > 1:
        raise ValueError(f"density {values['density']} / {values['density_weighted']} above 1")
    layers = {key[len(LAYER_DENSITY):]: _reading(key, metrics[key], count=False) for key in metrics if key.startswith(LAYER_DENSITY)}
    above = [f"{LAYER_DENSITY}{name} is {value}" for name, value in layers.items() if value > 1]
    if above:
        raise ValueError(f"{above[0]}, above 1")
    resets = _reading(GUARD_RESETS, metrics[GUARD_RESETS], count=True) if GUARD_RESETS in metrics else None
    return ClientEval(**values, layer_density=layers or None, guard_resets=resets)


def _reading(name: str, value: Any, count: bool) -> int | float:
    """One number of an evaluation reply: finite and >= 0, and integral where it is a ``count``."""
    if isinstance(value, (bool, str, bytes, list, tuple)):
        raise TypeError(f"{name} is a {type(value).__name__}, not a number")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (count and not value.is_integer()):
        raise ValueError(f"{name} is {value}, not a finite {'count' if count else 'number'} >= 0")
    return int(value) if count else value


def metric_record(values: Mapping[str, Any]) -> MetricRecord:
    """A MetricRecord of ``values``; bools become 0/1 (MetricRecord takes no bools), None is left out."""
    record = MetricRecord()
    for key, value in values.items():
        if value is None:
            continue
        record[key] = int(value) if isinstance(value, bool) else value
    return record


# -- run config -------------------------------------------------------------------
def parse_overrides(text: str) -> dict[str, str]:
    """``"dataset=synthetic; rounds=3"`` -> ``{"dataset": "synthetic", "rounds": "3"}`` (``;``-separated)."""
    overrides: dict[str, str] = {}
    for part in str(text).split(";"):
        if part.strip():
            key, value = parse_assignment(part.strip())
            overrides[key] = value
    return overrides


@dataclass(frozen=True)
class RunSettings:
    """The App's run config: which spafl config, where the run directory goes, how long to wait."""

    preset: str | None = "fmnist-quick"
    overrides: dict[str, str] = field(default_factory=dict)
    out_dir: str = ""
    round_timeout: float = 120.0
    resume: bool = False

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        values = {**RUN_CONFIG_DEFAULTS, **dict(run_config)}
        preset = str(values["preset"]).strip() or None
        try:
            timeout = float(values["round-timeout"])
        except (TypeError, ValueError):
            raise UserError(f"run config round-timeout must be a number of seconds, got {values['round-timeout']!r}") from None
        if not (timeout > 0 and math.isfinite(timeout)):
            raise UserError(f"run config round-timeout must be > 0 seconds, got {timeout!r}")
        resume = values["resume"]
        if isinstance(resume, str):
            if resume.strip().lower() not in ("true", "false", "1", "0", ""):
                raise UserError(f"run config resume must be true or false, got {resume!r}")
            resume = resume.strip().lower() in ("true", "1")
        return cls(preset=preset, overrides=parse_overrides(values["set"]), out_dir=str(values["out-dir"]), round_timeout=timeout,
                   resume=bool(resume))

    def config(self) -> Config:
        """The spafl config: preset, then the ``set`` overrides; validated."""
        return build_config(self.preset, overrides=self.overrides)
