"""The local tier (`Cache(url, local=N, local_ttl=...)`): hits served in process, other
processes' writes seen through Redis's pushed invalidations, bounded staleness when the
server cannot push, flushes on reconnect and fork."""

from __future__ import annotations

import multiprocessing
import statistics
import time

import pytest

import tenuto
from tenuto.testing import FakeClock, RedisServer


def test_reads_are_served_locally_and_own_writes_stay(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, local=100, local_ttl=30)
    cache.set("k", {"v": 1}, ttl=60)
    for _ in range(5):
        assert cache.get("k").value == {"v": 1}
    stats = cache.stats()
    assert stats["local_hits"] == 5, "this process's own write is not invalidated"
    assert stats["local_invalidation"] == "server"
    assert stats["local_size"] == 1


def test_another_writer_invalidates(redis_server, namespace) -> None:
    reader = tenuto.Cache(redis_server.url, namespace=namespace, local=100, local_ttl=60)
    writer = tenuto.Cache(redis_server.url, namespace=namespace, local=100, local_ttl=60)
    writer.set("k", 1, ttl=60)
    assert reader.get("k").value == 1
    assert reader.get("k").value == 1 and reader.stats()["local_hits"] >= 1
    writer.set("k", 2, ttl=60)
    deadline = time.monotonic() + 2
    while reader.get("k").value != 2:
        assert time.monotonic() < deadline, "the invalidation never arrived"
    writer.delete("k")
    deadline = time.monotonic() + 2
    while reader.get("k").state != "miss":
        assert time.monotonic() < deadline, "the delete never reached the other tier"
    assert reader.stats()["local_invalidated"] >= 2


def _writer(url: str, namespace: str, count: int) -> None:  # pragma: no cover
    cache = tenuto.Cache(url, namespace=namespace, local=10, local_ttl=60)
    for i in range(1, count + 1):
        cache.set("song", {"i": i, "at": time.time()}, ttl=60)
        time.sleep(0.01)  # pacing the writes, not synchronising: the reader only watches


def test_two_processes_see_each_others_writes_within_10ms_p99(redis_server, namespace) -> None:
    reader = tenuto.Cache(redis_server.url, namespace=namespace, local=100, local_ttl=60)
    ctx = multiprocessing.get_context("fork")
    count = 100
    proc = ctx.Process(target=_writer, args=(redis_server.url, namespace, count))
    proc.start()
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 30
    last = 0
    while last < count and time.monotonic() < deadline:
        value = reader.get("song").value
        if value and value["i"] != last:
            last = value["i"]
            seen[last] = time.time() - value["at"]
    proc.join(30)
    assert last == count, f"saw up to {last} of {count}"
    delays = sorted(seen.values())
    p99 = delays[int(len(delays) * 0.99) - 1]
    print(
        f"\nlocal tier propagation over {len(delays)} writes: median "
        f"{statistics.median(delays) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"
    )
    assert reader.stats()["local_hits"] > count, "reads between writes were local"
    # 10 ms on a quiet machine; the bound here leaves room for a loaded CI host.
    assert p99 < 0.05


def test_without_pushes_a_copy_lives_local_ttl_at_most(namespace) -> None:
    """A server that refuses CLIENT TRACKING (managed services, Dragonfly): one warning,
    a stats flag, and another process's write shows once local_ttl has passed."""
    clock = FakeClock(1_700_000_000)
    with RedisServer(extra_args=["--rename-command", "CLIENT", ""]) as server:
        reader = tenuto.Cache(server.url, namespace=namespace, local=10, local_ttl=5, clock=clock)
        writer = tenuto.Cache(server.url, namespace=namespace, clock=clock)
        writer.set("k", 1, ttl=600)
        assert reader.get("k").value == 1
        writer.set("k", 2, ttl=600)
        assert reader.get("k").value == 1, "no push: the copy stands"
        assert reader.stats()["local_invalidation"] == "ttl"
        clock.advance(4)
        assert reader.get("k").value == 1
        clock.advance(1)
        assert reader.get("k").value == 2, "never later than local_ttl"


def test_the_tier_is_flushed_when_redis_comes_back(own_redis, namespace) -> None:
    cache = tenuto.Cache(own_redis.url, namespace=namespace, local=10, local_ttl=600)
    cache.set("k", "before", ttl=600)
    assert cache.get("k").value == "before"
    flushes = cache.stats()["local_flushes"]
    own_redis.stop()
    assert cache.get("k").state in ("hit", "miss")  # served from memory or not: no error
    own_redis.start()
    deadline = time.monotonic() + 10
    while cache.stats()["degraded"] or cache.get("k").value is not None:
        # The restarted server is empty: once back, the flushed tier must not answer.
        assert time.monotonic() < deadline, cache.stats()
    assert cache.stats()["local_flushes"] > flushes


def _child_reads(url: str, namespace: str, cache, results) -> None:  # pragma: no cover
    results.put((cache.get("k").value, cache.stats()["local_hits"]))


def test_a_forked_child_starts_with_an_empty_tier(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, local=10, local_ttl=600)
    cache.set("k", "parent", ttl=600)
    assert cache.get("k").value == "parent"
    hits = cache.stats()["local_hits"]
    import redis as redis_py

    raw = redis_py.Redis.from_url(redis_server.url)
    # Changed behind the parent's back (no invalidation reaches a copy made here).
    raw.set(f"{namespace}:k", raw.get(f"{namespace}:k").replace(b"parent", b"other!"))
    raw.close()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(redis_server.url, namespace, cache, results))
    proc.start()
    value, child_hits = results.get(timeout=30)
    proc.join(30)
    assert value == "other!", "the child read Redis, not the parent's copy"
    assert child_hits == hits, "no local hit in the child"


def test_cached_functions_hit_the_local_tier(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, local=100, local_ttl=30)
    calls = []

    @cache.cached(ttl=60)
    def song(i: int) -> dict:
        calls.append(i)
        return {"id": i}

    assert song(1) == {"id": 1}
    before = cache.stats()["local_hits"]
    assert [song(1) for _ in range(10)] == [{"id": 1}] * 10
    assert calls == [1] and cache.stats()["local_hits"] == before + 10


def test_on_a_cluster_copies_live_local_ttl(redis_cluster, namespace) -> None:
    cache = tenuto.Cache(redis_cluster.url, namespace=namespace, local=10, local_ttl=5)
    cache.set("k", 1, ttl=60)
    assert cache.get("k").value == 1
    assert cache.stats()["local_invalidation"] == "ttl"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local": 0}, "local must be a number of entries"),
        ({"local": 10, "local_ttl": 0}, "local_ttl must be a positive"),
        ({"local": 10, "local_ttl": float("inf")}, "local_ttl must be a positive"),
        ({"local": 10, "local_ttl": "2d"}, "local_ttl must be between"),
    ],
)
def test_bad_local_options(redis_server, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        tenuto.Cache(redis_server.url, **kwargs)


def test_local_needs_a_redis_url() -> None:
    with pytest.raises(ValueError, match="a memory cache is one already"):
        tenuto.Cache(local=10)
