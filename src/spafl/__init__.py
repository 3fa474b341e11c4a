"""spafl: SpaFL (Kim et al., NeurIPS 2024) — federated learning that sends only per-unit thresholds.

Entry points: :func:`spafl.run` (your model, your arrays), :func:`spafl.sparsify`
(add trainable thresholds to any model), the ``spafl`` command line.
"""

__version__ = "0.1.0"

from spafl.api import run  # noqa: E402
from spafl.config import Config, build_config  # noqa: E402
from spafl.nn import MaskedConv2d, MaskedLinear, model_density, sparsify  # noqa: E402

__all__ = ["Config", "MaskedConv2d", "MaskedLinear", "__version__", "build_config", "model_density", "run", "sparsify"]
