"""SpaFL on your own model and your own arrays, in a few lines.

>>> import numpy as np, torch
>>> from torch import nn
>>> import spafl
>>> def make_model():
...     return spafl.sparsify(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)))
>>> x, y = np.random.rand(600, 20).astype("float32"), np.random.randint(0, 3, 600)
>>> summary = spafl.run(make_model, train=(x[:500], y[:500]), test=(x[500:], y[500:]),
...                     out="runs/mine", num_clients=5, clients_per_round=2, rounds=3, progress=False)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spafl.algorithms.base import ModelSpec
from spafl.config import build_config
from spafl.data import Dataset
from spafl.engine import Simulator
from spafl.runtime.federation import build_federation
from spafl.runtime.record import CONFIG, write_json_atomic
from spafl.nn import masked_layers


def _tensor(values: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values))
    if what == "labels":
        return tensor.to(torch.int64).contiguous()
    if tensor.dtype == torch.uint8 and tensor.dim() == 4:
        return tensor.contiguous()
    return tensor.to(torch.float32).contiguous()


def run(
    model_factory: Callable[[], nn.Module],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    out: str | Path,
    *,
    preset: str = "fmnist-paper",
    progress: bool = True,
    resume: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run SpaFL with ``model_factory()`` on arrays ``train = (x, y)``, ``test = (x, y)``.

    ``model_factory`` must return a model with masked layers (wrap yours in
    :func:`spafl.sparsify`); it is called once per run under a fixed seed, so
    every client starts from the same weights. Inputs are uint8 ``[N, C, H,
    W]`` images (preprocessed as ``pixels`` says) or float features of any
    shape (used as given). Settings: the ``preset``'s, then ``overrides``
    (any config key, e.g. ``rounds=50, th_coeff=0.01``). Writes
    ``metrics.jsonl`` and ``summary.json`` to ``out`` and returns the summary.
    """
    config = build_config(preset, overrides={key: value for key, value in overrides.items()})
    train_x, train_y = _tensor(train[0], "inputs"), _tensor(train[1], "labels")
    test_x, test_y = _tensor(test[0], "inputs"), _tensor(test[1], "labels")
    num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    dataset = Dataset(name="custom", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                      num_classes=num_classes, source="arrays")
    probe = model_factory()
    if not masked_layers(probe):
        raise ValueError("the model has no masked layers: wrap it with spafl.sparsify(model)")
    spec = ModelSpec(factory=model_factory, input_shape=tuple(train_x.shape[1:]), num_classes=num_classes)
    federation = build_federation(config, dataset, spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json_atomic(out / CONFIG, {"preset": preset, "config": config.to_dict(), "provenance": {"data_source": "arrays", "model": repr(probe)}})
    return Simulator(config, out, federation=federation, progress=progress).run(resume=resume)
