"""The engine's contract, measured side by side with peers and floors in one run:

- sync miss+store of a memory-cached function (every call a new key), next to
  functools.lru_cache, moka-py, cachebox and cachetools doing the same;
- decorated Redis hits: sync next to redis-py GET + json.loads, async next to
  redis.asyncio GET + orjson.loads, sequential and with 100 tasks at once;
- the delay from one process's write to another's return when it waited for that load
  (two caches on one Redis, each with its own flights, stand for two processes).

Prints medians and the ratio to each group's reference row.
Usage: python benches/bench_engine.py [--quick]
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import tenuto
from tenuto.testing import RedisServer, companion_key

QUICK = "--quick" in sys.argv
REPEATS = 5 if QUICK else 9
MISSES = 20_000 if QUICK else 100_000
VALUE = {"id": "4uLU6hMCjMI75M1A2tKUQC", "title": "Tenuto", "features": {"tempo": 120.0, "key": 5}}


def median_ns(run: Callable[[int], None], batch: int) -> float:
    run(batch)  # warm-up
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        run(batch)
        samples.append((time.perf_counter_ns() - start) / batch)
    return statistics.median(samples)


def table(group: str, rows: list[tuple[str, float | str]], unit: str = "ns") -> None:
    reference = next(v for _, v in rows if isinstance(v, float))
    print(f"{group}: {'implementation':<44} {unit + '/call':>10} {'ratio':>7}")
    for name, value in rows:
        if isinstance(value, str):
            print(f"{group}: {name:<44} {'n/a':>10}  ({value})")
        else:
            print(f"{group}: {name:<44} {value:>10,.0f} {value / reference:>6.2f}x")
    print()


def body(n: int) -> dict[str, Any]:
    return {"n": n, "tracks": [1, 2, 3]}


def miss_and_store() -> None:
    """Every call is a new key: the cost of a miss, the call, and the store."""

    def peers() -> dict[str, Callable[[], Callable[[int], Any]]]:
        def lru() -> Any:
            return functools.lru_cache(maxsize=10_000)(body)

        def tenuto_cached() -> Any:
            return tenuto.Cache(max_entries=10_000, jitter=0.0).cached(ttl=300)(body)

        def moka_py() -> Any:
            import moka_py

            return moka_py.cached(maxsize=10_000, ttl=300)(body)

        def moka_py_like_tenuto() -> Any:
            # What tenuto does: keep every new value (LRU; moka's default TinyLFU turns
            # most new keys away at capacity) and share one call per key.
            import moka_py

            return moka_py.cached(maxsize=10_000, ttl=300, policy="lru", wait_concurrent=True)(body)

        def cachebox() -> Any:
            import cachebox

            return cachebox.cached(cachebox.TTLCache(10_000, 300))(body)

        def cachetools() -> Any:
            import cachetools

            return cachetools.cached(cachetools.TTLCache(10_000, 300))(body)

        return {
            "functools.lru_cache (lower bound)": lru,
            "tenuto @cache.cached": tenuto_cached,
            "moka-py cached (defaults)": moka_py,
            "moka-py cached (lru, wait_concurrent)": moka_py_like_tenuto,
            "cachebox cached": cachebox,
            "cachetools cached": cachetools,
        }

    rows: list[tuple[str, float | str]] = []
    for name, make in peers().items():
        try:
            fn = make()
        except Exception as exc:  # a missing peer is reported, not skipped silently
            rows.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        keys = itertools.count()

        def run(n: int, fn: Any = fn, keys: Any = keys) -> None:
            for _ in range(n):
                fn(next(keys))

        rows.append((name, median_ns(run, MISSES)))
    table("memory miss+store", rows)


def redis_hits(server: RedisServer) -> None:
    import redis
    import redis.asyncio

    try:
        import orjson

        loads: Callable[[bytes], Any] = orjson.loads
        loads_name = "orjson.loads"
    except ImportError:
        loads, loads_name = json.loads, "json.loads"
    cache = tenuto.Cache(server.url, namespace="bench", jitter=0.0)

    @cache.cached(ttl=3600)
    def track(i: int) -> dict[str, Any]:
        return VALUE

    @cache.cached(ttl=3600)
    async def atrack(i: int) -> dict[str, Any]:
        return VALUE

    track(1)
    asyncio.run(atrack(1))
    raw = redis.Redis.from_url(server.url)
    raw.set("plain", json.dumps({"payload": VALUE}))
    batch = 2_000 if QUICK else 5_000

    def sync_tenuto(n: int) -> None:
        for _ in range(n):
            track(1)

    def sync_redis_py(n: int) -> None:
        for _ in range(n):
            json.loads(raw.get("plain"))

    table(
        "redis hit, sync",
        [
            ("redis-py GET + json.loads (reference)", median_ns(sync_redis_py, batch)),
            ("tenuto @cache.cached", median_ns(sync_tenuto, batch)),
        ],
    )

    loop = asyncio.new_event_loop()
    araw = redis.asyncio.Redis.from_url(server.url)

    async def seq_tenuto(n: int) -> None:
        for _ in range(n):
            await atrack(1)

    async def seq_redis(n: int) -> None:
        for _ in range(n):
            loads(await araw.get("plain"))

    async def many_tenuto(n: int) -> None:
        for _ in range(n // 100):
            await asyncio.gather(*(atrack(1) for _ in range(100)))

    async def many_redis(n: int) -> None:
        for _ in range(n // 100):
            await asyncio.gather(*(araw.get("plain") for _ in range(100)))

    def on_loop(coro_fn: Callable[[int], Any]) -> Callable[[int], None]:
        return lambda n: loop.run_until_complete(coro_fn(n))

    table(
        "redis hit, async sequential",
        [
            (f"redis.asyncio GET + {loads_name} (reference)", median_ns(on_loop(seq_redis), batch)),
            ("tenuto @cache.cached", median_ns(on_loop(seq_tenuto), batch)),
        ],
    )
    table(
        "redis hit, 100 tasks at once",
        [
            ("redis.asyncio GET, per get (reference)", median_ns(on_loop(many_redis), batch)),
            ("tenuto @cache.cached, per call", median_ns(on_loop(many_tenuto), batch)),
        ],
    )
    loop.run_until_complete(araw.aclose())
    loop.close()
    raw.close()


def follower_delay(server: RedisServer) -> None:
    """A process waiting for another's load returns this long after the write."""
    leader_cache = tenuto.Cache(server.url, namespace="wait")
    follower_cache = tenuto.Cache(server.url, namespace="wait")
    gate = threading.Event()
    written: list[float] = []

    def make(cache: tenuto.Cache) -> Any:
        @cache.cached(ttl=60, name="recs")
        def recs(seed: int) -> dict[str, int]:
            assert gate.wait(10)
            return {"seed": seed}

        return recs

    lead, follow = make(leader_cache), make(follower_cache)
    import redis

    raw = redis.Redis.from_url(server.url)
    delays = []
    rounds = 10 if QUICK else 30
    for seed in range(rounds):
        gate.clear()
        leader = threading.Thread(
            target=lambda s=seed: (lead(s), written.append(time.perf_counter()))
        )
        leader.start()
        while not raw.exists(companion_key(f"wait:{lead.key(seed)}", "lock")):
            time.sleep(0.0005)
        returned: list[float] = []
        follower = threading.Thread(
            target=lambda s=seed, out=returned: (follow(s), out.append(time.perf_counter()))
        )
        follower.start()
        while not raw.exists(companion_key(f"wait:{lead.key(seed)}", "waiters")):
            time.sleep(0.0005)
        gate.set()
        leader.join()
        follower.join()
        delays.append((returned[0] - written[-1]) * 1e6)
    raw.close()
    print(f"cross-process wait: leader's write -> follower's return, {rounds} rounds")
    print(
        f"cross-process wait: median {statistics.median(delays):,.0f} us, "
        f"max {max(delays):,.0f} us (target: median < 5,000 us; "
        "the old follower polled every 5-200 ms)"
    )
    print()


def main() -> None:
    miss_and_store()
    with RedisServer() as server:
        redis_hits(server)
        follower_delay(server)


if __name__ == "__main__":
    main()
