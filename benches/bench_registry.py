"""ID registry and default-value fallback, against the host apps' way and lower bounds.

- Bulk check of 1,000 IDs on Redis: tenuto `bulk_check_missing` next to one raw redis-py
  MGET of the same keys (the lower bound) and the per-ID loop the host app runs today.
- The same bulk check on the memory backend, and on a local 3+3 Redis Cluster next to
  redis-py's cluster client, with a single get there.
- `Defaults.complete_many` of 10,000 records next to a plain-Python implementation of the
  same rule.
Usage: python benches/bench_registry.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import tenuto
from tenuto.testing import RedisCluster, RedisServer

QUICK = "--quick" in sys.argv
REPEATS = 5 if QUICK else 15


def median_us(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return statistics.median(samples)


def row(group: str, name: str, us: float, bound: float) -> None:
    print(f"{group:<28} {name:<40} {us:>10,.1f} µs {us / bound:>7.2f}x")


def registry_rows(url: str) -> None:
    import redis as redis_py

    ids = [f"sp{i:06d}" for i in range(1000)]
    cache = tenuto.Cache(url, namespace="bench", fail_open=False)
    registry = tenuto.IdRegistry(cache)
    registry.bulk_mark_missing(ids[::3])
    raw = redis_py.Redis.from_url(url)
    keys = [f"bench:reccobeat:missing:{i}" for i in ids]

    mget = median_us(lambda: raw.mget(keys))
    row("redis bulk check, 1,000 IDs", "redis-py MGET (lower bound)", mget, mget)
    row(
        "redis bulk check, 1,000 IDs",
        "tenuto bulk_check_missing",
        median_us(lambda: registry.bulk_check_missing(ids)),
        mget,
    )
    row(
        "redis bulk check, 1,000 IDs",
        "per-ID GET loop (host app today)",
        median_us(lambda: [raw.get(k) for k in keys], 3),
        mget,
    )
    raw.close()

    memory = tenuto.IdRegistry(tenuto.Cache(max_entries=100_000))
    memory.bulk_mark_missing(ids[::3])
    check = median_us(lambda: memory.bulk_check_missing(ids))
    row("memory bulk check, 1,000 IDs", "tenuto bulk_check_missing", check, check)


def cluster_rows(cluster: RedisCluster) -> None:
    """The same bulk check and a single get on a 3+3 cluster, next to redis-py's cluster
    client (which also splits MGET by slot) and to the standalone rows above."""
    from redis.cluster import RedisCluster as PyCluster

    ids = [f"sp{i:06d}" for i in range(1000)]
    cache = tenuto.Cache(cluster.url, namespace="bench", fail_open=False)
    registry = tenuto.IdRegistry(cache)
    registry.bulk_mark_missing(ids[::3])
    raw = PyCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    keys = [f"bench:reccobeat:missing:{i}" for i in ids]
    mget = median_us(lambda: raw.mget_nonatomic(keys))
    group = "cluster bulk check, 1,000 IDs"
    row(group, "redis-py cluster mget_nonatomic (peer)", mget, mget)
    row(
        group,
        "tenuto bulk_check_missing",
        median_us(lambda: registry.bulk_check_missing(ids)),
        mget,
    )
    cache.set("song:1", {"title": "Tenuto"}, ttl=600)
    raw.set("bench:raw", b'{"title": "Tenuto"}')
    get = median_us(lambda: raw.get("bench:raw"), 200)
    row("cluster get, one key", "redis-py cluster GET (peer)", get, get)
    row("cluster get, one key", "tenuto get", median_us(lambda: cache.get("song:1"), 200), get)
    raw.close()


def python_complete(existing: dict, fetched: dict, defaults: dict) -> dict:
    out = {}
    for source in (existing, fetched):
        for key, value in source.items():
            if key not in out and value is not None:
                out[key] = value
    for key, value in defaults.items():
        if out.get(key) is None:
            out[key] = value
    return out


def defaults_rows() -> None:
    defaults = dict(tenuto.AUDIO_FEATURE_DEFAULTS)
    existing = {f"t{i}": {"tempo": 90.0 + i % 60} if i % 4 else {} for i in range(10_000)}
    fetched = {
        f"t{i}": {"energy": (i % 10) / 10, "danceability": None, "key": i % 12}
        for i in range(10_000)
    }

    def plain() -> dict:
        return {
            i: python_complete(existing.get(i, {}), fetched.get(i, {}), defaults) for i in existing
        }

    native = tenuto.Defaults(defaults)
    checked = tenuto.Defaults(defaults, tenuto.AUDIO_FEATURE_RANGES)
    assert native.complete_many(existing, fetched) == plain()
    base = median_us(plain)
    row("complete 10,000 records", "plain Python (same rule)", base, base)
    row(
        "complete 10,000 records",
        "tenuto Defaults.complete_many",
        median_us(lambda: native.complete_many(existing, fetched)),
        base,
    )
    row(
        "complete 10,000 records",
        "  with AUDIO_FEATURE_RANGES checks",
        median_us(lambda: checked.complete_many(existing, fetched)),
        base,
    )


def main() -> None:
    print(
        f"tenuto {tenuto.__version__}, Python {sys.version.split()[0]}; median of {REPEATS}; ratio to the group's first row"
    )
    with RedisServer() as server:
        registry_rows(server.url)
    with RedisCluster() as cluster:
        cluster_rows(cluster)
    defaults_rows()


if __name__ == "__main__":
    main()
