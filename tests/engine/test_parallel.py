"""The parent and its forked workers share a batch of jobs; errors and dead workers reach the caller."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import pytest

from spafl.engine.parallel import ClientRunner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked processes (Linux)")


def runner(workers: int = 2) -> ClientRunner:
    return ClientRunner(algorithm=None, clients=[], eval_batch_size=1, workers=workers)  # type: ignore[arg-type]


def test_each_job_runs_once_in_the_parent_or_a_worker_and_results_come_in_job_order():
    parent = os.getpid()

    def slow(job):
        time.sleep(0.05)
        return job * 10, os.getpid()

    work = runner(3)
    results = work._run(slow, list(range(8)), order=[7, 6, 5, 4, 3, 2, 1, 0])
    assert [value for value, _ in results] == [job * 10 for job in range(8)]
    processes = {pid for _, pid in results}
    assert parent in processes and len(processes) == 3  # 8 jobs of 50 ms: each of the three processes took some
    work.close()
    assert not [child for child in multiprocessing.active_children() if child.pid in processes]


def test_an_error_in_a_worker_is_raised_in_the_parent():
    parent = os.getpid()

    def fails_in_a_worker(job):
        time.sleep(0.05)
        if os.getpid() != parent:
            raise ValueError(f"job {job} failed")
        return job

    work = runner()
    with pytest.raises(ValueError, match=r"job \d failed"):
        work._run(fails_in_a_worker, list(range(6)), order=list(range(6)))
    work.close()


def test_a_worker_that_dies_is_an_error_not_a_hang():
    parent = os.getpid()

    def dies_in_a_worker(job):
        time.sleep(0.05)
        if os.getpid() != parent:
            os._exit(3)
        return job

    work = runner()
    with pytest.raises(RuntimeError, match=r"a worker process ended without returning its results \(exit codes \[3\]\)"):
        work._run(dies_in_a_worker, list(range(6)), order=list(range(6)))
    work.close()
