"""In-process `tenuto.RateLimiter` and `tenuto.CircuitBreaker`, on a FakeClock (waiting
moves the fake clock, so nothing sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tenuto
from tenuto.testing import FakeClock, RedisServer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(0)


@pytest.mark.parametrize(
    "bad", ["", "80", "80/fortnight", "0/minute", "eighty/minute", "5/0seconds", "1.5/second"]
)
def test_bad_rate_strings_name_the_string(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        tenuto.RateLimiter(bad)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        tenuto.RateLimiter(80)
    with pytest.raises(ValueError, match="burst"):
        tenuto.RateLimiter("10/second", burst=11)
    with pytest.raises(ValueError, match="max_concurrency"):
        tenuto.RateLimiter("10/second", max_concurrency=0)
    with pytest.raises(ValueError, match="mode"):
        tenuto.RateLimiter("10/second", mode="sideways")
    with pytest.raises(ValueError, match="min_interval"):
        tenuto.RateLimiter("10/second", min_interval=-1)


@pytest.mark.parametrize("text", ["80/minute", "80 per minute", "80/minutes"])
def test_outbound_is_evenly_spaced(clock: FakeClock, text: str) -> None:
    lim = tenuto.RateLimiter(text, clock=clock)
    assert lim.try_acquire() == (True, 0.0)
    ok, retry_after = lim.try_acquire()
    assert not ok and retry_after == pytest.approx(0.75)
    clock.advance(0.75)
    assert lim.try_acquire()[0]


def test_min_interval_and_burst(clock: FakeClock) -> None:
    slow = tenuto.RateLimiter("80/minute", min_interval=2.0, clock=clock)
    assert slow.try_acquire()[0]
    assert slow.try_acquire()[1] == pytest.approx(2.0)
    bursty = tenuto.RateLimiter("80/minute", burst=3, clock=clock)
    assert [bursty.try_acquire()[0] for _ in range(4)] == [True, True, True, False]


def test_blocking_acquire_waits_on_the_clock(clock: FakeClock) -> None:
    lim = tenuto.RateLimiter("4/second", clock=clock)
    for _ in range(8):
        lim.acquire()
    assert clock.now() == pytest.approx(1.75), "8 admissions 250 ms apart"
    with pytest.raises(tenuto.RateLimited) as raised:
        lim.acquire(timeout=0.1)
    assert raised.value.retry_after == pytest.approx(0.25)
    assert isinstance(raised.value, tenuto.TenutoError)


def test_inbound_allows_n_back_to_back_then_the_window(clock: FakeClock) -> None:
    lim = tenuto.RateLimiter("60/minute", mode="inbound", clock=clock)
    assert all(lim.try_acquire()[0] for _ in range(60))
    ok, retry_after = lim.try_acquire()
    assert not ok and retry_after == pytest.approx(60)
    assert lim.window() == (60, 0, pytest.approx(60))
    clock.advance(60)
    assert lim.try_acquire()[0]


def test_per_key_limits_are_separate_and_bounded(clock: FakeClock) -> None:
    lim = tenuto.RateLimiter("2/minute", mode="inbound", max_keys=100, clock=clock)
    assert [lim.try_acquire("10.0.0.1")[0] for _ in range(3)] == [True, True, False]
    assert lim.try_acquire("10.0.0.2")[0]
    for i in range(1000):
        lim.try_acquire(f"client-{i}")
    assert lim.stats()["keys"] <= 100


def test_feedback_pauses_and_slows_then_recovers(clock: FakeClock) -> None:
    lim = tenuto.RateLimiter("80/minute", clock=clock)
    assert lim.try_acquire()[0]
    lim.feedback(429, retry_after=30)
    ok, retry_after = lim.try_acquire()
    assert not ok and retry_after == pytest.approx(30)
    assert lim.stats()["rate_factor"] == 0.5
    clock.advance(30)
    assert lim.try_acquire()[0]
    assert lim.try_acquire()[1] == pytest.approx(1.5), "spacing doubled: 0.75 s -> 1.5 s"
    for _ in range(5):
        lim.feedback(200)
    assert lim.stats()["rate_factor"] == 1.0, "additive recovery, up to the configured rate"
    lim.feedback(429)
    assert not lim.try_acquire()[0], "an exponential pause without Retry-After"


def test_concurrency_cap_across_threads() -> None:
    lim = tenuto.RateLimiter("100000/second", max_concurrency=3)
    gate = threading.Event()
    in_flight = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal in_flight, peak
        with lim:
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            gate.wait(10)
            with lock:
                in_flight -= 1

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    while lim.stats()["in_flight"] < 3:
        threading.Event().wait(0.001)
    gate.set()
    for t in threads:
        t.join(10)
    assert peak == 3 and lim.stats()["in_flight"] == 0


async def test_concurrency_cap_across_tasks() -> None:
    lim = tenuto.RateLimiter("100000/second", max_concurrency=2)
    in_flight = peak = 0

    @lim.limit
    async def call(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return i

    assert await asyncio.gather(*(call(i) for i in range(20))) == list(range(20))
    assert peak == 2 and lim.stats()["in_flight"] == 0


async def test_async_acquire_waits_without_blocking() -> None:
    lim = tenuto.RateLimiter("50/second")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    side = asyncio.ensure_future(ticker())
    for _ in range(5):
        await lim.aacquire()
    side.cancel()
    assert ticks > 5, "the loop kept running while the limiter waited"
    with pytest.raises(tenuto.RateLimited):
        await lim.aacquire(timeout=0.001)


def test_sync_decorator_keeps_the_function(clock: FakeClock) -> None:
    lim = tenuto.RateLimiter("10/second", clock=clock)

    @lim.limit
    def ping(x: int) -> int:
        """Doc."""
        return x

    assert [ping(i) for i in range(3)] == [0, 1, 2] and ping.__doc__ == "Doc."
    assert clock.now() == pytest.approx(0.2)


class TestCircuitBreaker:
    def test_transitions(self, clock: FakeClock) -> None:
        br = tenuto.CircuitBreaker(failures=3, reset_after=30, clock=clock)
        calls = []

        @br
        def upstream(fail: bool) -> str:
            calls.append(fail)
            if fail:
                raise ConnectionError("503")
            return "ok"

        for _ in range(3):
            with pytest.raises(ConnectionError):
                upstream(True)
        assert br.state == "open"
        with pytest.raises(tenuto.CircuitOpen) as raised:
            upstream(False)
        assert raised.value.retry_after == pytest.approx(30) and len(calls) == 3
        clock.advance(30)
        assert br.state == "half_open"
        with pytest.raises(ConnectionError):
            upstream(True)
        assert br.state == "open", "a failed probe reopens"
        clock.advance(30)
        assert upstream(False) == "ok" and br.state == "closed"
        assert br.stats()["opened"] == 1 and br.stats()["refused"] == 1

    def test_one_probe_at_a_time(self, clock: FakeClock) -> None:
        br = tenuto.CircuitBreaker(failures=1, reset_after=1, clock=clock)
        with pytest.raises(ValueError), br:
            raise ValueError
        clock.advance(1)
        with br:  # the probe
            with pytest.raises(tenuto.CircuitOpen), br:
                pass
        assert br.state == "closed"

    async def test_async_and_cancellation(self, clock: FakeClock) -> None:
        br = tenuto.CircuitBreaker(failures=1, reset_after=5, clock=clock)

        @br
        async def upstream() -> None:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await upstream()
        assert br.state == "closed", "cancellation is not the upstream's failure"

        async def fail() -> None:
            raise TimeoutError

        with pytest.raises(TimeoutError):
            await br.acall(fail)
        assert br.state == "open"
        with pytest.raises(tenuto.CircuitOpen):
            await br.acall(fail)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError):
            tenuto.CircuitBreaker(failures=0)
        with pytest.raises(ValueError):
            tenuto.CircuitBreaker(reset_after=-1)


def _hammer_shared(
    url: str, name: str, attempts: int, barrier, results
) -> None:  # pragma: no cover
    lim = tenuto.RateLimiter("50/10seconds", url=url, name=name, mode="inbound")
    barrier.wait(30)
    admitted = sum(lim.try_acquire()[0] for _ in range(attempts))
    results.put((admitted, lim.stats()["admitted_unchecked"]))


def test_shared_limit_across_processes_admits_exactly_n(shared_url, namespace) -> None:
    """4 processes × 40 attempts within one 10-second window: exactly 50 admitted."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer_shared, args=(shared_url, namespace, 40, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert [unchecked for _, unchecked in outcomes] == [0] * 4, "Redis answered every call"
    admitted = [a for a, _ in outcomes]
    # The promise is the total; how it splits depends on how each process is scheduled.
    assert sum(admitted) == 50, admitted


