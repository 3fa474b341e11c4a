"""One federated round and one run, whatever carries the messages.

Every engine runs the same round:

1. sample K of the N clients (from the seed and the round only);
2. build the algorithm's message for each sampled client the transport can reach;
3. exchange: the transport delivers the messages and brings the replies back;
4. validate every reply: the algorithm's check of its tensors, plausible
   statistics, a finite training loss;
5. aggregate the valid replies into the server state;
6. send the algorithm's broadcast, if this variant has one, to every client;
7. evaluate, every ``eval_every`` rounds and after the last;
8. append the round's row to ``metrics.jsonl``, and checkpoint.

A :class:`Transport` is what an engine supplies: how messages reach
clients and replies come back (the simulator's worker processes, Flower's
Grid), where client states live, and what its checkpoint holds. Bits are
counted here, from the messages built and the replies received
(:mod:`spafl.metrics.bits`), so both engines count alike.

The run state is a dict: ``round`` (rounds done), ``server`` (the
algorithm's server state), ``bits_cum``, ``flops_cum`` and ``last_eval``;
a transport may keep more in it (the simulator keeps its client store).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from spafl.algorithms.base import Algorithm, Message, Reply, State
from spafl.config import Config
from spafl.errors import FILE_ERRNOS, DivergedError, UserError, file_error, short_path
from spafl.metrics.bits import coded_message_bits, message_bits
from spafl.runtime.record import (
    METRICS, SUMMARY, MetricsFile, interrupts_deferred, metrics_row, read_metrics, remove_stale_temporaries, rows_through, summarize_run,
    write_json_atomic, write_metrics,
)
from spafl.seeding import sample_clients

RunState = dict[str, Any]

#: What a run state holds besides a transport's own entries (``bits_cum_coded``, ``flops_true_cum`` only where the
#: algorithm reports them).
STATE_KEYS = ("round", "server", "bits_cum", "flops_cum", "last_eval", "bits_cum_coded", "flops_true_cum")


def run_state_of(saved: dict[str, Any]) -> RunState:
    """The run state in a checkpoint that also holds a transport's entries."""
    return {key: saved[key] for key in STATE_KEYS if key in saved}


@dataclass
class Received:
    """A client's reply as it came back, before validation."""

    client_id: int
    message: Message
    stats: dict[str, float]
    bits: int  # payload bits of the message, counted from its encodings


@dataclass
class Exchange:
    """What a transport reports about one round's train messages."""

    received: list[Received] = field(default_factory=list)
    #: replies the transport could not read or attribute: (client id or None, why); their bits are in ``bits_up``
    rejected: list[tuple[int | None, str]] = field(default_factory=list)
    missing: int = 0  # messages sent that got no reply
    bits_up: int = 0  # bits of the rejected replies (they travelled all the same)
    bits_down: int = 0  # bits sent beside the train messages (broadcasts a client had missed)


