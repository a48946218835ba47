"""tenuto.Prewarmer: schedules on a fake clock, leases across processes, stop, snapshot,
warm (progress, concurrency, cancellation, checkpoints) and refresh-ahead."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tenuto
from tenuto._core import Leases
from tenuto.testing import FakeClock

T0 = 1_700_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def mem(clock: FakeClock, namespace: str) -> tenuto.Cache:
    return tenuto.Cache(namespace=namespace, jitter=0.0, clock=clock)


def counted(cache: tenuto.Cache, ttl: float = 700, fail: list[bool] | None = None):
    calls: list[object] = []

    @cache.cached(ttl=ttl, name="counted")
    def fetch(x: int) -> int:
        calls.append(x)
        if fail and fail[0]:
            raise RuntimeError("upstream down")
        return x * 2

    return fetch, calls


# -- register and the schedule --------------------------------------------------------


def test_interval_is_half_the_ttl_clamped(mem: tenuto.Cache, clock: FakeClock) -> None:
    warmer = tenuto.Prewarmer(mem, clock=clock)
    for ttl, expected in ((700, 350.0), (100, 300.0), (10_000, 3600.0)):

        @mem.cached(ttl=ttl, name=f"f{ttl}")
        def f(x: int) -> int:
            return x

        job = warmer.register(f, 1)
        assert warmer.snapshot()[job]["interval"] == expected
    job = warmer.register(f, 2, min_interval=10, max_interval=20)
    assert warmer.snapshot()[job]["interval"] == 20.0
    job = warmer.register(f, 3, interval=42)
    assert warmer.snapshot()[job]["interval"] == 42.0
    job = warmer.register(f, 4, min_interval="1m", max_interval="2m")  # durations as written
    assert warmer.snapshot()[job]["interval"] == 120.0  # ttl 10000: clamped to 2 minutes


def test_register_refuses_bad_input(mem: tenuto.Cache, clock: FakeClock) -> None:
    warmer = tenuto.Prewarmer(mem, clock=clock)
    fetch, _ = counted(mem)
    with pytest.raises(ValueError, match="interval"):
        warmer.register(fetch, 1, interval=-1)
    with pytest.raises(ValueError, match="interval"):
        warmer.register(fetch, 1, interval="soon")
    with pytest.raises(TypeError, match="interval"):
        warmer.register(fetch, 1, interval=[5])
    with pytest.raises(ValueError, match="min_interval"):
        warmer.register(fetch, 1, min_interval=100, max_interval=10)
    with pytest.raises(TypeError, match="fn must be callable"):
        warmer.register(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval is required"):
        warmer.register(lambda: None)
    with pytest.raises(TypeError, match="JSON"):
        warmer.register(lambda x: x, object(), interval=5)
    warmer.register(fetch, 1)
    with pytest.raises(ValueError, match="already registered"):
        warmer.register(fetch, 1)
    with pytest.raises(TypeError, match="cache"):
        tenuto.Prewarmer("redis://x")  # type: ignore[arg-type]


def test_jobs_run_every_interval_on_a_fake_clock(mem: tenuto.Cache, clock: FakeClock) -> None:
    fetch, calls = counted(mem, ttl=700)
    warmer = tenuto.Prewarmer(mem, clock=clock)
    job = warmer.register(fetch, 3)
    assert warmer.run_once() == [job]  # due at once
    assert calls == [3] and mem.get(fetch.key(3)).value == 6
    assert warmer.run_once() == []
    clock.advance(349)
    assert warmer.run_once() == []
    clock.advance(1)
    # The entry is still fresh (ttl 700): a refresh is a forced fetch, not a cached read.
    assert mem.get(fetch.key(3)).state == "hit"
    assert warmer.run_once() == [job] and calls == [3, 3]
    snap = warmer.snapshot()[job]
    assert snap["runs"] == 2 and snap["last_success"] == T0 + 350
    assert snap["next_run"] == T0 + 700 and snap["failures"] == 0


def test_failures_back_off_and_never_storm(mem: tenuto.Cache, clock: FakeClock, caplog) -> None:
    fail = [True]
    fetch, calls = counted(mem, ttl=7200, fail=fail)  # interval 3600
    warmer = tenuto.Prewarmer(mem, clock=clock)
    job = warmer.register(fetch, 1)
    waits = []
    for _ in range(5):
        clock.set(warmer.snapshot()[job]["next_run"])
        before = clock.now()
        assert warmer.run_once() == [job]
        waits.append(warmer.snapshot()[job]["next_run"] - before)
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0]
    snap = warmer.snapshot()[job]
    assert snap["failures"] == 5 and snap["errors"] == 5 and snap["last_success"] is None
    assert snap["last_error"] == "RuntimeError: upstream down"
    assert "failed (5 in a row)" in caplog.text
    # Between retries nothing runs, however often the worker looks.
    clock.advance(479)
    assert [warmer.run_once() for _ in range(10)] == [[]] * 10
    fail[0] = False
    clock.advance(1)
    assert warmer.run_once() == [job]
    snap = warmer.snapshot()[job]
    assert snap["failures"] == 0 and snap["errors"] == 5 and snap["last_success"] == clock.now()
    assert len(calls) == 6


def test_backoff_is_capped_by_the_interval(mem: tenuto.Cache, clock: FakeClock) -> None:
    warmer = tenuto.Prewarmer(mem, clock=clock)

    def broken() -> None:
        raise ValueError("no")

    job = warmer.register(broken, interval=50)
    waits = []
    for _ in range(3):
        clock.set(warmer.snapshot()[job]["next_run"])
        before = clock.now()
        warmer.run_once()
        waits.append(warmer.snapshot()[job]["next_run"] - before)
    assert waits == [30.0, 50.0, 50.0]


def test_any_callable_and_async_functions(mem: tenuto.Cache, clock: FakeClock) -> None:
    seen: list[tuple[object, ...]] = []

    def plain(a: int, b: str = "x") -> None:
        seen.append(("plain", a, b))

    async def coro(a: int) -> None:
        await asyncio.sleep(0)
        seen.append(("coro", a))

    @mem.cached(ttl=600, name="acached")
    async def acached(a: int) -> int:
        seen.append(("acached", a))
        return a

    warmer = tenuto.Prewarmer(mem, clock=clock)
    warmer.register(plain, 1, b="y", interval=10)
    warmer.register(coro, 2, interval=10)
    warmer.register(acached, 3)
    assert len(warmer.run_once()) == 3
    assert sorted(seen) == [("acached", 3), ("coro", 2), ("plain", 1, "y")]
    assert mem.get(acached.key(3)).value == 3


def test_one_lease_per_job_between_prewarmers(mem: tenuto.Cache, clock: FakeClock) -> None:
    fetch, calls = counted(mem, ttl=700)
    first = tenuto.Prewarmer(mem, clock=clock, holder="first")
    second = tenuto.Prewarmer(mem, clock=clock, holder="second")
    job = first.register(fetch, 1)
    assert second.register(fetch, 1) == job
    assert first.run_once() == [job]
    assert second.run_once() == []  # first holds the lease for this interval
    snap = second.snapshot()[job]
    assert snap["lease_holder"] == "first" and not snap["held_here"]
    assert snap["next_run"] == T0 + 350 and snap["lease_expires_in"] == 350.0
    assert first.snapshot()[job]["held_here"]
    clock.advance(350)
    assert second.run_once() == [job]  # whoever looks first after expiry
    assert first.run_once() == []
    assert calls == [1, 1]


# -- Leases (the native primitive) ---------------------------------------------------


def test_leases_on_redis(shared_url: str, namespace: str) -> None:
    """On a server and on a cluster (a lease is one key: any slot will do)."""
    from conftest import redis_py_client

    raw_redis = redis_py_client(shared_url)
    cache = tenuto.Cache(shared_url, namespace=namespace, fail_open=False)
    leases = Leases(cache)
    assert leases.acquire("job", "a", 5) == (True, "a", 5.0)
    acquired, holder, left = leases.acquire("job", "b", 5)
    assert (acquired, holder) == (False, "a") and 4.0 < left <= 5.0
    key = f"tenuto|lease|{namespace}|job"
    assert leases.lease_key("job") == key and raw_redis.get(key) == b"a"
    assert not leases.renew("job", "b", 60) and leases.renew("job", "a", 60)
    assert 59_000 < raw_redis.pttl(key) <= 60_000
    cache.clear()  # a namespace's clear never reaches its leases
    assert leases.holder("job")[1] == "a"
    assert not leases.release("job", "b") and leases.release("job", "a")
    assert leases.holder("job") == (False, None, 0.0) and raw_redis.get(key) is None
    with pytest.raises(ValueError, match="job"):
        leases.acquire("", "a", 5)
    with pytest.raises(ValueError, match="holder"):
        leases.acquire("job", "", 5)
    with pytest.raises(ValueError, match="ttl"):
        leases.acquire("job", "a", 0)
    raw_redis.close()


def test_a_failed_run_shortens_the_lease_for_the_fleet(shared_url, namespace) -> None:
    from conftest import redis_py_client

    raw_redis = redis_py_client(shared_url)
    cache = tenuto.Cache(shared_url, namespace=namespace, fail_open=False)
    first = tenuto.Prewarmer(cache, holder="first")
    second = tenuto.Prewarmer(cache, holder="second")

    def broken() -> None:
        raise RuntimeError("upstream down")

    job = first.register(broken, interval=3600)
    second.register(broken, interval=3600)
    assert first.run_once() == [job]
    key = Leases(cache).lease_key(job)
    assert raw_redis.get(key) == b"first"
    assert 29_000 < raw_redis.pttl(key) <= 30_000  # the retry delay, not the hour
    assert second.run_once() == []
    assert 29 < second.snapshot()[job]["next_run"] - time.time() <= 30
    raw_redis.close()


def test_clear_and_count_by_prefix_on_every_backend(cache: tenuto.Cache) -> None:
    """Cache.clear(prefix=...) and count(): SCAN on every primary of a cluster."""
    for i in range(40):  # enough keys to land on every primary of a cluster
        cache.set(f"fn.a:{i}", i, ttl=60)
    cache.set("fn.ab:1", 1, ttl=60)
    cache.set("other[*]:1", 1, ttl=60)
    assert (cache.count(), cache.count("fn.a:"), cache.count("other[*]")) == (42, 40, 1)
    assert cache.count("other[") == 1  # glob characters are literal
    assert cache.clear(prefix="fn.a:") == 40
    assert cache.get("fn.a:3").state == "miss" and cache.get("fn.ab:1").state == "hit"
    assert cache.count() == 2
    assert cache.clear() is None and cache.count() == 0


async def test_aclear_by_prefix(cache: tenuto.Cache) -> None:
    await cache.aset("x:1", 1, ttl=60)
    await cache.aset("y:1", 1, ttl=60)
    assert await cache.aclear(prefix="x:") == 1
    assert (await cache.aget("y:1")).state == "hit"
    assert await cache.aclear() is None


def test_leases_fall_back_to_the_process_while_redis_is_down(own_redis, namespace) -> None:
    cache = tenuto.Cache(own_redis.url, namespace=namespace)
    leases = Leases(cache)
    own_redis.stop()
    assert leases.acquire("job", "a", 5)[0] is True
    assert leases.acquire("job", "b", 5)[:2] == (False, "a")
    assert cache.stats()["backend_errors"] >= 1


LEASE_WORKER = r"""
import json, sys, time
import tenuto
url, ns, out = sys.argv[1:4]
interval, window = float(sys.argv[4]), float(sys.argv[5])
def refresh():
    with open(out, "a") as f:  # one short line per run: appends do not interleave
        f.write(f"{time.time()} {tenuto_holder[0]}\n")
