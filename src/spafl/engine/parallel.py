"""Running a round's clients side by side: one worker process per core, each single-threaded.

A sampled client's update and a client's evaluation depend only on its
state, the server's message and its own data, so clients can run in any
order and any process. On a small CPU, compact (kept-units-only) layers are
too small for PyTorch's intra-op threads to pay off, while one client per
core keeps every core busy.

Workers are forked afresh for each batch of work (a round's training, an
evaluation pass), after the jobs are in the parent's memory: they see the
federation, the algorithm and the jobs' client states copy-on-write, and
only a job's index goes to a worker and its (small, or newly trained)
result comes back, as bytes that a thread of the parent reads while the
parent computes. Sending every job's client state to long-lived workers
would cost more than forking (a few ms per LeNet-5 state each way, 20-30 ms
per forked process of a 1 GB parent). The parent is one of the
``workers``: it forks ``workers - 1`` children and takes jobs from the same
shared counter as they do, and a child that has delivered its results
exits while the parent goes on (it is reaped at the next batch). Each
worker computes with one thread, so a run with ``workers=W`` gives exactly
the results of a serial run with ``threads=1``, whatever W is. Work too
small to pay for a fork (a single job; an evaluation of few test samples,
such as the clients one round changed) runs in the parent alone, also with
one thread. Children ignore Ctrl-C: the parent stops them. On Linux a
child also dies with the parent, whatever ends it (SIGKILL included): it
asks the kernel for SIGKILL when the thread that forked it (the parent's,
in :meth:`ClientRunner._run`) exits, so no orphaned worker is left holding
memory and the run's files.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from spafl.algorithms.base import Algorithm, ClientData, ClientResult, ClientTask, Message, State
from spafl.metrics.evaluation import ClientEval

# what a forked worker inherited from the parent (set just before the fork)
_inherited: dict[str, Any] = {}

#: Evaluation jobs forked together hold at most about this many bytes of weights.
EVAL_CHUNK_BYTES = 512 * 2**20

#: An evaluation pass over fewer test samples than this runs in the parent: forking a pool
#: (about 0.1 s for a 1 GB parent) costs more than it saves (LeNet-5 evaluates ~20k samples/s per core).
PARALLEL_EVAL_MIN_SAMPLES = 4096


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


#: prctl(2) option: the signal a process gets when the thread that forked it exits (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int | None) -> None:
    """Linux: be killed (SIGKILL) when the thread that forked this process exits; a no-op elsewhere.

    ``parent`` is the parent's pid, recorded before the fork: if the parent
    already died between the fork and the prctl, no signal will come, so
    this process exits at once.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _start_worker(parent: int | None = None) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a handler inherited from the parent (a Python one runs only between bytecodes) must not keep a worker alive
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    torch.set_num_threads(1)


#: A training job: client id, its state, the server's message, the task, and the server state to
#: evaluate the trained client with (None: not evaluated).
TrainJob = tuple[int, State, Message, ClientTask, State | None]


def _train(job: TrainJob) -> tuple[ClientResult, ClientEval | None]:
    """The client's update; with a server state, its evaluation too, and the state as evaluating left it."""
    client_id, client, message, task, server = job
    algorithm: Algorithm = _inherited["algorithm"]
    result = algorithm.client_update(client, message, _inherited["clients"][client_id], task)
    if server is None:
        return result, None
    evaluation = _evaluate((client_id, algorithm.evaluation_state(result.state, server)))
    if evaluation.after is not None:
        result.state = algorithm.absorb_evaluation(result.state, evaluation.after)
        evaluation.after = None
    return result, evaluation


def _evaluate(job: tuple[int, dict[str, torch.Tensor]]) -> ClientEval:
    client_id, weights = job
    algorithm: Algorithm = _inherited["algorithm"]
    return algorithm.evaluate(weights, _inherited["clients"][client_id], _inherited["eval_batch_size"])


