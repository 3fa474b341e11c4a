"""The server side of the Flower App: a ``flwr.serverapp.strategy.Strategy`` running the shared round.

``start`` runs the experiment with :class:`spafl.runtime.round.RoundLoop`, the
round every engine runs, over :class:`spafl.flower.transport.GridTransport`,
which carries the messages over Flower's Grid. The Strategy's steps
(``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) are the transport's and the round's, so they can be
called on their own.

Rows of ``metrics.jsonl`` have the simulator's fields plus ``rejected``,
``missing``, ``unavailable``, ``resumed_from_disk`` and the measured
``wire_bytes_up`` / ``wire_bytes_down`` (every ArrayRecord as Flower
serializes it, beside the payload bits the round counts).

A run stopped mid-way (ServerApp or SuperLink restarted) continues from its
run directory with ``resume`` (run config ``resume = true``): ``server.pt``
is written after every round, and the nodes go back to their state of that
round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from spafl.algorithms import ALGORITHMS, Algorithm, State
from spafl.config import Config
from spafl.errors import UserError
from spafl.flower import records as rec
from spafl.flower.replies import read_replies
from spafl.flower.transport import SERVER_STATE_FILE, GridTransport
from spafl.runtime.federation import server_spec
from spafl.runtime.record import CONFIG, claim_run_dir, write_run_config
from spafl.runtime.round import RoundLoop

__all__ = ["SERVER_STATE_FILE", "SpaFLStrategy", "read_replies", "server_spec"]


class SpaFLStrategy(Strategy):
    """Runs a spafl experiment over a Flower Grid; the algorithm is ``ALGORITHMS[config.method]``."""

    def __init__(
        self,
        config: Config,
        *,
        out_dir: str | Path,
        round_timeout: float = 120.0,
        preset: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        run_id: int | None = None,
        poll_interval: float = 0.1,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.spec = server_spec(config)
        self.algorithm: Algorithm = ALGORITHMS[config.method](config, self.spec)
        self.out_dir = Path(out_dir)
        self.preset = preset
        self.run_config = dict(run_config or {})
        self.run_id = run_id
        self.resume = resume
        self.transport = GridTransport(config, self.algorithm, self.spec, self.out_dir, float(round_timeout), poll_interval)
        self.loop = RoundLoop(config, self.algorithm, self.transport, self.out_dir)
        self.state = self.loop.fresh_state(self.spec.initial_state(config.seed))
        self._facts: dict[str, Any] = {}

    @property
    def server(self) -> State:
        return self.state["server"]

    # -- the Strategy interface: the round's steps -------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Train messages of round ``server_round`` (1-based) for the sampled partitions that have a node.

        ``arrays`` and ``config`` are not used: each message is ``algorithm.server_message`` of the server state.
        """
        _, sends, _ = self.loop.messages(self.state, server_round - 1)
        messages, self._sent = self.transport.train_messages(server_round - 1, sends)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read and validate the replies, aggregate the valid ones; returns the server state and the round's train metrics."""
        exchange = self.transport.read_train(replies, self._sent, server_round - 1)
        accepted = self.loop.accept(self.state, exchange, server_round - 1)
        self.state["server"] = self.algorithm.aggregate(self.server, accepted.replies, server_round - 1)
        metrics = {"replies": len(accepted.replies), "rejected": len(accepted.rejected), "missing": exchange.missing,
                   "bits_up": accepted.bits_up, "flops": accepted.flops}
        return rec.to_array_record(rec.flatten_state(self.server)), rec.metric_record(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """An ``evaluate`` message to every node, carrying the server state (flattened)."""
        messages, self._eval_sent = self.transport.evaluate_messages(server_round, self.server)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The nodes' evaluation counts combined; None: no usable reply."""
        summary = self.transport.read_evaluations(replies, self._eval_sent, server_round)
        return None if summary is None else rec.metric_record(summary)

    def summary(self) -> None:
        c = self.config
        log(INFO, "spafl: %s on %s/%s, %d clients, %d per round, %d rounds, round timeout %.0f s, run directory %s",
            c.method, c.dataset, c.model, c.num_clients, c.clients_per_round, c.rounds, self.transport.round_timeout, self.out_dir)

    # -- the run ---------------------------------------------------------------------
    def _write_config(self) -> None:
        from flwr import __version__ as flwr_version
        import torch

        from spafl.provenance import provenance

        info = self.transport.data_info or {"source": "unknown (no node reported)", "checksums": {}}
        write_run_config(
            self.out_dir, self.config, self.preset, provenance(torch.get_num_threads(), info["checksums"], info["source"]),
            engine={"name": "flower", "flwr_version": flwr_version, "run_id": self.run_id, "run_config": self.run_config,
                    "round_timeout": self.transport.round_timeout},
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run the experiment (``config.rounds`` rounds) into ``out_dir``; with ``resume``, continue it from ``server.pt``.

        ``initial_arrays``, ``train_config``, ``evaluate_config`` and
        ``evaluate_fn`` of the base class are not used: the initial model
        derives from the seed, messages come from the algorithm, evaluation
        is on the clients. ``timeout`` replaces ``round_timeout``.
        """
        if num_rounds is not None and int(num_rounds) != self.config.rounds:
            raise UserError(f"num_rounds={num_rounds} differs from the config's rounds={self.config.rounds}; set rounds in the spafl config")
        if timeout is not None:
            self.transport.round_timeout = float(timeout)
        if self.resume:
            self.transport.prepare_resume()
        else:
            claim_run_dir(self.out_dir, "resume it (run config resume = true) or choose another out-dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.summary()
        self.transport.grid = grid
        began = time.perf_counter()
        self.transport.discover(wait=True)
        if not self.resume or not (self.out_dir / CONFIG).exists():
            self._write_config()
        summary = self.loop.run(lambda: self.spec.initial_state(self.config.seed), self.resume, round_fn=self._round)
        if not summary:
            log(WARNING, "spafl: no round was evaluated; summary.json not written")
        log(INFO, "spafl: %d rounds in %.0f s", self.config.rounds, time.perf_counter() - began)
        result = Result()
        result.arrays = rec.to_array_record(rec.flatten_state(self.server))
        return result

    def _round(self, state: dict, round_index: int) -> dict[str, Any]:
        self.state = state
        return self.loop.run_round(state, round_index)

