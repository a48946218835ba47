"""Warm-hit cost of a cached function: tenuto's @cache.cached against peer libraries and
the lower bounds (functools.lru_cache for sync, a plain `async def` for async), measured
side by side in one run. Every cache is in process memory.

Prints the median nanoseconds per call and the ratio to the group's lower bound.
A peer that is not installed, or fails, is reported as such, not skipped silently.
Usage: python benches/bench_cached.py [--quick]
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import tenuto

QUICK = "--quick" in sys.argv
CALLS = 20_000 if QUICK else 100_000
REPEATS = 5 if QUICK else 9


def body(country: str, limit: int) -> dict[str, Any]:
    return {"country": country, "tracks": list(range(limit))}


async def abody(country: str, limit: int) -> dict[str, Any]:
    return body(country, limit)


RESULT = body("US", 50)


async def already_known(country: str, limit: int) -> dict[str, Any]:
    """The async lower bound: an await that does no work at all."""
    return RESULT


def time_sync(fn: Callable[[str, int], Any]) -> float:
    fn("US", 50)  # warm: the first call fills the cache
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(CALLS):
            fn("US", 50)
        samples.append((time.perf_counter_ns() - start) / CALLS)
    return statistics.median(samples)


def time_async(fn: Callable[[str, int], Any]) -> float:
    async def run() -> float:
        await fn("US", 50)
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter_ns()
            for _ in range(CALLS):
                await fn("US", 50)
            samples.append((time.perf_counter_ns() - start) / CALLS)
        return statistics.median(samples)

    return asyncio.run(run())


def sync_peers() -> dict[str, Callable[[], Callable[[str, int], Any]]]:
    def lru() -> Any:
        return functools.lru_cache(maxsize=None)(body)

    def tenuto_cached() -> Any:
        return tenuto.Cache(jitter=0.0).cached(ttl=300)(body)

    def tenuto_metrics_on() -> Any:
        # Registered with prometheus_client: counters are read at scrape time, so the hit
        # path is the same code (this row checks the "<= 5 % overhead" claim).
        import tenuto.metrics

        tenuto.metrics.register()
        return tenuto.Cache(jitter=0.0).cached(ttl=300)(body)

    def cachebox() -> Any:
        import cachebox

        return cachebox.cached(cachebox.TTLCache(10_000, 300))(body)

    def moka_py() -> Any:
        import moka_py

        return moka_py.cached(maxsize=10_000, ttl=300)(body)

    def cachetools() -> Any:
        import cachetools

        return cachetools.cached(cachetools.TTLCache(10_000, 300))(body)

    def dogpile() -> Any:
        from dogpile.cache import make_region

        region = make_region().configure("dogpile.cache.memory", expiration_time=300)
        return region.cache_on_arguments()(body)

    def flask_caching() -> Any:
        from flask import Flask
        from flask_caching import Cache

        app = Flask("bench")
        cache = Cache(app, config={"CACHE_TYPE": "SimpleCache"})
        memoized = cache.memoize(300)(body)
        app.app_context().push()  # memoize needs an app context
        return memoized

    return {
        "functools.lru_cache (lower bound)": lru,
        "tenuto @cache.cached": tenuto_cached,
        "tenuto, metrics registered": tenuto_metrics_on,
        "cachebox": cachebox,
        "moka-py": moka_py,
        "cachetools": cachetools,
        "dogpile.cache": dogpile,
        "Flask-Caching": flask_caching,
    }


def async_peers() -> dict[str, Callable[[], Callable[[str, int], Any]]]:
    def plain() -> Any:
        return already_known

    def tenuto_cached() -> Any:
        return tenuto.Cache(jitter=0.0).cached(ttl=300)(abody)

    def cachebox() -> Any:
        import cachebox

        return cachebox.cached(cachebox.TTLCache(10_000, 300))(abody)

    def moka_py() -> Any:
        import moka_py

        return moka_py.cached(maxsize=10_000, ttl=300)(abody)

    def fastapi_cache() -> Any:
        from fastapi_cache import FastAPICache
        from fastapi_cache.backends.inmemory import InMemoryBackend
        from fastapi_cache.decorator import cache

        FastAPICache.init(InMemoryBackend())
        return cache(expire=300)(abody)

    def aiocache() -> Any:
        import aiocache

        return aiocache.cached(ttl=300)(abody)

    def cashews() -> Any:
        from cashews import cache

        cache.setup("mem://")
        return cache(ttl="5m")(abody)

    return {
        "plain async def (lower bound)": plain,
        "tenuto @cache.cached": tenuto_cached,
        "moka-py": moka_py,
        "cachebox": cachebox,
        "fastapi-cache2": fastapi_cache,
        "aiocache": aiocache,
        "cashews": cashews,
    }


def tier_peers(url: str) -> dict[str, Callable[[], Callable[[str, int], Any]]]:
    """A warm hit on the memory backend (the bound), through a local tier in front of
    Redis, and on Redis alone."""

    def memory() -> Any:
        return tenuto.Cache(jitter=0.0).cached(ttl=300)(body)

    def local() -> Any:
        cache = tenuto.Cache(url, namespace="bench-local", jitter=0.0, local=10_000, local_ttl=60)
        return cache.cached(ttl=300)(body)

    def redis() -> Any:
        return tenuto.Cache(url, namespace="bench-remote", jitter=0.0).cached(ttl=300)(body)

    def get(cache: tenuto.Cache) -> Callable[[str, int], Any]:
        cache.set("k", {"country": "US"}, ttl=300)
        return lambda country, limit: cache.get("k")

    return {
        "memory backend (bound)": memory,
        "Redis + local tier": local,
        "Redis, no local tier": redis,
        "get(): memory backend": lambda: get(tenuto.Cache(jitter=0.0)),
        "get(): Redis + local tier": lambda: get(
            tenuto.Cache(url, namespace="bench-local", local=100, local_ttl=60)
        ),
    }


def measure(
    group: str, peers: dict[str, Callable[[], Any]], timer: Callable[[Any], float]
) -> list[str]:
    lines = [f"{group}: {'implementation':<34} {'ns/call':>9} {'vs bound':>9}"]
    bound = None
    for name, make in peers.items():
        try:
            ns = timer(make())
        except Exception as exc:  # report a broken or missing peer, keep measuring the rest
            lines.append(f"{group}: {name:<34} {'n/a':>9}  ({type(exc).__name__}: {exc})")
            continue
        bound = bound or ns
        lines.append(f"{group}: {name:<34} {ns:>9,.0f} {ns / bound:>8.2f}x")
    return lines


def main() -> None:
    print(
        f"tenuto {tenuto.__version__}, Python {sys.version.split()[0]}, warm hits, median of {REPEATS} x {CALLS}"
    )
    for line in measure("sync ", sync_peers(), time_sync):
        print(line)
    for line in measure("async", async_peers(), time_async):
        print(line)
    from tenuto.testing import RedisServer

    with RedisServer() as server:
        for line in measure("tiers", tier_peers(server.url), time_sync):
            print(line)


if __name__ == "__main__":
    main()
