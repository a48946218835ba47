"""Rate limiters: accuracy and cost, tenuto against peers in the same run.

Accuracy: a limit of 50/s, 20 workers trying as fast as they can (with a 1 ms pause
between tries) for 3 s; reported: the most admissions seen in any 1-second window, as a
multiple of the limit (the promise is 1.00x at most), and how much of what the limit
allows (N per started second) was admitted. tenuto's admission times are its decision
times (the Redis server's clock when shared); peers' are taken right after their call
returns, which can only make their windows look better, never worse.

Cost: one non-blocking acquire in process (median ns), and on Redis one shared acquire
next to the lower bound of a raw INCR+EXPIRE pipeline.

Stall: the event loop's worst gap between 5 ms heartbeats while 50 tasks go through a
shared limiter (`async with`) or breaker (`acall`) whose Redis server hangs (SIGSTOP; the
command timeout is 1 s, so blocking the loop would show about 1000 ms).
Usage: python benches/bench_limits.py [--quick]
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import tenuto
from tenuto.testing import RedisServer

QUICK = "--quick" in sys.argv
LIMIT, WORKERS, SECONDS = 50, 20, (1.5 if QUICK else 3.0)


def worst_window(times: list[float], period: float = 1.0) -> int:
    times = sorted(times)
    worst, start = 0, 0
    for end, t in enumerate(times):
        while times[start] + period <= t:
            start += 1
        worst = max(worst, end - start + 1)
    return worst


def run_threads(attempt: Callable[[], float | None]) -> list[float]:
    """`attempt()` returns the admission time, or None when refused."""
    admitted: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def worker() -> None:
        while time.monotonic() < stop:
            at = attempt()
            if at is not None:
                with lock:
                    admitted.append(at)
            time.sleep(0.001)

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return admitted


def report(name: str, admitted: list[float]) -> None:
    if not admitted:
        print(f"accuracy  {name:<44} n/a (nothing admitted)")
        return
    worst = worst_window(admitted) / LIMIT
    allowed = LIMIT * math.ceil(SECONDS)  # N back to back, then N per window
    print(
        f"accuracy  {name:<44} worst 1 s window {worst:5.2f}x   admitted {len(admitted) / allowed:6.1%} of allowed"
    )


def tenuto_attempt(url: str | None, name: str, mode: str = "inbound") -> Callable[[], float | None]:
    lim = tenuto.RateLimiter(f"{LIMIT}/second", url=url, name=name, mode=mode, clock=time.time)

    def attempt() -> float | None:
        ok, _, decided_at = lim._try_acquire_at()
        return decided_at if ok else None

    return attempt


def limits_attempt(strategy: str, uri: str) -> Callable[[], float | None]:
    from limits import parse, storage, strategies

    store = storage.storage_from_string(uri)
    limiter = getattr(strategies, strategy)(store)
    item = parse(f"{LIMIT}/second")
    return lambda: time.time() if limiter.hit(item, "bench") else None


def pyrate_attempt() -> Callable[[], float | None]:
    from pyrate_limiter import Duration, Limiter, Rate

    limiter = Limiter(Rate(LIMIT, Duration.SECOND))
    return lambda: time.time() if limiter.try_acquire("bench", blocking=False) else None


def aiolimiter_times() -> list[float]:
    from aiolimiter import AsyncLimiter

    async def run() -> list[float]:
        limiter = AsyncLimiter(LIMIT, 1)
        admitted: list[float] = []
        stop = time.monotonic() + SECONDS

        async def worker() -> None:
            while time.monotonic() < stop:
                async with limiter:
                    admitted.append(time.time())

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        return admitted

    return asyncio.run(run())


def tenuto_task_times(url: str | None, name: str) -> list[float]:
    """Tasks waiting with `aacquire` (never blocking the loop); decision times."""
    lim = tenuto.RateLimiter(f"{LIMIT}/second", url=url, name=name, mode="inbound", clock=time.time)

    async def run() -> list[float]:
        admitted: list[float] = []
        stop = time.monotonic() + SECONDS

        async def worker() -> None:
            while time.monotonic() < stop:
                ok, retry_after, at = lim._try_acquire_at()
                if ok:
                    admitted.append(at)
                else:
                    await asyncio.sleep(max(retry_after, 0.001))

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        return admitted

    return asyncio.run(run())


def _process_worker(url: str, name: str, barrier, results) -> None:
    barrier.wait(30)
    results.put(run_threads(tenuto_attempt(url, name)))


def tenuto_process_times(url: str, name: str, processes: int = 4) -> list[float]:
    """`processes` processes x WORKERS/processes threads sharing one Redis limit."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    global WORKERS
    saved, WORKERS = WORKERS, max(1, WORKERS // processes)
    try:
        procs = [
            ctx.Process(target=_process_worker, args=(url, name, barrier, results))
            for _ in range(processes)
        ]
        for p in procs:
            p.start()
        times = [t for _ in procs for t in results.get(timeout=60)]
        for p in procs:
            p.join(30)
    finally:
        WORKERS = saved
    return times


def median_ns(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - start) / n)
    return statistics.median(samples)


