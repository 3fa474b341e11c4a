"""spafl: SpaFL (Kim et al., NeurIPS 2024) — federated learning that sends only per-unit thresholds.

Entry points: :func:`spafl.run` (your model, your arrays), :func:`spafl.sparsify`
(add trainable thresholds to any model), the ``spafl`` command line.

The entry points are imported on first use (PEP 562), so ``import spafl`` and
processes that only need a submodule without torch stay light: the ``spafl``
command line before it picks a command, ``spafl deploy-local`` supervising its
Flower processes, and ``flwr run``, which imports the ``spafl`` package to
check that the app's components exist (``importlib.util.find_spec``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spafl.registry import lazy_attributes

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "run": "spafl.api",
    "Config": "spafl.config",
    "build_config": "spafl.config",
    "MaskedConv2d": "spafl.nn",
    "MaskedLinear": "spafl.nn",
    "model_density": "spafl.nn",
    "sparsify": "spafl.nn",
}

__all__ = ["Config", "MaskedConv2d", "MaskedLinear", "__version__", "build_config", "model_density", "run", "sparsify"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are resolved by __getattr__
    from spafl.api import run
    from spafl.config import Config, build_config
    from spafl.nn import MaskedConv2d, MaskedLinear, model_density, sparsify


__getattr__, __dir__ = lazy_attributes("spafl", _LAZY, globals(), __all__)
