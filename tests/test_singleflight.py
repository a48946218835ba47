"""`tenuto.SingleFlight` and the distributed lock: one upstream call per cold key across
threads, tasks, a mix of both, and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import pytest

import tenuto
from tenuto.testing import companion_key

PROCESS_DEADLINE = 60.0


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


def test_threads_share_one_call_and_its_result() -> None:
    sf = tenuto.SingleFlight()
    gate = threading.Event()
    calls = []

    def fetch() -> dict:
        calls.append(1)
        gate.wait(10)
        return {"v": 1}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(sf.do("k", fetch))) for _ in range(32)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: sf.followers("k") == 31)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(results) == 32
    assert all(r is results[0] for r in results), "every waiter gets the same object"
    assert len(sf) == 0


def test_errors_reach_every_waiter_and_are_not_kept() -> None:
    sf = tenuto.SingleFlight()
    gate = threading.Event()
    calls = []

    def fail() -> None:
        calls.append(1)
        gate.wait(10)
        raise LookupError("no such song")

    errors = []

    def call() -> None:
        try:
            sf.do("k", fail)
        except LookupError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: sf.followers("k") == 7)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(errors) == 8
    assert all(e is errors[0] for e in errors), "every waiter gets the leader's exception"
    assert sf.do("k", lambda: "fresh") == "fresh", "the failure was not kept"


async def test_tasks_share_one_call() -> None:
    sf = tenuto.SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    tasks = [asyncio.ensure_future(sf.ado("k", fetch)) for _ in range(100)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [42] * 100
    assert calls == 1 and len(sf) == 0


async def test_threads_and_tasks_mixed_share_one_call() -> None:
    sf = tenuto.SingleFlight()
    calls = []
    started = threading.Event()
    release = threading.Event()

    def fetch() -> str:
        calls.append("thread")
        started.set()
        release.wait(10)
        return "value"

    async def afetch() -> str:
        calls.append("task")
        return "value"

    leader = threading.Thread(target=lambda: sf.do("k", fetch))
    leader.start()
    await asyncio.to_thread(started.wait, 10)
    tasks = [asyncio.ensure_future(sf.ado("k", afetch)) for _ in range(50)]
    threads_results: list[str] = []
    threads = [
        threading.Thread(target=lambda: threads_results.append(sf.do("k", fetch))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    await asyncio.to_thread(wait_for, lambda: sf.followers("k") == 58)
    release.set()
    assert await asyncio.gather(*tasks) == ["value"] * 50
    for t in [leader, *threads]:
        await asyncio.to_thread(t.join, 10)
    assert calls == ["thread"] and threads_results == ["value"] * 8


async def test_async_leader_with_thread_waiters() -> None:
    sf = tenuto.SingleFlight()
    release = asyncio.Event()

    async def fetch() -> str:
        await release.wait()
        return "from the task"

    leader = asyncio.ensure_future(sf.ado("k", fetch))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(asyncio.to_thread(sf.do, "k", lambda: "thread fetched"))
    while sf.followers("k") < 1:
        await asyncio.sleep(0.001)
    release.set()
    assert await leader == "from the task"
    assert await waiter == "from the task"


async def test_cancelled_leader_hands_over() -> None:
    sf = tenuto.SingleFlight()
    calls = 0
    started = asyncio.Event()

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0 if calls > 1 else 3600)
        return calls

    leader = asyncio.ensure_future(sf.ado("k", fetch))
    await started.wait()
    followers = [asyncio.ensure_future(sf.ado("k", fetch)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    results = await asyncio.gather(*followers)
    assert results == [2] * 5 and calls == 2
    assert leader.cancelled()


def test_sync_wait_on_own_flight_raises_instead_of_hanging() -> None:
    sf = tenuto.SingleFlight()
    with pytest.raises(RuntimeError, match="wait for itself"):
        sf.do("k", lambda: sf.do("k", lambda: 1))
    assert len(sf) == 0


def test_no_state_left_after_100k_keys() -> None:
    sf = tenuto.SingleFlight()
    for i in range(100_000):
        assert sf.do(f"k{i}", lambda i=i: i) == i
    assert len(sf) == 0


def _process_worker(url: str, namespace: str, barrier, results) -> None:  # pragma: no cover
    import redis as redis_py

    cache = tenuto.Cache(url, namespace=namespace, fail_open=False)
    counter = redis_py.Redis.from_url(url)

    @cache.cached(ttl=60, name="cold")
    def cold(song: str) -> str:
        counter.incr(f"{namespace}:upstream-calls")
        time.sleep(0.5)  # the upstream's latency, so every caller arrives during the call
        return f"features of {song}"

    out: list[str] = []
    barrier.wait(30)
    threads = [threading.Thread(target=lambda: out.append(cold("s1"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results.put(out)


def test_four_processes_eight_threads_one_upstream_call(redis_server, raw_redis, namespace) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(redis_server.url, namespace, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    outputs = [results.get(timeout=PROCESS_DEADLINE) for _ in procs]
    for p in procs:
        p.join(PROCESS_DEADLINE)
        assert p.exitcode == 0
    assert [len(o) for o in outputs] == [8, 8, 8, 8]
    assert {v for o in outputs for v in o} == {"features of s1"}
    assert int(raw_redis.get(f"{namespace}:upstream-calls")) == 1
    assert (
        raw_redis.exists(
            companion_key(f"{namespace}:" + tenuto.stable_key("cold", {"song": "s1"}), "lock")
        )
        == 0
    ), "the lock was released"


def test_lock_errors_fail_open(namespace) -> None:
    from tenuto.testing import free_port

    cache = tenuto.Cache(f"redis://127.0.0.1:{free_port()}/0", namespace=namespace)
    calls = []

    @cache.cached(ttl=60, distributed=True)
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f(1) == 1 and f(1) == 1 and calls == [1]
