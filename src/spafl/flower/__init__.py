"""The Flower adapter: SpaFL (and the baselines) as a Flower App on the Message API.

The same engine-agnostic algorithm functions as the in-process simulator
(:mod:`spafl.algorithms`) run inside a Flower ``ServerApp`` / ``ClientApp``:

* :mod:`spafl.flower.server_app` — ``app``, the ServerApp; it runs
  :class:`spafl.flower.strategy.SpaFLStrategy` and writes ``config.json``,
  ``metrics.jsonl`` and ``summary.json`` like ``spafl run``.
* :mod:`spafl.flower.client_app` — ``app``, the ClientApp; every SuperNode
  holds one partition (client) and keeps that client's personalized state.
* :mod:`spafl.flower.strategy` — the strategy (a ``flwr.serverapp.strategy.Strategy``)
  and :func:`~spafl.flower.strategy.collect_replies`, the server's
  "validate the replies" step as a plain function.
* :mod:`spafl.flower.records` — conversions between spafl's named-tensor
  messages / states and Flower records, and the run-config keys.

``pyproject.toml`` declares the app in ``[tool.flwr.app]``, so ``flwr run .``
works (``flwr run . local --federation-config "num-supernodes=4"`` for a
local simulation). Importing this package does not import Flower.
"""

SERVER_APP = "spafl.flower.server_app:app"
CLIENT_APP = "spafl.flower.client_app:app"

__all__ = ["CLIENT_APP", "SERVER_APP"]
