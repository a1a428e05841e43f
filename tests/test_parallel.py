"""qlib.parallel: independent jobs in forked workers give what running them here gives."""
import pytest
import torch

from qlib import parallel


def _fit(seed: int) -> torch.Tensor:
    # a small seeded fit: the result depends on every step, so a job run twice or out of order shows
    torch.manual_seed(seed)
    w = torch.zeros(8, requires_grad=True)
    x, y = torch.randn(64, 8), torch.randn(64)
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        ((x @ w - y) ** 2).mean().backward()
        opt.step()
    return w.detach().numpy()


def test_workers_return_in_order_what_one_process_returns():
    jobs = [lambda s=s: _fit(s) for s in range(5)]
    here = parallel.map_forked(jobs, workers=1, progress=False)
    forked = parallel.map_forked(jobs, workers=2, progress=False)
    assert len(forked) == 5
    for a, b in zip(here, forked):
        assert (a == b).all()  # one torch thread either way: the same numbers, not just close
    assert not (here[0] == here[1]).all()


def test_a_job_sees_what_it_closes_over_and_runs_on_one_thread():
    big = torch.arange(10_000.0)  # not pickled: the worker inherits it
    out = parallel.map_forked([lambda: float(big.sum()), torch.get_num_threads], workers=2, progress=False)
    assert out == [float(big.sum()), 1]


def test_a_failing_job_is_named_and_bad_workers_refused():
    def boom():
        raise ValueError("no such layer")

    with pytest.raises(RuntimeError, match=r"job 1 of 2 failed: ValueError\('no such layer'\)"):
        parallel.map_forked([lambda: 1, boom], workers=2, progress=False)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        parallel.map_forked([lambda: 1], workers=0)
    assert parallel.map_forked([], progress=False) == []


def test_workers_are_capped_by_qlib_workers(monkeypatch):
    monkeypatch.setenv("QLIB_WORKERS", "1")
    assert parallel.cores() == 1
    monkeypatch.setenv("QLIB_WORKERS", "two")
    with pytest.raises(ValueError, match="QLIB_WORKERS must be a positive whole number"):
        parallel.cores()


def test_a_failure_drops_the_queued_jobs(tmp_path):
    import time

    def boom():
        raise ValueError("first job fails")

    def slow(i):
        time.sleep(0.5)
        (tmp_path / f"ran{i}").touch()

    jobs = [boom] + [lambda i=i: slow(i) for i in range(12)]
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="job 0 of 13 failed"):
        parallel.map_forked(jobs, workers=2, progress=False)
    assert time.perf_counter() - t < 3.0, "it waited for every queued job (6 × 0.5 s per worker)"
    time.sleep(1.0)  # the jobs already running when it failed may finish
    assert len(list(tmp_path.glob("ran*"))) < 12
