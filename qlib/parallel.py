"""Independent CPU jobs side by side: one forked worker per core, one torch thread each.

Chapter 5 trains its small encoder some thirty times. One fit uses a single core about as
well as two (benchmarks/encoder_fits.py: the same epoch time at 1 and 2 torch threads on
two cores, the model is too small to split), so two fits at once take the time of one::

    preds = parallel.map_forked([lambda s=s: fit_and_predict(seed=s) for s in seeds])

Workers are forked (on Linux; elsewhere the jobs run here), so a job may close over anything
(populations, models) without pickling it; what a job returns is pickled back and should be
plain: numbers, dicts, NumPy arrays (torch tensors would travel as shared memory).
Every job runs with one torch thread whether it runs in a worker or, with one worker or no
``fork`` (Windows), in this process: the result does not depend on how many workers ran it.
A worker writes nothing to this process's output, Python's streams and file descriptors 1
and 2 alike (a Jupyter kernel's streams are not safe to use from a forked child); an
exception in a job is raised here, naming the job, and the jobs not yet started are dropped.
``QLIB_WORKERS`` caps the number of workers (default: the cores this process may use).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
from tqdm.auto import tqdm

_JOBS: Sequence[Callable[[], Any]] = ()  # set just before the workers fork; they inherit it


def cores() -> int:
    """The cores this process may use: its CPU affinity, within a container's CPU quota
    (cgroup v2 ``cpu.max``, e.g. Binder's), at most ``$QLIB_WORKERS``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    env = os.environ.get("QLIB_WORKERS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"QLIB_WORKERS must be a positive whole number, got {env!r}")
        n = min(n, int(env))
    return n


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, as in a worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_init() -> None:
    torch.set_num_threads(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)  # C-level writes too: they would reach the kernel's output
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the worker's whole life)
    tqdm.set_lock(mp.RLock())  # not a copy of a lock another thread may have held at the fork


def _run(i: int) -> Any:
    return _JOBS[i]()


def map_forked(jobs: Sequence[Callable[[], Any]], *, workers: int | None = None, desc: str = "jobs",
               progress: bool = True) -> list:
    """``[job() for job in jobs]``, run by ``workers`` forked processes (default: one per core,
    at most one per job), in order. One worker, or a platform without ``fork``: in this
    process, one job after another, each on one torch thread."""
    global _JOBS
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    n = min(len(jobs), workers or cores())
    if n <= 1 or not sys.platform.startswith("linux"):  # macOS has fork, but it is not safe there
        with one_thread():
            return [job() for job in tqdm(jobs, desc=desc, leave=False, disable=not progress)]
    outer, _JOBS = _JOBS, jobs
    out: list = [None] * len(jobs)
    pool = ProcessPoolExecutor(n, mp_context=mp.get_context("fork"), initializer=_worker_init)
    try:
        futures = {pool.submit(_run, i): i for i in range(len(jobs))}
        for f in tqdm(as_completed(futures), total=len(jobs), desc=f"{desc} ({n} at once)", leave=False,
                      disable=not progress):
            i = futures[f]
            try:
                out[i] = f.result()
            except Exception as e:
                raise RuntimeError(f"{desc}: job {i} of {len(jobs)} failed: {e!r}") from e
    except BaseException:  # a failed job or an interrupt: do not wait for the queued jobs
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        _JOBS = outer
    return out