def test_shared_outbound_spacing_and_pause(shared_url, namespace) -> None:
    a = tenuto.RateLimiter("10/second", url=shared_url, name=namespace)
    b = tenuto.RateLimiter("10/second", url=shared_url, name=namespace)
    assert a.try_acquire()[0]
    ok, retry_after = b.try_acquire()
    assert not ok and 0 < retry_after <= 0.1, "the other process sees the same spacing"
    a.feedback(429, retry_after=5)
    ok, retry_after = b.try_acquire()
    assert not ok and 4 < retry_after <= 5, "a 429 seen by one pauses all"


def test_shared_limit_fails_open_or_closed() -> None:
    from tenuto.testing import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    open_lim = tenuto.RateLimiter("1/hour", url=dead, name="x")
    assert all(open_lim.try_acquire()[0] for _ in range(3)), "fail_open admits"
    stats = open_lim.stats()
    assert stats["admitted_unchecked"] == 3 and stats["degraded"] is True
    closed = tenuto.RateLimiter("1/hour", url=dead, name="x", fail_open=False)
    assert closed.try_acquire()[0] is False
    with pytest.raises(ValueError, match="unsupported limiter URL"):
        tenuto.RateLimiter("1/hour", url="memcached://x")


def _hold_leases(url: str, name: str, barrier, results) -> None:  # pragma: no cover
    lim = tenuto.RateLimiter("100000/second", max_concurrency=2, url=url, name=name)
    peak_seen = []

    def work() -> None:
        with lim:
            from conftest import redis_py_client

            client = redis_py_client(url)
            peak_seen.append(client.zcard(f"tenuto|limit|{{{name}}}:leases"))
            client.close()
            time.sleep(0.05)  # holding the lease, like an upstream call

    barrier.wait(30)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results.put(max(peak_seen))


