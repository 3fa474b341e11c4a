"""Conversions between spafl's objects and Flower records, and the App's config keys.

A spafl message is a flat dict of named tensors (``thresholds/<layer>``,
``delta/<layer>``, ...); on the wire it is an ``ArrayRecord`` with the same
names, in the same order, with the same dtypes. Its size is counted from the
record's array metadata (numel x bits per element), which equals
:func:`spafl.metrics.message_bits` of the tensors it holds.

States (the server's, sent for evaluation; a client's, kept in
``context.state`` and on disk) are nested dicts: the server state travels as a
flattened ``ArrayRecord`` (``thresholds/conv1``, ``delta/conv1``, ...), a
client state (weights, optimizer state, own thresholds) is serialized with
``torch.save`` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

from spafl.config import Config, build_config, parse_assignment
from spafl.errors import UserError
from spafl.metrics import ClientEval

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

# -- run config ([tool.flwr.app.config] and --run-config) -----------------------
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "preset": "fmnist-quick",
    "set": "",
    "out-dir": "",
    "round-timeout": 120.0,
}

# -- node config (--node-config of a SuperNode; Flower sets the first two in simulation)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"
DATA_DIR = "data-dir"

SEPARATOR = "/"


# -- named tensors <-> ArrayRecord -----------------------------------------------
def to_array_record(message: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding exactly ``message``'s tensors: same names, order, dtypes, values."""
    record = ArrayRecord()
    for name, tensor in message.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        try:
            array = tensor.detach().to("cpu").contiguous().numpy()
        except TypeError as error:  # e.g. bfloat16 has no NumPy dtype
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot travel in an ArrayRecord ({error})") from None
        record[name] = Array.from_numpy_ndarray(array)
    return record


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The named tensors of ``record`` (CPU tensors owning their memory)."""
    message: dict[str, torch.Tensor] = {}
    for name, array in record.items():
        values = array.numpy()
        if not values.flags.writeable or not values.dtype.isnative:
            values = values.astype(values.dtype.newbyteorder("="), copy=True)
        message[name] = torch.from_numpy(values)
    return message


def array_bits(array: Array) -> int:
    """Payload bits of one array: numel x bits per element, from its metadata alone."""
    return math.prod(int(size) for size in array.shape) * np.dtype(array.dtype).itemsize * 8


def record_bits(record: ArrayRecord | None) -> int:
    """Payload bits of a record; equals :func:`spafl.metrics.message_bits` of its tensors."""
    if record is None:
        return 0
    return sum(array_bits(array) for array in record.values())


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


def eval_to_metrics(evaluation: ClientEval) -> dict[str, int | float]:
    return {
        name: (int(getattr(evaluation, name)) if name in _INT_FIELDS else float(getattr(evaluation, name)))
        for name in EVAL_FIELDS
    }


def eval_from_metrics(metrics: Mapping[str, Any]) -> ClientEval:
    missing = [name for name in EVAL_FIELDS if name not in metrics]
    if missing:
        raise ValueError(f"evaluation reply lacks {missing}")
    values = {name: (int(metrics[name]) if name in _INT_FIELDS else float(metrics[name])) for name in EVAL_FIELDS}
    return ClientEval(**values)


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
        return cls(preset=preset, overrides=parse_overrides(values["set"]), out_dir=str(values["out-dir"]), round_timeout=timeout)

    def config(self) -> Config:
        """The spafl config: preset, then the ``set`` overrides; validated."""
        return build_config(self.preset, overrides=self.overrides)


# -- files --------------------------------------------------------------------------
def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so a crash (even SIGKILL) never leaves a half-written file.

    A temporary file in the same directory is written, flushed and fsynced,
    renamed over ``path`` (atomic on POSIX), and the directory is fsynced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