def _take(counter, count: int) -> Iterator[int]:
    """Positions ``0..count-1``, each handed to exactly one of the processes sharing ``counter``."""
    while True:
        with counter.get_lock():
            position = counter.value
            counter.value = position + 1
        if position >= count:
            return
        yield position


def _child(counter, results) -> None:
    """A forked worker: run the inherited jobs it takes, put ``(job, ok, result or error)`` on ``results``."""
    _start_worker(_inherited.get("parent"))
    function, jobs, order = _inherited["function"], _inherited["jobs"], _inherited["order"]
    for position in _take(counter, len(order)):
        job = order[position]
        try:
            message = (job, True, function(jobs[job]))
        except BaseException as error:  # the parent re-raises it
            message = (job, False, error)
        results.put(_pack(message))
        if not message[1]:
            break
    results.put(_pack((None, True, None)))  # this child takes no more jobs


def _pack(message: tuple) -> bytes:
    """``message`` as bytes (``torch.save``), tensors copied in.

    The alternative, multiprocessing's tensors in shared memory, hands over
    each tensor's file descriptor through a connection to the sending
    process: 8-20 ms per LeNet-5 client result, against 2 ms to save and
    1.3 ms to load its 3.4 MB.
    """
    buffer = io.BytesIO()
    try:
        torch.save(message, buffer)
    except Exception as error:  # a result or an error that cannot be pickled
        buffer = io.BytesIO()
        torch.save((message[0], False, RuntimeError(f"a worker's result could not be sent back: {error!r}")), buffer)
    return buffer.getvalue()