def cost_rows(url: str) -> None:
    import redis as redis_py
    from limits import parse, storage, strategies

    n = 20_000 if QUICK else 100_000
    lim = tenuto.RateLimiter("1000000/second", mode="inbound")
    print(
        f"cost      {'tenuto try_acquire (in process)':<44} {median_ns(lim.try_acquire, n):>9,.0f} ns"
    )
    fixed = strategies.FixedWindowRateLimiter(storage.MemoryStorage())
    item = parse("1000000/second")
    print(
        f"cost      {'limits FixedWindow hit (memory)':<44} {median_ns(lambda: fixed.hit(item, 'k'), n):>9,.0f} ns"
    )
    from pyrate_limiter import Duration, Limiter, Rate

    pyrate = Limiter(Rate(1_000_000, Duration.SECOND))
    print(
        f"cost      {'pyrate-limiter try_acquire':<44} {median_ns(lambda: pyrate.try_acquire('k', blocking=False), n // 10):>9,.0f} ns"
    )

    m = 2_000 if QUICK else 10_000
    raw = redis_py.Redis.from_url(url)

    def incr_expire() -> None:
        pipe = raw.pipeline(transaction=False)
        pipe.incr("bench:raw")
        pipe.expire("bench:raw", 60)
        pipe.execute()

    shared = tenuto.RateLimiter("1000000/second", url=url, name="bench-cost", mode="inbound")
    # Interleaved rounds, medians of each: the machine's load drifts during a run.
    rounds = [(median_ns(incr_expire, m), median_ns(shared.try_acquire, m)) for _ in range(3)]
    base = statistics.median(r[0] for r in rounds)
    tenuto_ns = statistics.median(r[1] for r in rounds)
    print(f"cost      {'raw INCR+EXPIRE pipeline (lower bound)':<44} {base:>9,.0f} ns   1.00x")
    print(
        f"cost      {'tenuto shared try_acquire (Redis)':<44} {tenuto_ns:>9,.0f} ns   {tenuto_ns / base:.2f}x"
    )
    raw.close()


def stall_ms(server: RedisServer, make_task: Callable[[], Coroutine[Any, Any, None]]) -> float:
    """Worst heartbeat gap (ms) while 50 tasks from `make_task` run on a paused server."""

    async def run() -> float:
        worst, last = 0.0, time.perf_counter()

        async def heartbeat() -> None:
            nonlocal worst, last
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                worst, last = max(worst, now - last), now

        beat = asyncio.ensure_future(heartbeat())
        await asyncio.sleep(0)  # the heartbeat takes its first time
        server.pause()
        try:
            tasks = [asyncio.ensure_future(make_task()) for _ in range(50)]
            await asyncio.wait(tasks, timeout=10)
        finally:
            server.resume()
            beat.cancel()
        await asyncio.gather(*tasks)
        return worst * 1000

    return asyncio.run(run())


def stall_rows() -> None:
    with RedisServer() as server:
        lim = tenuto.RateLimiter("100000/second", max_concurrency=8, url=server.url, name="s")
        breaker = tenuto.CircuitBreaker(failures=100, url=server.url, name="s")

        async def limited() -> None:
            async with lim:
                await asyncio.sleep(0)

        async def guarded() -> None:
            await breaker.acall(asyncio.sleep, 0)

        for name, make_task in [
            ("tenuto async with limiter (Redis paused)", limited),
            ("tenuto breaker acall (Redis paused)", guarded),
        ]:
            asyncio.run(make_task())  # connected before the pause
            print(f"stall     {name:<44} {stall_ms(server, make_task):9.1f} ms worst loop gap")


def main() -> None:
    print(
        f"tenuto {tenuto.__version__}, Python {sys.version.split()[0]}; {LIMIT}/s, {WORKERS} workers, {SECONDS} s"
    )
    with RedisServer() as server:
        report("tenuto, in process (threads)", run_threads(tenuto_attempt(None, "a")))
        report(
            "tenuto, shared through Redis (threads)", run_threads(tenuto_attempt(server.url, "b"))
        )
        report("tenuto, in process (asyncio tasks)", tenuto_task_times(None, "c"))
        report("tenuto, shared through Redis (4 processes)", tenuto_process_times(server.url, "d"))
        report("aiolimiter (tasks)", aiolimiter_times())
        report(
            "limits FixedWindow (Redis)",
            run_threads(limits_attempt("FixedWindowRateLimiter", server.url)),
        )
        report(
            "limits SlidingWindowCounter (Redis)",
            run_threads(limits_attempt("SlidingWindowCounterRateLimiter", server.url)),
        )
        report(
            "limits MovingWindow (memory)",
            run_threads(limits_attempt("MovingWindowRateLimiter", "memory://")),
        )
        try:
            report("pyrate-limiter (memory)", run_threads(pyrate_attempt()))
        except Exception as exc:  # report a broken peer, keep going
            print(f"accuracy  {'pyrate-limiter (memory)':<44} n/a ({type(exc).__name__}: {exc})")
        cost_rows(server.url)
    stall_rows()


if __name__ == "__main__":
    main()
