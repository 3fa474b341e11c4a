"""Running a round's clients side by side: one worker process per core, each single-threaded.

A sampled client's update and a client's evaluation depend only on its
state, the server's message and its own data, so clients can run in any
order and any process. On a small CPU, compact (kept-units-only) layers are
too small for PyTorch's intra-op threads to pay off, while one client per
core keeps every core busy.

Workers are forked after the federation and the algorithm are built, so
they share the dataset pages and need no pickling of models or factories;
only client states, messages and results travel through pipes. Each worker
computes with one thread, so a run with ``workers=W`` gives exactly the
results of a serial run with ``threads=1``, whatever W is. Workers ignore
Ctrl-C: the parent stops them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch

from spafl.algorithms.base import Algorithm, ClientData, ClientResult, ClientTask, Message, State
from spafl.metrics.evaluation import ClientEval, evaluate_client

# what a forked worker inherited from the parent (set just before the fork)
_inherited: dict[str, Any] = {}


def resolve_workers(requested: int, device: str, clients_per_round: int) -> int:
    """``workers=0`` (auto): one per core on a multi-core Linux CPU, at most one per sampled client.

    Auto stays at 1 elsewhere: forking a process that has initialized torch is
    only dependable on Linux. An explicit ``workers`` needs the fork start method.
    """
    if device != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if requested > 0:
        return requested
    if not sys.platform.startswith("linux"):
        return 1
    return max(1, min(os.cpu_count() or 1, clients_per_round))


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _train(job: tuple[int, State, Message, ClientTask]) -> ClientResult:
    client_id, client, message, task = job
    return _inherited["algorithm"].client_update(client, message, _inherited["clients"][client_id], task)


def _evaluate(job: tuple[int, dict[str, torch.Tensor]]) -> ClientEval:
    client_id, weights = job
    algorithm: Algorithm = _inherited["algorithm"]
    return evaluate_client(algorithm.workspace(weights), _inherited["clients"][client_id], _inherited["eval_batch_size"], algorithm.device)


class ClientRunner:
    """Runs client updates and evaluations, in ``workers`` processes or (workers=1) in this one."""

    def __init__(self, algorithm: Algorithm, clients: list[ClientData], eval_batch_size: int, workers: int) -> None:
        self.algorithm = algorithm
        self.clients = clients
        self.eval_batch_size = eval_batch_size
        self.workers = workers
        self._pool = None

    def _map(self, function, jobs: Iterable, chunk: int = 0) -> Iterator:
        """``function`` over ``jobs`` in order; with workers, ``chunk`` jobs at a time (bounded memory; 0: 16 per worker)."""
        if self.workers <= 1 or self._pool is None:  # in this process, or just before the workers fork
            _inherited.update(algorithm=self.algorithm, clients=self.clients, eval_batch_size=self.eval_batch_size)
        if self.workers <= 1:
            yield from map(function, jobs)
            return
        if self._pool is None:
            self._pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=_start_worker)
        jobs = iter(jobs)
        while batch := list(islice(jobs, chunk or 16 * self.workers)):
            yield from self._pool.imap(function, batch)

    def train(self, jobs: list[tuple[int, State, Message, ClientTask]]) -> list[ClientResult]:
        """``client_update`` of each ``(client_id, state, message, task)``, results in job order.

        With workers, the clients with the most training samples start first
        (longest job first), so that no worker is left with a big client at
        the end of the round; the result of a client does not depend on when
        or where it runs.
        """
        if self.workers <= 1:
            return list(self._map(_train, jobs))
        order = sorted(range(len(jobs)), key=lambda j: -self.clients[jobs[j][0]].num_train)
        results: list[ClientResult | None] = [None] * len(jobs)
        for position, result in zip(order, self._map(_train, [jobs[j] for j in order], chunk=len(jobs))):
            results[position] = result
        return results  # type: ignore[return-value]

    def evaluate(self, jobs: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> Iterator[ClientEval]:
        """``evaluate_client`` of each ``(client_id, weights)``, results in job order."""
        return self._map(_evaluate, jobs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