class _Receiver(threading.Thread):
    """Reads the children's results while this process runs its own jobs (reading one costs a few ms)."""

    def __init__(self, results, children: list) -> None:
        super().__init__(daemon=True)
        self.results, self.children = results, children
        self.received: dict[int, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        finished = 0
        try:
            while finished < len(self.children):
                job, ok, value = _receive(self.results, self.children)
                if job is None:
                    finished += 1
                elif ok:
                    self.received[job] = value
                elif self.error is None:
                    self.error = value
        except BaseException as error:  # a child that died
            self.error = error


def _receive(results, children: list, timeout: float = 1.0):
    """The next ``(job, ok, value)`` from a child; an error if every child has ended and none is left."""
    while True:
        try:
            return torch.load(io.BytesIO(results.get(timeout=timeout)), weights_only=False)  # from our own child
        except queue.Empty:
            if all(child.exitcode is not None for child in children):
                codes = sorted({child.exitcode for child in children})
                raise RuntimeError(f"a worker process ended without returning its results (exit codes {codes})") from None


def _nbytes(job) -> int:
    """Bytes of the tensors in ``job`` (nested in tuples, lists and dicts)."""
    if torch.is_tensor(job):
        return job.numel() * job.element_size()
    if isinstance(job, dict):
        return sum(_nbytes(value) for value in job.values())
    if isinstance(job, (tuple, list)):
        return sum(_nbytes(value) for value in job)
    return 0


def _single_threaded(function, jobs: Iterable) -> list:
    """``function`` of each job in this process, with one thread as in a worker, so results do not depend on where jobs run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [function(job) for job in jobs]
    finally:
        torch.set_num_threads(threads)


def _warm_before_fork() -> None:
    """Do once in the parent what every fresh worker would otherwise do on its first client.

    Building the first optimizer imports ``torch._dynamo`` (1-2 s).
    """
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


class ClientRunner:
    """Runs client updates and evaluations, in ``workers`` forked processes or (workers=1) in this one."""

    def __init__(self, algorithm: Algorithm, clients: list[ClientData], eval_batch_size: int, workers: int) -> None:
        self.algorithm = algorithm
        self.clients = clients
        self.eval_batch_size = eval_batch_size
        self.workers = workers
        self._warm = False
        self._exiting: list = []

    def _run(self, function, jobs: list, order: list[int], fork: bool = True) -> list:
        """``function`` of each job, in job order; with workers (and ``fork``), started in ``order`` by this process and forked ones."""
        _inherited.update(algorithm=self.algorithm, clients=self.clients, eval_batch_size=self.eval_batch_size)
        if self.workers <= 1:
            return [function(job) for job in jobs]
        if len(jobs) <= 1 or not fork:
            return _single_threaded(function, jobs)
        if not self._warm:
            _warm_before_fork()
            self._warm = True
        self._reap()
        context = multiprocessing.get_context("fork")
        counter = context.Value("q", 0)
        results_queue = context.Queue()
        # this thread (the main one in `spafl run`; never the _Receiver) forks the children, and a child is killed when
        # it exits (see _die_with_parent): fine, as this returns only once every child has delivered all its results
        _inherited.update(function=function, jobs=jobs, order=order, parent=os.getpid())
        children = []
        try:
            for _ in range(min(self.workers, len(jobs)) - 1):
                child = context.Process(target=_child, args=(counter, results_queue), daemon=True)
                child.start()
                children.append(child)
            receiver = _Receiver(results_queue, children)
            receiver.start()
            # the parent takes jobs one at a time from the same counter, between the children's, until a child fails
            positions = (position for position in _take(counter, len(jobs)) if receiver.error is None)
            own = _single_threaded(lambda position: (order[position], function(jobs[order[position]])), positions)
            receiver.join()
            if receiver.error is not None:
                raise receiver.error
            results = [None] * len(jobs)
            for job, result in [*own, *receiver.received.items()]:
                results[job] = result
        except BaseException:
            for child in children:
                child.terminate()
            raise
        finally:
            for name in ("function", "jobs", "order", "parent"):
                _inherited.pop(name, None)
            self._exiting.extend(children)  # they exit once their results are read, while this process goes on
        return results

    def _reap(self, wait: bool = False) -> None:
        """Collect the children of earlier batches that have exited; with ``wait``, wait for all of them."""
        for child in self._exiting:
            child.join(None if wait else 0)
        self._exiting = [child for child in self._exiting if child.exitcode is None]

    def train(self, jobs: list[TrainJob]) -> list[tuple[ClientResult, ClientEval | None]]:
        """``client_update`` of each ``(client_id, state, message, task, server)``, results in job order.

        Where ``server`` is a server state, the trained client is also
        evaluated (``evaluate_client`` of ``evaluation_state(trained state,
        server)``) where it trained, while its model is at hand: a worker does
        it in parallel, which the parent would do afterwards one client after
        another. The evaluation is the one :meth:`evaluate` gives.

        With workers, the clients with the most training samples start first
        (longest job first), so that no worker is left with a big client at
        the end of the round; the result of a client does not depend on when
        or where it runs.
        """
        order = sorted(range(len(jobs)), key=lambda j: -self.clients[jobs[j][0]].num_train)
        return self._run(_train, jobs, order)

    def evaluate(self, jobs: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> Iterator[ClientEval]:
        """``evaluate_client`` of each ``(client_id, weights)``, results in job order.

        Jobs are taken from ``jobs`` (a generator that loads clients one by
        one) in chunks of about :data:`EVAL_CHUNK_BYTES`, so memory stays bounded.
        """
        chunk: list = []
        size = 0
        for job in jobs:
            chunk.append(job)
            size += _nbytes(job)
            if size >= EVAL_CHUNK_BYTES:
                yield from self._evaluate_chunk(chunk)
                chunk, size = [], 0
        if chunk:
            yield from self._evaluate_chunk(chunk)

    def _evaluate_chunk(self, chunk: list) -> list[ClientEval]:
        samples = sum(self.clients[client_id].num_test for client_id, _ in chunk)
        return self._run(_evaluate, chunk, list(range(len(chunk))), fork=samples >= PARALLEL_EVAL_MIN_SAMPLES)

    def close(self) -> None:
        """Wait for the last forked workers to have exited (workers live only while a batch of work runs)."""
        self._reap(wait=True)