@dataclass
class Accepted:
    """The replies of one round that passed validation, and what the round counts of all replies."""

    replies: list[Reply] = field(default_factory=list)
    rejected: list[tuple[int | None, str]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    flops: float = 0.0
    flops_true: float = 0.0  # the same with every linear counted per position (Algorithm.reports_true_flops)
    guard_resets: int = 0  # the collapse guard's resets while these clients trained
    bits_up: int = 0
    bits_up_coded: int = 0  # the same replies with their bitmasks entropy-coded (:func:`spafl.metrics.bits.coded_message_bits`)


class Transport(ABC):
    """How one engine moves a round's messages and keeps client states."""

    #: True: a reply that fails validation stops the run (in this process it can only be a bug or a divergence);
    #: False: it is rejected and logged, and the round goes on (a remote node).
    strict: ClassVar[bool] = True
    #: fields this engine adds to every metrics row, after the shared ones
    row_fields: ClassVar[tuple[str, ...]] = ()
    #: checkpoint after every round, whatever ``checkpoint_every`` says
    checkpoint_each_round: ClassVar[bool] = False

    def begin_round(self, round_index: int) -> None:
        """Before sampling round ``round_index`` (0-based)."""

    def reachable(self, client_id: int) -> bool:
        return True

    @abstractmethod
    def train(self, round_index: int, sends: list[tuple[int, Message]], server: State, evaluate_after: bool) -> Exchange:
        """Deliver each ``(client id, message)``, run the clients' updates, return their replies.

        ``server`` is the state the messages were built from; with
        ``evaluate_after``, the round ends with an evaluation and a transport
        may evaluate a trained client where it trained.
        """

    @abstractmethod
    def broadcast(self, round_index: int, message: Message) -> int:
        """Send ``message`` to every client; returns how many it was sent to."""

    @abstractmethod
    def evaluate(self, round_number: int, server: State) -> dict[str, Any] | None:
        """Every evaluated client's figures combined (:func:`spafl.metrics.summarize`); None: no usable evaluation."""

    def late_bits_down(self) -> int:
        """Bits sent since the last call beside the round's own messages (broadcasts a client had missed, delivered late)."""
        return 0

    def round_facts(self) -> dict[str, Any]:
        """Engine-specific facts of the round just run, for the fields in :attr:`row_fields`."""
        return {}

    @abstractmethod
    def fresh(self, state: RunState, initial_model: dict) -> None:
        """Start a new run from ``initial_model``: add what the transport keeps to ``state``, clear what an earlier run left."""

    @abstractmethod
    def save(self, state: RunState) -> None:
        """Checkpoint ``state`` (after ``state['round']`` rounds)."""

    @abstractmethod
    def load(self) -> RunState | None:
        """The last checkpoint as a run state, or None when there is none."""

    def after_row(self, round_number: int, row: dict[str, Any]) -> None:
        """The row of round ``round_number`` is written (progress display, mask records)."""


class RoundLoop:
    """The round and the run of :mod:`spafl.runtime.round`, over one transport."""

    def __init__(self, config: Config, algorithm: Algorithm, transport: Transport, run_dir: str | Path) -> None:
        self.config = config
        self.algorithm = algorithm
        self.transport = transport
        self.run_dir = Path(run_dir)
        self.checkpointed = 0  # the round of the last checkpoint

    def fresh_state(self, initial_model: dict) -> RunState:
        return {
            "round": 0, "server": self.algorithm.init_server(initial_model), "bits_cum": 0, "flops_cum": 0.0, "last_eval": None,
        }

    def evaluates_after(self, round_number: int) -> bool:
        """Whether a run evaluates after round ``round_number`` (1-based): every ``eval_every`` rounds and after the last."""
        return round_number % self.config.eval_every == 0 or round_number == self.config.rounds

    # -- one round -------------------------------------------------------------------
    def messages(self, state: RunState, round_index: int) -> tuple[list[int], list[tuple[int, Message]], list[int]]:
        """Steps 1-2: the sampled clients, the ``(client, message)`` pairs for those the transport reaches, the unreachable ones."""
        config = self.config
        sampled = sample_clients(config.seed, round_index, config.num_clients, config.clients_per_round)
        sends, unavailable = [], []
        for client_id in sampled:
            if self.transport.reachable(client_id):
                sends.append((client_id, self.algorithm.server_message(state["server"], client_id, round_index)))
            else:
                unavailable.append(client_id)
        return sampled, sends, unavailable

    def accept(self, state: RunState, exchange: Exchange, round_index: int) -> Accepted:
        """Step 4: the valid replies, in client order, with their statistics; the rest rejected (or, strict, an error)."""
        accepted = Accepted(rejected=list(exchange.rejected), bits_up=exchange.bits_up)
        for got in sorted(exchange.received, key=lambda r: r.client_id):  # sampled clients are in this order
            accepted.bits_up += got.bits
            if self.algorithm.reports_coded_bits:
                accepted.bits_up_coded += coded_message_bits(got.message)
            reply = Reply(got.client_id, got.message, int(got.stats.get("num_samples", 0)))
            why = self._invalid(state, reply, got.stats, round_index)
            if why is not None:
                accepted.rejected.append((got.client_id, why))
                continue
            accepted.replies.append(reply)
            accepted.flops += got.stats.get("flops", 0.0)
            accepted.flops_true += got.stats.get("flops_true", 0.0)
            accepted.guard_resets += got.stats.get("guard_resets", 0)
            if got.stats.get("steps", 0):
                accepted.losses.append(got.stats.get("train_loss", math.nan))
        return accepted

    def run_round(self, state: RunState, round_index: int) -> dict[str, Any]:
        """Train round ``round_index`` (0-based) into ``state``; returns the row's round facts (no evaluation)."""
        config, algorithm, transport = self.config, self.algorithm, self.transport
        transport.begin_round(round_index)
        sampled, sends, unavailable = self.messages(state, round_index)
        exchange = transport.train(round_index, sends, state["server"], self.evaluates_after(round_index + 1))
        accepted = self.accept(state, exchange, round_index)
        bits_down = sum(message_bits(down) for _, down in sends) + exchange.bits_down
        state["server"] = algorithm.aggregate(state["server"], accepted.replies, round_index)
        broadcast = algorithm.broadcast_message(state["server"], round_index)
        if broadcast is not None:  # one message for every client; the simulator delivers it when it next loads a client
            bits_down += transport.broadcast(round_index, broadcast) * message_bits(broadcast)
        bits_down += transport.late_bits_down()
        state["round"] = round_index + 1
        state["bits_cum"] += accepted.bits_up + bits_down
        state["flops_cum"] += accepted.flops / config.num_clients
        facts = {
            "round": round_index + 1,
            "sampled": sampled,
            "replies": len(accepted.replies),
            "train_loss": float(np.mean(accepted.losses)) if accepted.losses else None,
            "bits_up": accepted.bits_up,
            "bits_down": bits_down,
            "bits_cum": state["bits_cum"],
            "flops_cum": state["flops_cum"],
        }
        if algorithm.reports_true_flops:
            state["flops_true_cum"] = state.get("flops_true_cum", 0.0) + accepted.flops_true / config.num_clients
            facts["flops_true_cum"] = state["flops_true_cum"]
        if algorithm.has_collapse_guard:
            facts["guard_resets_train"] = accepted.guard_resets
        if algorithm.reports_coded_bits:  # beside the raw bits, never instead of them
            state["bits_cum_coded"] = state.get("bits_cum_coded", 0) + accepted.bits_up_coded + bits_down
            facts.update(bits_up_coded=accepted.bits_up_coded, bits_cum_coded=state["bits_cum_coded"])
        shared = {"rejected": len(accepted.rejected), "missing": exchange.missing, "unavailable": unavailable}
        return self._with_engine_fields(facts, shared)

    def _invalid(self, state: RunState, reply: Reply, stats: dict[str, float], round_index: int) -> str | None:
        """Why a reply cannot be aggregated (None: it can); in a strict transport, a divergence stops the run."""
        steps, loss, flops = stats.get("steps", 0), stats.get("train_loss", math.nan), stats.get("flops", 0.0)
        if steps and not math.isfinite(loss):
            if self.transport.strict:
                raise DivergedError(
                    f"round {round_index + 1}: client {reply.client_id}'s training loss is {loss}; the run diverged. "
                    f"The last good checkpoint (round {self.checkpointed}) is kept; lower lr or th_coeff, or set grad_clip, "
                    "and start a new run"
                )
            return f"training loss is {loss} (the client diverged)"
        resets, flops_true = stats.get("guard_resets", 0), stats.get("flops_true", 0.0)
        if reply.num_samples < 0 or steps < 0 or not math.isfinite(flops + flops_true) or min(flops, flops_true, resets) < 0:
            why = f"implausible statistics (num_samples {reply.num_samples}, steps {steps}, flops {flops}, guard_resets {resets})"
        else:
            why = self.algorithm.validate_reply(state["server"], reply)
        if why is not None and self.transport.strict:
            raise RuntimeError(f"round {round_index + 1}: client {reply.client_id}'s reply is invalid: {why}")
        return why

    def _with_engine_fields(self, facts: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
        values = {**shared, **self.transport.round_facts()}
        return {**facts, **{name: values[name] for name in self.transport.row_fields}}

    # -- the run ---------------------------------------------------------------------
    def _row(self, facts: dict[str, Any], state: RunState, evaluate: bool, began: float) -> dict[str, Any]:
        evaluated = False
        if evaluate:
            evaluation = self.transport.evaluate(facts["round"], state["server"])
            if evaluation is not None:
                state["last_eval"], evaluated = evaluation, True
            late = self.transport.late_bits_down()  # broadcasts delivered with the evaluation
            if late:
                state["bits_cum"] += late
                facts = {**facts, "bits_down": facts["bits_down"] + late, "bits_cum": state["bits_cum"]}
        return metrics_row(facts, state["last_eval"], evaluated, time.perf_counter() - began)

    def run(self, initial_model: Callable[[], dict], resume: bool, round_fn: Callable[[RunState, int], dict] | None = None) -> dict[str, Any]:
        """Run (or resume) the configured rounds into the run directory; returns summary.json's content.

        ``round_fn`` replaces :meth:`run_round` (an engine that wraps it). A
        file-system fault (a full disk, a read-only directory) is a one-line
        UserError naming the file; the last checkpoint and the rows before it
        are intact, so the run resumes once it is fixed.
        """
        try:
            return self._run(initial_model, resume, round_fn)
        except OSError as error:
            if error.errno not in FILE_ERRNOS:
                raise
            doing = f"cannot write the run record in {short_path(self.run_dir)}"
            kept = (f"its checkpoint of round {self.checkpointed} and the rows up to it are kept" if self.checkpointed
                    else "no checkpoint was written yet, so a resume starts it again")
            raise UserError(f"{file_error(error, doing, self.run_dir)}; {kept}: fix this, then resume the run") from None

    def resumed_rows(self, state: RunState) -> list[dict[str, Any]]:
        """The rows a resume from ``state`` keeps (0..its round); UserError if the checkpoint and the rows do not fit together.

        Checked before metrics.jsonl changes (loading the checkpoint may only
        have dropped client files written after it, which the resume recomputes).
        """
        done = state["round"]
        if not isinstance(done, int) or isinstance(done, bool) or done < 0:
            raise UserError(f"the checkpoint in {short_path(self.run_dir)} is damaged (its round is {done!r})")
        if done > self.config.rounds:
            raise UserError(
                f"the checkpoint in {short_path(self.run_dir)} is at round {done}, but the run has {self.config.rounds} rounds "
                "(config.json); it is not this run's checkpoint, or config.json was edited: restore rounds >= "
                f"{done}, or start a new run"
            )
        return rows_through(self.run_dir / METRICS, done) if done > 0 else []

    def _run(self, initial_model: Callable[[], dict], resume: bool, round_fn: Callable[[RunState, int], dict] | None) -> dict[str, Any]:
        config = self.config
        round_fn = round_fn or self.run_round
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.run_dir)
        metrics_path = self.run_dir / METRICS
        state = self.transport.load() if resume else None
        if state is not None:
            write_metrics(metrics_path, self.resumed_rows(state))  # rows after the checkpoint's round will be re-run
            self.checkpointed = state["round"]
        else:
            initial = initial_model()
            state = self.fresh_state(initial)
            self.transport.fresh(state, initial)
            metrics_path.write_text("")
        metrics = MetricsFile(metrics_path)
        try:
            if state["round"] == 0:
                began = time.perf_counter()
                facts = {"round": 0, "sampled": [], "replies": 0, "train_loss": None, "bits_up": 0, "bits_down": 0, "bits_cum": 0, "flops_cum": 0.0}
                if self.algorithm.reports_true_flops:
                    facts["flops_true_cum"] = 0.0
                if self.algorithm.has_collapse_guard:
                    facts["guard_resets_train"] = 0
                row = self._row(self._with_engine_fields(facts, {"rejected": 0, "missing": 0, "unavailable": []}), state, True, began)
                metrics.append(row)
                self.transport.after_row(0, row)
            for round_index in range(state["round"], config.rounds):
                began = time.perf_counter()
                facts = round_fn(state, round_index)
                number = round_index + 1
                row = self._row(facts, state, self.evaluates_after(number), began)
                metrics.append(row)
                if self.transport.checkpoint_each_round or number % config.checkpoint_every == 0 or number == config.rounds:
                    with interrupts_deferred():  # a Ctrl-C stops the run after the checkpoint, not half-way through it
                        metrics.sync()  # the rows before the checkpoint that says they exist
                        self.transport.save(state)
                        self.checkpointed = number
                self.transport.after_row(number, row)
            if config.rounds == 0 and self.checkpointed == 0:
                with interrupts_deferred():
                    self.transport.save(state)
        finally:
            metrics.close()
        rows = read_metrics(metrics_path)
        if not any(r["evaluated"] for r in rows):
            return {}
        summary = summarize_run(rows)
        write_json_atomic(self.run_dir / SUMMARY, summary)
        return summary