def test_concurrency_cap_shared_across_processes(shared_url, namespace) -> None:
    """3 processes x 3 threads, max_concurrency=2 through Redis: never more than 2 leases."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_hold_leases, args=(shared_url, namespace, barrier, results))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    peaks = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert max(peaks) == 2 and min(peaks) >= 1, peaks  # used, and never more than 2


def test_dead_holders_lease_expires(shared_url, namespace) -> None:
    lim = tenuto.RateLimiter(
        "1000/second", max_concurrency=1, url=shared_url, name=namespace, lease_ttl=0.05
    )
    token = lim._lease()
    assert token, "took the only lease"
    assert lim._lease() is None, "the cap is shared"
    deadline = time.monotonic() + 5
    while lim._lease() is None:  # the holder never gives it back (it 'died')
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_breaker_opens_on_a_failure_rate(clock: FakeClock) -> None:
    br = tenuto.CircuitBreaker(failures=100, failure_rate=0.5, window=10, min_calls=4, clock=clock)

    def call(fail: bool) -> None:
        try:
            with br:
                if fail:
                    raise ConnectionError
        except ConnectionError:
            pass

    for fail in (True, False, True, False):
        call(fail)
        clock.advance(1)
    assert br.state == "closed", "the rate is judged when a call fails: 3 calls were too few"
    call(True)
    assert br.state == "open", "3 of 5 failed in the window"
    with pytest.raises(ValueError):
        tenuto.CircuitBreaker(failure_rate=1.5)


def test_breaker_state_shared_through_redis(shared_url, namespace) -> None:
    """Two processes' breakers on one Redis: failures seen by one open both."""
    one = tenuto.CircuitBreaker(failures=2, reset_after=0.2, url=shared_url, name=namespace)
    two = tenuto.CircuitBreaker(failures=2, reset_after=0.2, url=shared_url, name=namespace)
    for breaker in (one, two):
        with pytest.raises(ConnectionError), breaker:
            raise ConnectionError
    assert one.state == "open" and two.state == "open"
    with pytest.raises(tenuto.CircuitOpen) as raised, two:
        pass
    assert 0 < raised.value.retry_after <= 0.2
    deadline = time.monotonic() + 5
    while two.state != "half_open":  # reset_after passes on the Redis server's clock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with one:  # the one probe, and it succeeds
        with pytest.raises(tenuto.CircuitOpen), two:
            pass
    assert one.state == "closed" and two.state == "closed"
    with pytest.raises(ValueError, match="unsupported breaker URL"):
        tenuto.CircuitBreaker(url="memcached://x")


