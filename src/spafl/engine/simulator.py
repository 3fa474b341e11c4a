"""The in-process simulator: all clients in one process, state kept for every client.

Per round: sample clients (seeded by (seed, round) only), send each the
server's message, run the algorithm's client update, aggregate, send any
broadcast to every client, evaluate every client (or the fixed seeded subset
``eval_clients``) every ``eval_every`` rounds (and at the last round), append
one JSON line to ``metrics.jsonl`` and checkpoint every ``checkpoint_every``
rounds. Round 0 is the evaluation of the common initial model.

Client states live in a store (:mod:`spafl.engine.store`; in memory, or one
file per client under ``run_dir/clients``) and are loaded only for the
clients a round trains or evaluates; a broadcast is logged and delivered to
a client when it is next loaded, so memory does not grow with N x model size.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spafl.algorithms import ALGORITHMS, Algorithm, ClientTask, Reply
from spafl.config import Config
from spafl.engine import checkpoint as ckpt
from spafl.engine.federation import Federation, build_federation
from spafl.engine.progress import Progress
from spafl.engine.rundir import METRICS, SUMMARY, read_metrics, truncate_metrics, write_json_atomic
from spafl.engine.store import Clients, choose_store, make_store
from spafl.errors import DivergedError, UserError
from spafl.engine.parallel import ClientRunner, resolve_workers
from spafl.metrics import GIGA, ClientEval, message_bits, summarize
from spafl.nn import masked_layers
from spafl.seeding import derive_seed, sample_clients

EVAL_KEYS = ("accuracy", "accuracy_std_clients", "accuracy_weighted", "accuracy_majority", "loss", "density", "density_weighted", "clients_evaluated")


def metrics_row(base: dict[str, Any], last_eval: dict[str, Any] | None, evaluated: bool, seconds: float) -> dict[str, Any]:
    """One metrics.jsonl row: round facts from ``base``, evaluation values (carried when not ``evaluated``)."""
    carried = last_eval or {}
    row = {"round": base["round"], "evaluated": evaluated}
    row.update({key: carried.get(key) for key in EVAL_KEYS})
    row.update({k: v for k, v in base.items() if k != "round"})
    row["seconds"] = seconds
    return row


def configure_threads(config: Config) -> int:
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def evaluation_clients(config: Config) -> list[int]:
    """The clients evaluated every round: all, or ``eval_clients`` of them drawn once (sorted) from the seed."""
    if config.eval_clients == 0:
        return list(range(config.num_clients))
    rng = np.random.default_rng(derive_seed(config.seed, "eval_clients"))
    return sorted(int(c) for c in rng.choice(config.num_clients, size=config.eval_clients, replace=False))


def resolve_device(config: Config) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available here; use --set device=cpu")
    return torch.device(config.device)


class Simulator:
    """Runs one configured experiment into ``run_dir``."""

    def __init__(self, config: Config, run_dir: str | Path, federation: Federation | None = None, progress: bool = True) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.threads = configure_threads(config)
        resolve_device(config)
        self.federation = federation or build_federation(config)
        self.algorithm: Algorithm = ALGORITHMS[config.method](config, self.federation.spec)
        self.show_progress = progress
        self.evaluated_clients = evaluation_clients(config)
        self.workers = resolve_workers(config.workers, config.device, config.clients_per_round)
        self.runner = ClientRunner(self.algorithm, self.federation.clients, config.eval_batch_size, self.workers)
        self._memo_token = 0
        self._memo: dict[int, tuple[int | None, ClientEval]] = {}

    # -- state -----------------------------------------------------------------
    def _clients(self, initial: dict[str, torch.Tensor]) -> Clients:
        """An empty store of client states: every client starts from ``initial`` (shared, not copied)."""
        kind = choose_store(self.config.client_store, initial, self.config.num_clients)
        store = make_store(kind, lambda client_id: self.algorithm.init_client(client_id, initial), self.run_dir)
        return Clients(store, self.algorithm.client_receive, self.config.num_clients)

    def fresh_state(self) -> dict[str, Any]:
        initial = self.federation.spec.initial_state(self.config.seed)
        return {
            "round": 0,
            "server": self.algorithm.init_server(initial),
            "clients": self._clients(initial),
            "bits_cum": 0,
            "flops_cum": 0.0,
            "last_eval": None,
        }

    def restore_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        state = {key: saved[key] for key in ("round", "server", "bits_cum", "flops_cum", "last_eval")}
        clients = self._clients(self.federation.spec.initial_state(self.config.seed))
        clients.version = state["round"]
        if isinstance(saved["clients"], list):  # format 1: every client's state, broadcasts already applied
            clients.store.clear()
            for client_id, client in enumerate(saved["clients"]):
                clients.save(client_id, client)
            clients.store.flush()
            clients.store.commit()
        else:
            clients.restore(saved["clients"])
        state["clients"] = clients
        return state

    def _checkpoint(self, state: dict[str, Any]) -> None:
        clients: Clients = state["clients"]
        clients.store.flush()
        ckpt.save_checkpoint(self.run_dir, {
            **state, "clients": clients.checkpoint_state(), "torch_rng": torch.get_rng_state(), "config": self.config.to_dict(),
        })
        clients.store.commit()

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, state: dict[str, Any]) -> dict[str, float]:
        """Evaluate the clients of :attr:`evaluated_clients`, each on its own test split.

        With ``execution=fast`` and an algorithm that evaluates each client's
        own state (:attr:`Algorithm.personal_evaluation`), a client whose
        state has not changed since its last evaluation is not evaluated
        again: its last result is reused. The numbers are the same; the
        compute is that of the clients trained (or sent a broadcast) since.
        A client :meth:`run_round` trained was evaluated already, by the
        process that trained it (see :meth:`ClientRunner.train`).
        """
        clients: Clients = state["clients"]
        memo = self._evaluation_memo(clients)
        results: dict[int, ClientEval] = {}
        stale = []
        for client_id in self.evaluated_clients:
            known = memo.get(client_id)
            if known is not None and known[0] == clients.revision(client_id):
                results[client_id] = known[1]
            else:
                stale.append(client_id)
        jobs = ((client_id, self.algorithm.evaluation_state(clients.load(client_id), state["server"])) for client_id in stale)
        for client_id, result in zip(stale, self.runner.evaluate(jobs)):
            results[client_id] = result
            memo[client_id] = (clients.revision(client_id), result)  # loading wrote back any broadcasts it applied
        return summarize([results[client_id] for client_id in self.evaluated_clients])

    def _memoizes(self) -> bool:
        """Whether evaluations are kept for clients whose state has not changed (``execution=fast``, personal evaluation)."""
        return self.config.execution == "fast" and self.algorithm.personal_evaluation

    def evaluates_after(self, round_number: int) -> bool:
        """Whether a run evaluates after round ``round_number`` (1-based): every ``eval_every`` rounds and after the last."""
        return round_number % self.config.eval_every == 0 or round_number == self.config.rounds

    def _evaluation_memo(self, clients: Clients) -> dict[int, tuple[int | None, ClientEval]]:
        """Last evaluation of each client of ``clients``, with the state revision it was made at (a scratch dict when off)."""
        if not self._memoizes():
            return {}
        if self._memo_token != clients.token:
            self._memo_token, self._memo = clients.token, {}
        return self._memo

    def _record_masks(self, state: dict[str, Any], round_number: int) -> None:
        """Kept/pruned state of every unit of every client, bit-packed (for sparsity-pattern figures)."""
        masks: dict[str, list[np.ndarray]] = {}
        for client_id in range(self.config.num_clients):
            # not written back: at large N that would materialize every client
            weights = self.algorithm.evaluation_state(state["clients"].load(client_id, write_back=False), state["server"])
            model = self.algorithm.workspace(weights)
            for name, layer in masked_layers(model):
                masks.setdefault(name, []).append(layer.kept_units().cpu().numpy())
        directory = self.run_dir / "masks"
        directory.mkdir(exist_ok=True)
        packed = {name: np.packbits(np.stack(rows), axis=1) for name, rows in masks.items()}
        units = {f"units/{name}": np.array(len(rows[0])) for name, rows in masks.items()}
        np.savez_compressed(directory / f"round_{round_number:05d}.npz", **packed, **units)

    # -- one round -------------------------------------------------------------
    def run_round(self, state: dict[str, Any], round_index: int) -> dict[str, Any]:
        """Train round ``round_index`` (0-based) in place; returns the round's metrics row (without eval)."""
        config = self.config
        algorithm = self.algorithm
        sampled = sample_clients(config.seed, round_index, config.num_clients, config.clients_per_round)
        clients: Clients = state["clients"]
        clients.version = round_index + 1
        replies, losses = [], []
        bits_up = bits_down = 0
        flops = 0.0
        # A trained client that the round's evaluation will need is evaluated where it trained, in parallel.
        # Not where a broadcast will change every state after aggregation: every client is evaluated again then.
        memo = self._evaluation_memo(clients)
        evaluate_after = set()
        if self._memoizes() and not algorithm.may_broadcast and self.evaluates_after(round_index + 1):
            evaluate_after = set(self.evaluated_clients)
        jobs = []
        for client_id in sampled:
            down = algorithm.server_message(state["server"], client_id, round_index)
            bits_down += message_bits(down)
            task = ClientTask(client_id=client_id, round_index=round_index, seed=config.seed)
            server = state["server"] if client_id in evaluate_after else None
            jobs.append((client_id, clients.load(client_id, write_back=False), down, task, server))  # saved below, after training
        for client_id, (result, evaluation) in zip(sampled, self.runner.train(jobs)):
            loss = result.stats.get("train_loss", float("nan"))
            if result.stats.get("steps", 0) and not math.isfinite(loss):
                raise DivergedError(
                    f"round {round_index + 1}: client {client_id}'s training loss is {loss}; the run diverged. "
                    f"The last good checkpoint (round {state['round']}) is kept; lower lr or th_coeff, or set grad_clip, and start a new run"
                )
            clients.save(client_id, result.state)
            if evaluation is not None:  # a broadcast below changes the revision, and then this is not used
                memo[client_id] = (clients.revision(client_id), evaluation)
            bits_up += message_bits(result.message)
            flops += result.stats.get("flops", 0.0)
            if result.stats.get("steps", 0):
                losses.append(loss)
            replies.append(Reply(client_id, result.message, int(result.stats.get("num_samples", 0))))
        state["server"] = algorithm.aggregate(state["server"], replies, round_index)
        broadcast = algorithm.broadcast_message(state["server"], round_index)
        if broadcast is not None:  # sent to all N clients now; each applies it when next loaded
            bits_down += config.num_clients * message_bits(broadcast)
            clients.broadcast(round_index, broadcast)
        state["round"] = round_index + 1
        state["bits_cum"] += bits_up + bits_down
        state["flops_cum"] += flops / config.num_clients
        return {
            "round": round_index + 1,
            "sampled": sampled,
            "replies": len(replies),
            "train_loss": float(np.mean(losses)) if losses else None,
            "bits_up": bits_up,
            "bits_down": bits_down,
            "bits_cum": state["bits_cum"],
            "flops_cum": state["flops_cum"],
        }

    # -- the run ---------------------------------------------------------------
    def _row(self, base: dict[str, Any], state: dict[str, Any], evaluate: bool, seconds: float) -> dict[str, Any]:
        if evaluate:
            state["last_eval"] = self.evaluate(state)
        return metrics_row(base, state["last_eval"], evaluate, seconds)

    def run(self, resume: bool = False) -> dict[str, Any]:
        try:
            return self._run(resume)
        finally:
            self.runner.close()

    def _run(self, resume: bool) -> dict[str, Any]:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.run_dir)
        metrics_path = self.run_dir / METRICS
        saved = ckpt.load_checkpoint(self.run_dir) if resume else None
        if saved is not None:
            state = self.restore_state(saved)
            torch.set_rng_state(saved["torch_rng"])
            truncate_metrics(metrics_path, state["round"])
        else:
            state = self.fresh_state()
            state["clients"].store.clear()  # files of an earlier run in this directory
            metrics_path.write_text("")
        progress = Progress(config.rounds, start=state["round"], enabled=self.show_progress)
        with open(metrics_path, "a") as metrics:
            def emit(row: dict[str, Any]) -> None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

            if state["round"] == 0:
                began = time.perf_counter()
                base = {"round": 0, "sampled": [], "replies": 0, "train_loss": None, "bits_up": 0, "bits_down": 0, "bits_cum": 0, "flops_cum": 0.0}
                row = self._row(base, state, True, 0.0)
                row["seconds"] = time.perf_counter() - began
                emit(row)
                if 0 in config.record_masks:
                    self._record_masks(state, 0)
            for round_index in range(state["round"], config.rounds):
                began = time.perf_counter()
                base = self.run_round(state, round_index)
                number = round_index + 1
                row = self._row(base, state, self.evaluates_after(number), 0.0)
                row["seconds"] = time.perf_counter() - began
                emit(row)
                if number in config.record_masks:
                    self._record_masks(state, number)
                if number % config.checkpoint_every == 0 or number == config.rounds:
                    self._checkpoint(state)
                progress.update(number, row["accuracy"], row["density"], row["bits_cum"] / GIGA)
        summary = summarize_run(read_metrics(metrics_path))
        write_json_atomic(self.run_dir / SUMMARY, summary)
        return summary


def summarize_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: final, best-round and sparsest-round figures, totals."""
    evaluated = [r for r in rows if r["evaluated"] and r["round"] > 0] or [r for r in rows if r["evaluated"]]
    final = rows[-1]
    best = max(evaluated, key=lambda r: (r["accuracy"], -r["round"]))
    sparsest = min(evaluated, key=lambda r: (r["density"], r["round"]))
    return {
        "rounds": final["round"],
        "final": {key: final[key] for key in ("round", "accuracy", "accuracy_std_clients", "accuracy_weighted", "accuracy_majority", "loss", "density", "density_weighted")},
        "best_round": {"round": best["round"], "accuracy": best["accuracy"], "density": best["density"]},
        "lowest_density": {"round": sparsest["round"], "density": sparsest["density"], "accuracy": sparsest["accuracy"]},
        "gbit_total": final["bits_cum"] / GIGA,
        "bits_total": final["bits_cum"],
        "flops_total": final["flops_cum"],
        "seconds_total": sum(r["seconds"] for r in rows),
    }
