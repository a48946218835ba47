"""Cost of one cache get/set, tenuto against lower bounds and peers, in one run.

Memory: tenuto.Cache (sync, async) next to a plain dict (the lower bound).
Redis:  tenuto.Cache (sync, async) next to redis-py GET + json.loads / SET + json.dumps on
        the same server (what the host apps do today).

Prints median nanoseconds per call and the ratio to the reference row of each group.
Usage: python benches/bench_cache.py [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import tenuto
from tenuto.testing import RedisServer

QUICK = "--quick" in sys.argv
REPEATS = 5 if QUICK else 9
VALUE = {"id": "4uLU6hMCjMI75M1A2tKUQC", "title": "Tenuto", "features": {"tempo": 120.0, "key": 5}}


def per_call_ns(run_batch: Callable[[int], None], batch: int) -> float:
    """Median over REPEATS of (time of one batch) / batch, after a warm-up batch."""
    run_batch(batch)
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        run_batch(batch)
        samples.append((time.perf_counter_ns() - start) / batch)
    return statistics.median(samples)


def sync_loop(fn: Callable[[], object]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            fn()

    return run


def async_loop(make: Callable[[], object]) -> Callable[[int], None]:
    loop = asyncio.new_event_loop()

    async def body(n: int) -> None:
        for _ in range(n):
            await make()  # type: ignore[misc]

    def run(n: int) -> None:
        loop.run_until_complete(body(n))

    return run


def concurrent_gets(cache: tenuto.Cache, width: int) -> Callable[[int], None]:
    """n gets issued `width` at a time with asyncio.gather: cost per get under load."""
    loop = asyncio.new_event_loop()

    async def body(n: int) -> None:
        for _ in range(n // width):
            await asyncio.gather(*(cache.aget("k") for _ in range(width)))

    return lambda n: loop.run_until_complete(body(n))


Row = tuple[str, str, float]


def memory_rows() -> list[Row]:
    n = 20_000 if QUICK else 200_000
    cache = tenuto.Cache(jitter=0.0)
    cache.set("k", VALUE, ttl=3600)
    plain: dict[str, object] = {"k": VALUE}

    async def plain_coro() -> object:
        return plain.get("k")

    return [
        ("memory get", "dict.get (lower bound)", per_call_ns(sync_loop(lambda: plain.get("k")), n)),
        ("memory get", "tenuto get", per_call_ns(sync_loop(lambda: cache.get("k")), n)),
        ("memory get", "tenuto aget", per_call_ns(async_loop(lambda: cache.aget("k")), n)),
        ("memory get", "plain async def (async bound)", per_call_ns(async_loop(plain_coro), n)),
        (
            "memory set",
            "dict[k] = v (lower bound)",
            per_call_ns(sync_loop(lambda: plain.__setitem__("k", VALUE)), n),
        ),
        (
            "memory set",
            "tenuto set",
            per_call_ns(sync_loop(lambda: cache.set("k", VALUE, ttl=3600)), n),
        ),
        (
            "memory set",
            "tenuto aset",
            per_call_ns(async_loop(lambda: cache.aset("k", VALUE, ttl=3600)), n),
        ),
    ]


def redis_rows(url: str) -> list[Row]:
    import redis as redis_py

    n = 1_000 if QUICK else 5_000
    cache = tenuto.Cache(url, namespace="bench", jitter=0.0, fail_open=False)
    cache.set("k", VALUE, ttl=3600)
    raw = redis_py.Redis.from_url(url)
    raw.set("bench:raw", json.dumps(VALUE), ex=3600)
    rows = [
        (
            "redis get",
            "redis-py GET + json.loads",
            per_call_ns(sync_loop(lambda: json.loads(raw.get("bench:raw"))), n),
        ),
        ("redis get", "tenuto get", per_call_ns(sync_loop(lambda: cache.get("k")), n)),
        ("redis get", "tenuto aget", per_call_ns(async_loop(lambda: cache.aget("k")), n)),
    ]
    try:
        import redis.asyncio as aredis

        araw = aredis.Redis.from_url(url)

        async def aget_raw() -> object:
            return json.loads(await araw.get("bench:raw"))

        rows.append(
            ("redis get", "redis.asyncio GET + json.loads", per_call_ns(async_loop(aget_raw), n))
        )
    except ImportError:
        pass
    rows.append(
        ("redis get", "tenuto aget, 100 tasks at once", per_call_ns(concurrent_gets(cache, 100), n))
    )
    rows += [
        (
            "redis set",
            "redis-py SET EX + json.dumps",
            per_call_ns(sync_loop(lambda: raw.set("bench:raw", json.dumps(VALUE), ex=3600)), n),
        ),
        (
            "redis set",
            "tenuto set",
            per_call_ns(sync_loop(lambda: cache.set("k", VALUE, ttl=3600)), n),
        ),
        (
            "redis set",
            "tenuto aset",
            per_call_ns(async_loop(lambda: cache.aset("k", VALUE, ttl=3600)), n),
        ),
    ]
    raw.close()
    return rows


def print_table(rows: list[Row]) -> str:
    lines = [f"{'group':<11} {'implementation':<32} {'ns/call':>10} {'ratio':>7}"]
    reference: dict[str, float] = {}
    for group, name, ns in rows:
        reference.setdefault(group, ns)
        lines.append(f"{group:<11} {name:<32} {ns:>10,.0f} {ns / reference[group]:>6.2f}x")
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    rows = memory_rows()
    with RedisServer() as server:
        rows += redis_rows(server.url)
    print(
        f"tenuto {tenuto.__version__}, Python {sys.version.split()[0]}; ratio = row / first row of its group"
    )
    text = print_table(rows)
    out = os.environ.get("TENUTO_BENCH_OUT")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
