"""The in-process simulator: all clients in one process (and its forked workers), state kept for every client.

It is the in-process :class:`~spafl.runtime.round.Transport` of the shared
round (:mod:`spafl.runtime.round`): a round's messages go to worker processes
(:mod:`spafl.engine.parallel`), which run the clients' updates and send the
results back; client states live in a store (:mod:`spafl.engine.store`; in
memory, or one file per client under ``run_dir/clients``) and are loaded
only for the clients a round trains or evaluates. A broadcast is logged and
delivered to a client when it is next loaded, so memory does not grow with
N x model size. Clients are evaluated every ``eval_every`` rounds (and at
the last round): all of them, or the fixed seeded subset ``eval_clients``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from spafl.algorithms import Algorithm, ClientTask, Message, State
from spafl.config import Config
from spafl.engine import checkpoint as ckpt
from spafl.engine.parallel import ClientRunner, resolve_workers
from spafl.engine.progress import Progress
from spafl.engine.store import Clients, choose_store, make_store
from spafl.errors import UserError, short_path
from spafl.metrics import GIGA, ClientEval, message_bits, summarize
from spafl.nn import masked_layers
from spafl.runtime.federation import Federation, build_federation, configure_threads, make_algorithm, resolve_device
from spafl.runtime.round import STATE_KEYS, Exchange, Received, RoundLoop, RunState, Transport, run_state_of
from spafl.seeding import derive_seed


def evaluation_clients(config: Config) -> list[int]:
    """The clients evaluated every round: all, or ``eval_clients`` of them drawn once (sorted) from the seed."""
    if config.eval_clients == 0:
        return list(range(config.num_clients))
    rng = np.random.default_rng(derive_seed(config.seed, "eval_clients"))
    return sorted(int(c) for c in rng.choice(config.num_clients, size=config.eval_clients, replace=False))


class Simulator(Transport):
    """Runs one configured experiment into ``run_dir``, all clients in this process and its workers."""

    def __init__(self, config: Config, run_dir: str | Path, federation: Federation | None = None, progress: bool = True) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.threads = configure_threads(config)
        resolve_device(config)
        self.federation = federation or build_federation(config)
        self.algorithm: Algorithm = make_algorithm(config, self.federation.spec)
        self.show_progress = progress
        self.evaluated_clients = evaluation_clients(config)
        self.workers = resolve_workers(config.workers, config.device, config.clients_per_round)
        self.runner = ClientRunner(self.algorithm, self.federation.clients, config.evaluation_batch, self.workers)
        self.loop = RoundLoop(config, self.algorithm, self, self.run_dir)
        self._memo_token = 0
        self._memo: dict[int, tuple[int | None, ClientEval]] = {}
        self._this_round: dict[int, tuple[int | None, ClientEval]] = {}  # evaluations train() made that only this round uses
        self._state: RunState | None = None  # the run state the transport's calls refer to
        self._progress: Progress | None = None

    # -- state -----------------------------------------------------------------
    def _initial_model(self) -> dict[str, torch.Tensor]:
        return self.federation.spec.initial_state(self.config.seed)

    def _clients(self, initial: dict[str, torch.Tensor]) -> Clients:
        """An empty store of client states: every client starts from ``initial`` (shared, not copied)."""
        kind = choose_store(self.config.client_store, initial, self.config.num_clients)
        store = make_store(kind, lambda client_id: self.algorithm.init_client(client_id, initial), self.run_dir)
        return Clients(store, self.algorithm.client_receive, self.config.num_clients)

    def fresh_state(self) -> RunState:
        initial = self._initial_model()
        state = self.loop.fresh_state(initial)
        state["clients"] = self._clients(initial)
        self._state = state
        return state

    def restore_state(self, saved: dict[str, Any]) -> RunState:
        state = run_state_of(saved)
        clients = self._clients(self._initial_model())
        clients.version = state["round"]
        clients.restore(saved["clients"])
        state["clients"] = clients
        self._state = state
        return state

    def provenance(self) -> dict[str, Any]:
        """Where this run's results come from, for config.json."""
        from spafl.provenance import provenance

        dataset = self.federation.dataset
        return provenance(self.threads, dataset.checksums, dataset.source)

    # -- the transport ------------------------------------------------------------
    def fresh(self, state: RunState, initial_model: dict) -> None:
        state["clients"] = self._clients(initial_model)  # every client shares it until it is written
        state["clients"].store.clear()  # files of an earlier run in this directory
        self._state = state
        self._progress = Progress(self.config.rounds, start=0, enabled=self.show_progress)

    def save(self, state: RunState) -> None:
        clients: Clients = state["clients"]
        clients.store.flush()
        ckpt.save_checkpoint(self.run_dir, {
            **state, "clients": clients.checkpoint_state(), "torch_rng": torch.get_rng_state(), "config": self.config.to_dict(),
        })
        clients.store.commit()

    def load(self) -> RunState | None:
        """The checkpoint's run state; UserError if it lacks an entry, or config.json was edited since (but ``rounds``)."""
        saved = ckpt.load_checkpoint(self.run_dir)
        if saved is None:
            return None
        where = self.run_dir / ckpt.CHECKPOINT
        needed = [key for key in STATE_KEYS if key not in ("bits_cum_coded", "flops_true_cum")] + ["clients", "torch_rng", "config"]
        missing = [key for key in needed if key not in saved]
        if missing:
            raise UserError(
                f"checkpoint {short_path(where)} lacks {', '.join(missing)}; it is damaged or not a spafl checkpoint: "
                "delete it to restart the run from round 0"
            )
        ckpt.check_same_config(saved["config"], self.config.to_dict(), self.run_dir)
        try:
            state = self.restore_state(saved)
            torch.set_rng_state(saved["torch_rng"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            raise UserError(
                f"checkpoint {short_path(where)} is damaged or not a spafl checkpoint ({type(error).__name__}: "
                f"{short_path(error, 80)}): delete it to restart the run from round 0"
            ) from None
        self._progress = Progress(self.config.rounds, start=state["round"], enabled=self.show_progress)
        return state

    def begin_round(self, round_index: int) -> None:
        self._state["clients"].version = round_index + 1

    def train(self, round_index: int, sends: list[tuple[int, Message]], server: State, evaluate_after: bool) -> Exchange:
        """Each sampled client's update, in the workers; a trained client the round's evaluation needs is evaluated there too.

        Not where a broadcast will change every state after aggregation: every client is evaluated again then.
        """
        clients: Clients = self._state["clients"]
        memo = self._evaluation_memo(clients)
        evaluate_here = set()
        if self._memoizes() and not self.algorithm.may_broadcast and evaluate_after:
            evaluate_here = set(self.evaluated_clients)
        jobs = []
        for client_id, down in sends:
            task = ClientTask(client_id=client_id, round_index=round_index, seed=self.config.seed)
            jobs.append((client_id, clients.load(client_id, write_back=False), down, task, server if client_id in evaluate_here else None))
        exchange = Exchange()
        for (client_id, _), (result, evaluation) in zip(sends, self.runner.train(jobs)):
            clients.save(client_id, result.state)  # as its evaluation left it, where it was evaluated here
            if evaluation is not None:  # a broadcast below changes the revision, and then this is not used
                # this round's evaluation of the client, whether or not a later one may reuse it
                (memo if evaluation.settled else self._this_round)[client_id] = (clients.revision(client_id), evaluation)
            exchange.received.append(Received(client_id, result.message, result.stats, message_bits(result.message)))
        return exchange

    def broadcast(self, round_index: int, message: Message) -> int:
        self._state["clients"].broadcast(round_index, message)  # each client applies it when next loaded
        return self.config.num_clients

    def evaluate(self, round_number: int, server: State) -> dict[str, float]:
        return self._evaluate_clients(self._state["clients"], server)

    def after_row(self, round_number: int, row: dict[str, Any]) -> None:
        if round_number in self.config.record_masks:
            self._record_masks(self._state, round_number)
        if round_number > 0 and self._progress is not None:
            self._progress.update(round_number, row["accuracy"], row["density"], row["bits_cum"] / GIGA)

    # -- evaluation ------------------------------------------------------------
    def evaluate_state(self, state: RunState) -> dict[str, float]:
        """Evaluate the clients of :attr:`evaluated_clients` of ``state``."""
        return self._evaluate_clients(state["clients"], state["server"])

    def _evaluate_clients(self, clients: Clients, server: State) -> dict[str, float]:
        """Evaluate the clients of :attr:`evaluated_clients`, each on its own test split.

        With ``execution=fast`` and an algorithm that evaluates each client's
        own state (:attr:`Algorithm.personal_evaluation`), a client whose
        state has not changed since its last evaluation is not evaluated
        again: its last result is reused. The numbers are the same; the
        compute is that of the clients trained (or sent a broadcast) since.
        A client :meth:`train` trained was evaluated already, by the
        process that trained it (see :meth:`ClientRunner.train`).

        An evaluation that changed the client's weights (SpaFL's collapse
        guard: :attr:`ClientEval.after`) is stored as the client's state; it
        is kept for reuse only where evaluating that state again gives the
        same result (:attr:`ClientEval.settled`).
        """
        memo = self._evaluation_memo(clients)
        this_round, self._this_round = self._this_round, {}
        results: dict[int, ClientEval] = {}
        stale = []
        for client_id in self.evaluated_clients:
            known = this_round.get(client_id) or memo.get(client_id)
            if known is not None and known[0] == clients.revision(client_id):
                results[client_id] = known[1]
            else:
                stale.append(client_id)
        jobs = ((client_id, self.algorithm.evaluation_state(clients.load(client_id), server)) for client_id in stale)
        for client_id, result in zip(stale, self.runner.evaluate(jobs)):
            if result.after is not None:
                clients.save(client_id, self.algorithm.absorb_evaluation(clients.load(client_id), result.after))
                result.after = None
            results[client_id] = result
            if result.settled:
                memo[client_id] = (clients.revision(client_id), result)  # loading wrote back any broadcasts it applied
        return summarize([results[client_id] for client_id in self.evaluated_clients])

    def _memoizes(self) -> bool:
        """Whether evaluations are kept for clients whose state has not changed (``execution=fast``, personal evaluation)."""
        return self.config.execution == "fast" and self.algorithm.personal_evaluation

    def _evaluation_memo(self, clients: Clients) -> dict[int, tuple[int | None, ClientEval]]:
        """Last evaluation of each client of ``clients``, with the state revision it was made at (a scratch dict when off)."""
        if not self._memoizes():
            return {}
        if self._memo_token != clients.token:
            self._memo_token, self._memo = clients.token, {}
        return self._memo

    def _record_masks(self, state: RunState, round_number: int) -> None:
        """Kept/pruned state of every unit of every client, bit-packed (for sparsity-pattern figures).

        A client of a width method (HeteroFL, FjORD) holds a prefix of each layer's units: the units beyond it
        are recorded as pruned, so every row has the full model's width.
        """
        with torch.random.fork_rng(devices=[]):  # building the full model must not move the run's random stream
            full = {name: layer.kept_units().numel() for name, layer in masked_layers(self.federation.spec.factory())}
        masks: dict[str, list[np.ndarray]] = {name: [] for name in full}
        for client_id in range(self.config.num_clients):
            # not written back: at large N that would materialize every client
            weights = self.algorithm.evaluation_state(state["clients"].load(client_id, write_back=False), state["server"])
            model = self.algorithm.workspace(weights)
            for name, layer in masked_layers(model):
                kept = layer.kept_units().cpu().numpy()
                masks[name].append(np.pad(kept, (0, full[name] - kept.size)))
        directory = self.run_dir / "masks"
        directory.mkdir(exist_ok=True)
        packed = {name: np.packbits(np.stack(rows), axis=1) for name, rows in masks.items()}
        units = {f"units/{name}": np.array(full[name]) for name in masks}
        np.savez_compressed(directory / f"round_{round_number:05d}.npz", **packed, **units)

    # -- rounds and the run --------------------------------------------------------
    def evaluates_after(self, round_number: int) -> bool:
        return self.loop.evaluates_after(round_number)

    def run_round(self, state: RunState, round_index: int) -> dict[str, Any]:
        """Train round ``round_index`` (0-based) in place; returns the round's metrics row (without eval)."""
        self._state = state
        return self.loop.run_round(state, round_index)

    def run(self, resume: bool = False) -> dict[str, Any]:
        try:
            return self._run(resume)
        finally:
            self.runner.close()

    def _run(self, resume: bool) -> dict[str, Any]:
        return self.loop.run(self._initial_model, resume, round_fn=lambda state, index: self.run_round(state, index))