cache = tenuto.Cache(url, namespace=ns, fail_open=False)
warmer = tenuto.Prewarmer(cache)
tenuto_holder = [warmer.holder]
warmer.register(refresh, interval=interval, min_interval=0.1)
print("ready", flush=True)
sys.stdin.readline()  # all three start together
warmer.start()
time.sleep(window)  # the observed window, not a synchronisation
assert warmer.stop(timeout=2.0)
print(json.dumps(warmer.snapshot()), flush=True)
"""


def test_cross_process_lease_one_run_per_interval(redis_server, namespace, tmp_path) -> None:
    out = tmp_path / "runs.txt"
    interval, window = 1.0, 2.6
    script = tmp_path / "lease_worker.py"
    script.write_text(LEASE_WORKER)
    args = [sys.executable, str(script), redis_server.url, namespace, str(out)]
    procs = [
        subprocess.Popen(
            [*args, str(interval), str(window)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=30)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs)
    runs = sorted(
        (float(at), who) for at, who in (line.split() for line in out.read_text().splitlines())
    )
    # Three processes without a lease would run 9+ times in 2.6 s; with one, once per
    # interval between them: never two runs less than an interval apart.
    assert 2 <= len(runs) <= 3, runs
    gaps = [b[0] - a[0] for a, b in zip(runs, runs[1:])]
    assert all(gap >= interval * 0.95 for gap in gaps), gaps
    # Every snapshot names a holder: the process that ran last (or the one before).
    holders = {who for _, who in runs}
    snapshots = [next(iter(json.loads(text.splitlines()[-1]).values())) for text in outputs]
    assert sum(s["runs"] for s in snapshots) == len(runs)
    assert all(s["lease_holder"] in holders for s in snapshots if s["lease_holder"])


LEASE_ONCE = r"""
import json, sys
import tenuto
url, ns = sys.argv[1:3]
runs = []
cache = tenuto.Cache(url, namespace=ns, fail_open=False)
warmer = tenuto.Prewarmer(cache)
job = warmer.register(lambda: runs.append(1), interval=60)
print("ready", flush=True)
sys.stdin.readline()
ran = warmer.run_once()
print(json.dumps({"ran": ran, "holder": warmer.holder, "snap": warmer.snapshot()[job]}))
"""


def test_three_processes_at_once_one_run(redis_server, namespace, tmp_path) -> None:
    script = tmp_path / "lease_once.py"
    script.write_text(LEASE_ONCE)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), redis_server.url, namespace],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [json.loads(proc.communicate(timeout=30)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    winners = [r for r in reports if r["ran"]]
    assert len(winners) == 1  # three processes, one interval: one run
    holder = winners[0]["holder"]
    assert all(r["snap"]["lease_holder"] == holder for r in reports)
    assert [r["snap"]["held_here"] for r in reports].count(True) == 1
    for r in reports:
        snap = r["snap"]
        assert 55 < snap["lease_expires_in"] <= 60
        if r["ran"]:
            assert snap["runs"] == 1 and snap["next_run"] - snap["last_run"] == 60
        else:  # looks again when the lease ends, not before
            assert snap["runs"] == 0 and snap["last_run"] is None


# -- the worker -----------------------------------------------------------------------


def test_worker_runs_due_jobs_and_stops_promptly(mem: tenuto.Cache) -> None:
    ran = threading.Event()
    warmer = tenuto.Prewarmer(mem)  # the system clock: the worker really waits
    assert not warmer.running
    warmer.register(ran.set, interval=3600)
    warmer.start()
    warmer.start()  # once per process
    assert ran.wait(5), "the worker ran the due job"
    assert warmer.running
    started = time.monotonic()
    assert warmer.stop() is True
    assert time.monotonic() - started < 0.5  # woken, not polled: next run is an hour away
    assert not warmer.running
    warmer.start()  # again after stop
    assert warmer.running and warmer.stop()


def test_stop_gives_up_on_a_job_in_progress_after_timeout(mem: tenuto.Cache) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        release.wait(10)

    warmer = tenuto.Prewarmer(mem)
    job = warmer.register(slow, interval=3600)
    warmer.start()
    assert entered.wait(5)
    assert warmer.snapshot()[job]["running"] is True
    started = time.monotonic()
    assert warmer.stop(timeout=0.2) is False
    assert 0.15 < time.monotonic() - started < 1.0
    release.set()
    assert warmer.stop(timeout=5) is True
    assert warmer.snapshot()[job]["running"] is False
    with pytest.raises(ValueError, match="timeout"):
        warmer.stop(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        warmer.stop(timeout="soon")  # type: ignore[arg-type]


def test_worker_survives_a_failing_job(mem: tenuto.Cache) -> None:
    ok = threading.Event()
    warmer = tenuto.Prewarmer(mem)

    def broken() -> None:
        raise RuntimeError("boom")

    broken_job = warmer.register(broken, interval=3600)
    warmer.register(ok.set, interval=3600)
    warmer.start()
    try:
        assert ok.wait(5)
        assert warmer.running
        assert warmer.snapshot()[broken_job]["errors"] == 1
    finally:
        assert warmer.stop()


def test_registering_wakes_the_worker(mem: tenuto.Cache) -> None:
    warmer = tenuto.Prewarmer(mem)
    warmer.start()  # nothing to do: waits on its condition
    ran = threading.Event()
    try:
        warmer.register(ran.set, interval=3600)
        assert ran.wait(2)
    finally:
        assert warmer.stop()


# Python 3.12+ warns when forking a process with threads; forking one is the point here.
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_forked_child_has_no_worker_until_it_starts_one(mem: tenuto.Cache) -> None:
    warmer = tenuto.Prewarmer(mem)
    warmer.register(lambda: None, interval=3600)
    warmer.start()
    parent_holder = warmer.holder
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        report = {}
        try:
            report["running_after_fork"] = warmer.running
            report["holder_differs"] = warmer.holder != parent_holder
            warmer.start()
            report["running_after_start"] = warmer.running
            report["stopped"] = warmer.stop()
        except BaseException as exc:
            report["error"] = repr(exc)
        os.write(write_fd, json.dumps(report).encode())
        os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    report = json.loads(os.read(read_fd, 4096))
    os.close(read_fd)
    assert warmer.stop()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert report == {
        "running_after_fork": False,
        "holder_differs": True,
        "running_after_start": True,
        "stopped": True,
    }


# -- warm -------------------------------------------------------------------------------


def test_warm_reports_progress_and_skips_fresh_keys(mem: tenuto.Cache, clock) -> None:
    fetch, calls = counted(mem)
    fetch(0)
    fetch(1)
    reports: list[dict] = []
    warmer = tenuto.Prewarmer(mem, clock=clock)
    report = warmer.warm(range(10), fetch, concurrency=3, progress=reports.append)
    assert sorted(calls) == [0, 1, *range(2, 10)] and calls.count(0) == 1
    assert {k: report[k] for k in ("total", "done", "skipped", "errors", "cancelled")} == {
        "total": 10,
        "done": 8,
        "skipped": 2,
        "errors": 0,
        "cancelled": False,
    }
    assert report["elapsed"] > 0 and report["rate"] > 0
    progressed = [r["done"] + r["skipped"] + r["errors"] for r in reports]
    assert progressed == sorted(progressed) and progressed[0] == 2 and progressed[-1] == 10
    assert all("eta" in r for r in reports)
    assert all(mem.get(fetch.key(i)).state == "hit" for i in range(10))
    # skip_cached=False refreshes every one.
    report = warmer.warm(range(10), fetch, skip_cached=False, progress=False)
    assert report["done"] == 10 and len(calls) == 20


def test_warm_counts_errors_and_keeps_going(mem: tenuto.Cache, clock, caplog) -> None:
    def flaky(i: int) -> None:
        if i % 3 == 0:
            raise ValueError(f"bad {i}")

    report = tenuto.Prewarmer(mem).warm(range(9), flaky, progress=False)
    assert (report["done"], report["errors"]) == (6, 3)
    assert "bad 3" in caplog.text


def test_warm_bounds_concurrency(mem: tenuto.Cache) -> None:
    lock = threading.Lock()
    active, peak = [0], [0]

    def slow(i: int) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)  # the work being measured
        with lock:
            active[0] -= 1

    report = tenuto.Prewarmer().warm(range(12), slow, concurrency=3, progress=False)
    assert report["done"] == 12 and peak[0] == 3


async def test_awarm_async_functions_concurrently(mem: tenuto.Cache) -> None:
    active, peak = [0], [0]

    @mem.cached(ttl=600, name="alyrics")
    async def lyrics(i: int) -> str:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.01)
        active[0] -= 1
        return f"la {i}"

    report = await tenuto.Prewarmer().awarm(range(8), lyrics, concurrency=4, progress=False)
    assert report["done"] == 8 and peak[0] == 4
    assert mem.get(lyrics.key(5)).value == "la 5"
    with pytest.raises(RuntimeError, match="awarm"):
        tenuto.Prewarmer().warm([1], lyrics)


def test_warm_goes_at_the_limiters_pace(mem: tenuto.Cache, clock: FakeClock) -> None:
    limiter = tenuto.RateLimiter("60/minute", clock=clock)

    @mem.cached(ttl=600, name="limited")
    @limiter.limit
    def limited(i: int) -> int:
        return i

    start = clock.now()
    report = tenuto.Prewarmer().warm(range(5), limited, concurrency=4, progress=False)
    assert report["done"] == 5
    # 5 calls, one a second: the limiter's clock moved on at least 4 s (waiting threads
    # each move a fake clock, so it may move further); a warm past the limiter moves it 0.
    assert clock.now() - start >= 4.0


def test_warm_bad_arguments(mem: tenuto.Cache) -> None:
    warmer = tenuto.Prewarmer(mem)
    with pytest.raises(ValueError, match="concurrency"):
        warmer.warm([1], print, concurrency=0)
    with pytest.raises(TypeError, match="concurrency"):
        warmer.warm([1], print, concurrency=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn"):
        warmer.warm([1], None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cancel"):
        warmer.warm([1], print, cancel=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress"):
        warmer.warm([1], print, progress="yes")
    with pytest.raises(TypeError, match="items"):
        warmer.warm("abc", print)


def test_cancel_token_stops_a_warm_within_a_second(mem: tenuto.Cache) -> None:
    token = tenuto.CancelToken()
    stuck = threading.Event()
    calls: list[int] = []
    blocking = [True]

    def slow(i: int) -> None:
        calls.append(i)
        if blocking[0] and i >= 4:
            if i == 4:
                threading.Timer(0.05, token.cancel).start()
            stuck.wait(30)  # an upstream that takes its time

    warmer = tenuto.Prewarmer(mem)
    started = time.monotonic()
    report = warmer.warm(range(100), slow, concurrency=2, progress=False, cancel=token)
    took = time.monotonic() - started
    stuck.set()
    assert took < 1.0
    assert report["cancelled"] is True and report["done"] == 4
    assert len(calls) <= 6  # the two in flight at most: nothing new started
    # Resumed with the same function and items: what finished is not redone.
    blocking[0] = False
    calls.clear()
    report = warmer.warm(range(100), slow, progress=False)
    assert sorted(calls) == list(range(4, 100))
    assert report["resumed"] == 4 and report["done"] == 96 and not report["cancelled"]
    # A finished warm leaves no checkpoint: the next one starts over.
    calls.clear()
    warmer.warm(range(100), slow, progress=False)
    assert len(calls) == 100
    # Other items are another warm: no checkpoint of this one applies.
    calls.clear()
    warmer.warm(range(50), slow, progress=False)
    assert len(calls) == 50


async def test_cancelling_the_task_stops_awarm(mem: tenuto.Cache) -> None:
    started = asyncio.Event()

    async def slow(i: int) -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.ensure_future(tenuto.Prewarmer(mem).awarm(range(10), slow, progress=False))
    await started.wait()
    task.cancel()
    t = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t < 1.0


def test_a_cancelled_token_stops_before_starting(mem: tenuto.Cache) -> None:
    token = tenuto.CancelToken()
    token.cancel()
    assert token.cancelled and token.wait(0)
    calls: list[int] = []
    report = tenuto.Prewarmer(mem).warm(range(5), calls.append, cancel=token, progress=False)
    assert report["cancelled"] and calls == []


def test_progress_line_when_forced(mem: tenuto.Cache, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TENUTO_PROGRESS", "1")
    tenuto.Prewarmer(mem).warm(range(3), lambda i: None)
    err = capsys.readouterr().err
    assert "warm 3/3 (0 skipped, 0 errors)" in err
    monkeypatch.setenv("TENUTO_PROGRESS", "0")
    tenuto.Prewarmer(mem).warm(range(3), lambda i: None)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("TENUTO_PROGRESS")
    tenuto.Prewarmer(mem).warm(range(3), lambda i: None)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


# -- refresh-ahead ----------------------------------------------------------------------


def test_refresh_expiring_soonest_first(mem: tenuto.Cache, clock: FakeClock) -> None:
    calls: list[int] = []

    @mem.cached(ttl=600, name="ahead")
    def ahead(i: int) -> int:
        calls.append(i)
        return i

    warmer = tenuto.Prewarmer(mem, clock=clock)
    warmer.warm([1, 2], ahead, progress=False)  # fetched at T0: fresh until T0 + 600
    clock.advance(100)
    warmer.warm([3, 4], ahead, progress=False)  # fresh until T0 + 700
    clock.advance(450)  # 1, 2 expire in 50 s, 3 and 4 in 150 s
    calls.clear()
    report = warmer.refresh_expiring(ahead, within=60, limit=10)
    assert report == {"candidates": 4, "expiring": 2, "refreshed": 2, "errors": 0}
    assert sorted(calls) == [1, 2]
    calls.clear()
    report = warmer.refresh_expiring(ahead, within=200, limit=1)
    assert report["expiring"] == 2 and calls == [3]  # soonest first, at most limit
    report = warmer.refresh_expiring(ahead, within=200, candidates=[4, 5])
    assert report["candidates"] == 2 and calls == [3, 4]  # 5 has no entry: nothing to refresh
    with pytest.raises(TypeError, match="cached"):
        warmer.refresh_expiring(print, within=10)
    with pytest.raises(ValueError, match="within"):
        warmer.refresh_expiring(ahead, within=0)
    with pytest.raises(ValueError, match="limit"):
        warmer.refresh_expiring(ahead, within=10, limit=0)


def test_refresh_expiring_async_functions(mem: tenuto.Cache, clock: FakeClock) -> None:
    calls: list[int] = []

    @mem.cached(ttl=600, name="aahead")
    async def aahead(i: int) -> int:
        calls.append(i)
        return i

    warmer = tenuto.Prewarmer(mem, clock=clock)
    warmer.warm([1, 2], aahead, progress=False)
    clock.advance(590)
    assert warmer.refresh_expiring(aahead, within=20)["refreshed"] == 2
    assert sorted(calls) == [1, 1, 2, 2]
    assert mem.get(aahead.key(1)).envelope.fresh_until == clock.now() + 600


def test_prewarm_is_not_started_at_import() -> None:
    code = "import threading, tenuto; print(sorted(t.name for t in threading.enumerate()))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path("/")
    ).stdout
    assert "tenuto-prewarm" not in out


def test_progress_bar_uses_tqdm_then_rich_when_installed(mem: tenuto.Cache, monkeypatch) -> None:
    import types

    events: list[tuple[str, object]] = []

    class FakeTqdm:
        def __init__(self, total: int, **kwargs: object) -> None:
            events.append(("tqdm", total))

        def update(self, n: int) -> None:
            events.append(("update", n))

        def close(self) -> None:
            events.append(("close", None))

    monkeypatch.setenv("TENUTO_PROGRESS", "1")
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeTqdm))
    tenuto.Prewarmer(mem).warm(range(3), lambda i: None, concurrency=1)
    assert events[0] == ("tqdm", 3) and events[-1] == ("close", None)
    assert sum(n for kind, n in events if kind == "update") == 3  # type: ignore[misc]

    class FakeRich:
        def __init__(self, **kwargs: object) -> None:
            events.append(("rich", None))

        def start(self) -> None: ...
        def add_task(self, name: str, total: int) -> int:
            events.append(("task", total))
            return 7

        def update(self, task: int, advance: int) -> None:
            events.append(("advance", advance))

        def stop(self) -> None:
            events.append(("stop", None))

    events.clear()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed: import fails
    monkeypatch.setitem(sys.modules, "rich", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "rich.progress", types.SimpleNamespace(Progress=FakeRich))
    tenuto.Prewarmer(mem).warm(range(4), lambda i: None, concurrency=1)
    assert events[:2] == [("rich", None), ("task", 4)] and events[-1] == ("stop", None)
    assert sum(n for kind, n in events if kind == "advance") == 4  # type: ignore[misc]