# A Redis server that hangs (SIGSTOP: connections open, commands unanswered until the
# 1 s command timeout). Async paths must wait for it on tenuto's runtime, never on the
# event loop: the loop's heartbeat stays regular while 50 tasks wait.
HEARTBEAT = 0.005
MAX_STALL = 0.1  # generous for a noisy machine; blocking the loop would show ~1 s


async def worst_stall_during(
    start: Callable[[], list[asyncio.Future[Any]]], bound: float = 10.0
) -> tuple[float, list[asyncio.Future[Any]]]:
    """The largest gap (seconds) between heartbeat wake-ups while the tasks `start()`
    returns run (the heartbeat is already beating when they start), and the tasks."""
    worst = 0.0

    async def heartbeat() -> None:
        nonlocal worst
        last = time.perf_counter()
        while True:
            await asyncio.sleep(HEARTBEAT)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    beat = asyncio.ensure_future(heartbeat())
    await asyncio.sleep(0)  # one loop turn: the heartbeat takes its first time
    tasks = start()
    try:
        await asyncio.wait(tasks, timeout=bound)
    finally:
        beat.cancel()
    return worst, tasks


@contextlib.contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    server.pause()
    try:
        yield
    finally:
        server.resume()


async def test_async_limiter_never_blocks_the_loop_on_a_stalled_redis(
    own_redis: RedisServer, namespace: str
) -> None:
    lim = tenuto.RateLimiter("100000/second", max_concurrency=8, url=own_redis.url, name=namespace)
    async with lim:  # connected, and the shared rate and lease work
        pass
    done = 0

    async def call() -> None:
        nonlocal done
        async with lim:
            await asyncio.sleep(0)
        done += 1

    with paused(own_redis):
        stall, tasks = await worst_stall_during(
            lambda: [asyncio.ensure_future(call()) for _ in range(50)]
        )
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    print(f"limiter: worst loop stall {stall * 1000:.1f} ms")
    assert done == 50 and lim.stats()["in_flight"] == 0
    assert stall < MAX_STALL, f"the event loop stalled {stall * 1000:.0f} ms"


