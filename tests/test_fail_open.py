"""Redis down at start, or lost mid-run: the cache keeps serving from memory, never raises,
counts and logs the outage once, and goes back to Redis by itself."""

from __future__ import annotations

import logging
import time

import pytest

import tenuto
from tenuto.testing import free_port

RECOVERY_DEADLINE = 20.0


def wait_until(condition, deadline: float = RECOVERY_DEADLINE) -> bool:
    """Polls a condition the code under test makes true on its own (a reconnect)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_dead_port_serves_from_memory_and_never_raises(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="tenuto")
    cache = tenuto.Cache(dead_url(), namespace="dead", jitter=0.0)
    assert cache.get("k").state == "miss"
    cache.set("k", {"v": 1}, ttl=10)
    assert cache.get("k").value == {"v": 1}
    assert cache.get_many(["k", "x"])["k"].value == {"v": 1}
    cache.set_many({"a": 1}, ttl=10)
    assert cache.delete("a") is True
    cache.clear()
    stats = cache.stats()
    assert stats["backend"] == "redis" and stats["degraded"] is True
    assert stats["outages"] == 1 and stats["backend_errors"] >= 6
    outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_logs) == 1, "one log line per outage, not per call"
    assert outage_logs[0].name.startswith("tenuto")


async def test_dead_port_async_twins_never_raise() -> None:
    cache = tenuto.Cache(dead_url(), namespace="dead", jitter=0.0)
    assert (await cache.aget("k")).state == "miss"
    await cache.aset("k", 1, ttl=10)
    assert (await cache.aget("k")).value == 1
    assert (await cache.aget_many(["k"]))["k"].value == 1
    assert await cache.adelete("k") is True
    await cache.aclear()


def test_dead_port_answers_fast() -> None:
    cache = tenuto.Cache(dead_url(), namespace="dead", connect_timeout=0.25)
    cache.get("warm-up")  # the first call discovers the outage
    start = time.perf_counter()
    for _ in range(100):
        cache.get("k")
    # Generous bound: 100 calls that each waited for a connect would take >= 25 s.
    assert time.perf_counter() - start < 5.0


def test_fail_open_false_raises_backend_unavailable() -> None:
    cache = tenuto.Cache(dead_url(), namespace="dead", fail_open=False)
    with pytest.raises(tenuto.BackendUnavailable):
        cache.get("k")
    with pytest.raises(tenuto.BackendUnavailable):
        cache.set("k", 1, ttl=10)
    assert issubclass(tenuto.BackendUnavailable, tenuto.TenutoError)


async def test_fail_open_false_raises_in_async_too() -> None:
    cache = tenuto.Cache(dead_url(), namespace="dead", fail_open=False)
    with pytest.raises(tenuto.BackendUnavailable):
        await cache.aget("k")


def test_redis_killed_and_restarted_mid_run(own_redis, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tenuto")
    cache = tenuto.Cache(own_redis.url, namespace="restart", jitter=0.0, command_timeout=0.5)
    cache.set("before", "in redis", ttl=60)
    assert cache.get("before").value == "in redis"
    assert cache.stats()["degraded"] is False

    own_redis.stop()
    # Every call keeps answering while Redis is gone.
    assert cache.get("before").state == "miss"
    cache.set("during", "in memory", ttl=60)
    assert cache.get("during").value == "in memory"
    assert cache.stats()["degraded"] is True

    own_redis.start()  # same port, empty data set
    assert wait_until(lambda: not cache.stats()["degraded"]), "did not return to Redis"
    cache.set("after", "in redis again", ttl=60)
    assert cache.get("after").value == "in redis again"
    import redis as redis_py

    raw = redis_py.Redis.from_url(own_redis.url)
    assert raw.exists("restart:after") == 1
    raw.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert any("is back" in m for m in messages)


async def test_redis_killed_mid_run_async(own_redis) -> None:
    cache = tenuto.Cache(own_redis.url, namespace="restart", jitter=0.0, command_timeout=0.5)
    await cache.aset("k", 1, ttl=60)
    own_redis.stop()
    assert (await cache.aget("k")).state == "miss"
    await cache.aset("k", 2, ttl=60)
    assert (await cache.aget("k")).value == 2


def test_an_allkeys_eviction_policy_is_flagged(own_redis, caplog) -> None:
    import logging
    import time

    redis = pytest.importorskip("redis")
    raw = redis.Redis.from_url(own_redis.url)
    raw.config_set("maxmemory-policy", "allkeys-lru")
    cache = tenuto.Cache(own_redis.url, namespace="policy")
    with caplog.at_level(logging.WARNING, logger="tenuto"):
        cache.get("k")
        deadline = time.monotonic() + 5
        while cache.stats()["maxmemory_policy"] is None:
            assert time.monotonic() < deadline, "policy never read"
            time.sleep(0.005)
    stats = cache.stats()
    assert stats["maxmemory_policy"] == "allkeys-lru" and stats["evicts_tenuto_state"]
    assert any("allkeys-lru" in r.getMessage() for r in caplog.records)
    raw.close()


@pytest.fixture
def full_redis(own_redis):
    """A server at `maxmemory` with `noeviction`: it answers reads and refuses writes."""
    redis = pytest.importorskip("redis")
    raw = redis.Redis.from_url(own_redis.url)
    raw.config_set("maxmemory", "1mb")
    raw.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
        for i in range(1000):  # fill it until it refuses writes
            raw.set(f"fill{i}", "x" * 10_000)
    yield own_redis, raw
    raw.close()


def test_a_shared_breaker_opens_when_redis_refuses_writes(full_redis) -> None:
    own_redis, raw = full_redis
    breaker = tenuto.CircuitBreaker(failures=2, reset_after=30, url=own_redis.url, name="full")
    calls = []

    def upstream() -> None:
        calls.append(1)
        raise ConnectionError("503")

    for _ in range(10):
        with pytest.raises((ConnectionError, tenuto.CircuitOpen)):
            breaker.call(upstream)
    assert len(calls) == 2 and breaker.state == "open"


def test_writes_a_full_redis_refuses_are_read_back_from_memory(full_redis, caplog) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="tenuto")
    own_redis, raw = full_redis
    cache = tenuto.Cache(own_redis.url, namespace="full")
    calls = []

    @cache.cached(ttl=60)
    def song(x: int) -> int:
        calls.append(x)
        return x

    cache.set("k", "v", ttl=60)
    assert cache.get("k").value == "v"
    assert [song(1) for _ in range(20)] == [1] * 20 and calls == [1], "one upstream call"
    assert [song(i) for i in range(2, 22)] == list(range(2, 22))
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, "one warning per condition, not one per call"
    registry = tenuto.IdRegistry(cache)
    registry.mark_validated("s", "d")
    assert registry.get("s") == "d"
    stats = cache.stats()
    assert stats["degraded_writes"] and stats["refused_writes"] >= 2
