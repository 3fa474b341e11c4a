"""The ServerApp: reads the run config, runs :class:`spafl.flower.strategy.SpaFLStrategy`.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config``):

* ``preset`` — a spafl preset (default ``fmnist-quick``; empty: the defaults);
* ``set`` — spafl config overrides, ``key=value`` pairs separated by ``;``
  (e.g. ``"dataset=synthetic; rounds=3"``), as ``spafl run --set``;
* ``out-dir`` — the run directory (``config.json``, ``metrics.jsonl``,
  ``summary.json``, ``server.pt``); empty: ``runs/flower-<run id>`` under the
  ServerApp's working directory. A directory that already holds a run is refused;
* ``round-timeout`` — seconds to wait for the replies of one exchange (default 120);
* ``resume`` — ``true``: continue the run in ``out-dir`` from its ``server.pt``
  (after a ServerApp or SuperLink restart), with the same config.

The ClientApps read the same run config, so both sides build the same spafl config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from spafl.flower.records import RunSettings
from spafl.flower.strategy import SpaFLStrategy
from spafl.runtime.federation import configure_threads


def run_server(grid: Grid, context: Context, run_overrides: Mapping[str, Any] | None = None) -> Result:
    """Build the strategy from the run config and run the whole experiment."""
    run_config = {**dict(context.run_config), **dict(run_overrides or {})}
    settings = RunSettings.from_run_config(run_config)
    config = settings.config()
    configure_threads(config)  # the server only aggregates, on the CPU; devices matter on the nodes
    out_dir = Path(settings.out_dir or f"runs/flower-{context.run_id}").expanduser().resolve()
    strategy = SpaFLStrategy(
        config, out_dir=out_dir, round_timeout=settings.round_timeout, preset=settings.preset,
        run_config=run_config, run_id=context.run_id, resume=settings.resume,
    )
    return strategy.start(grid)


def make_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` entries take precedence over the context's run config (tests, embedding)."""
    overrides = dict(run_config or {})
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, overrides)

    return server


app = make_server_app()