async def test_async_breaker_never_blocks_the_loop_on_a_stalled_redis(
    own_redis: RedisServer, namespace: str
) -> None:
    br = tenuto.CircuitBreaker(failures=100, url=own_redis.url, name=namespace)

    async def work() -> str:
        await asyncio.sleep(0)
        return "ok"

    assert await br.acall(work) == "ok"  # connected
    with paused(own_redis):
        stall, tasks = await worst_stall_during(
            lambda: [asyncio.ensure_future(br.acall(work)) for _ in range(50)]
        )
    assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == ["ok"] * 50
    print(f"breaker: worst loop stall {stall * 1000:.1f} ms")
    assert stall < MAX_STALL, f"the event loop stalled {stall * 1000:.0f} ms"
    assert br.state == "closed" and br.stats()["calls"] == 51


async def test_cancelling_aacquire_on_a_stalled_redis_returns_promptly(
    own_redis: RedisServer, namespace: str
) -> None:
    lim = tenuto.RateLimiter("100000/second", url=own_redis.url, name=namespace)
    await lim.aacquire()  # connected
    with paused(own_redis):
        start = time.perf_counter()
        task = asyncio.ensure_future(lim.aacquire())
        await asyncio.sleep(0)  # one loop turn: the task runs up to its first await
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        elapsed = time.perf_counter() - start
    assert elapsed < MAX_STALL, f"cancelling took {elapsed * 1000:.0f} ms"


async def test_async_paths_share_the_limit_through_redis(
    redis_server: RedisServer, raw_redis: Any, namespace: str
) -> None:
    lim = tenuto.RateLimiter("10/second", url=redis_server.url, name=namespace)
    other = tenuto.RateLimiter("10/second", url=redis_server.url, name=namespace)
    await lim.aacquire()
    ok, retry_after = other.try_acquire()
    assert not ok and 0 < retry_after <= 0.1, "the other process sees the same spacing"
    with pytest.raises(tenuto.RateLimited):
        await lim.aacquire(timeout=0)
    await lim.afeedback(429, retry_after=5)
    ok, retry_after = other.try_acquire()
    assert not ok and 4 < retry_after <= 5, "a 429 seen by one pauses all"

    name = f"{namespace}-cap"
    capped = tenuto.RateLimiter("100000/second", max_concurrency=2, url=redis_server.url, name=name)
    elsewhere = tenuto.RateLimiter(
        "100000/second", max_concurrency=2, url=redis_server.url, name=name
    )
    held = elsewhere._lease()  # another process holds one of the two leases
    assert held
    in_flight = peak = 0

    @capped.limit
    async def call() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1

    await asyncio.gather(*(call() for _ in range(6)))
    assert peak == 1, "one lease left for this process's tasks"
    elsewhere._unlease(held)
    assert raw_redis.zcard(f"tenuto|limit|{{{name}}}:leases") == 0, "every lease given back"
    assert capped.stats()["in_flight"] == 0


async def test_async_breaker_shares_its_state_through_redis(
    redis_server: RedisServer, namespace: str
) -> None:
    one = tenuto.CircuitBreaker(failures=2, reset_after=0.2, url=redis_server.url, name=namespace)
    two = tenuto.CircuitBreaker(failures=2, reset_after=0.2, url=redis_server.url, name=namespace)

    async def fail() -> None:
        raise ConnectionError

    async def succeed() -> str:
        return "ok"

    for breaker in (one, two):
        with pytest.raises(ConnectionError):
            await breaker.acall(fail)
    assert one.state == "open" and two.state == "open"
    with pytest.raises(tenuto.CircuitOpen) as raised:
        await two.acall(succeed)
    assert 0 < raised.value.retry_after <= 0.2
    deadline = time.monotonic() + 5
    while two.state != "half_open":  # reset_after passes on the Redis server's clock
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    async with one:  # the one probe, and it succeeds
        with pytest.raises(tenuto.CircuitOpen):
            await two.acall(succeed)
    assert one.state == "closed" and two.state == "closed", "the probe's report arrived"
