"""The boundary of a cached call on Redis: commands per hit and per miss, awaitables that
bind to the loop when awaited, cancellation that releases the lock at once, and processes
that learn of another's write without polling."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import tenuto
from tenuto.testing import companion_key


def command_calls(raw) -> dict[str, int]:
    """Calls per command since the last reset (`INFO commandstats`; commands that scripts
    run are listed too, under their own names)."""
    stats = raw.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): fields["calls"]
        for name, fields in stats.items()
        if name not in ("cmdstat_info", "cmdstat_config|resetstat")
    }


def round_trips_during(raw, action) -> list[str]:
    """The commands clients sent while `action` ran, in order (scripts' inner commands
    left out), read from MONITOR."""
    marker = f"end-{time.monotonic_ns()}"
    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with raw.monitor() as monitor:
            ready.set()
            for event in monitor.listen():
                command = event["command"]
                if marker in command:
                    return
                if event.get("client_type") != "lua":
                    seen.append(command.split()[0].upper())

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert ready.wait(5)
    raw.ping()  # MONITOR is on once a later command shows up in it
    action()
    raw.echo(marker)
    watcher.join(10)
    # The test's own connection handshakes and probes are not tenuto's.
    return [c for c in seen if c not in ("PING", "HELLO", "CLIENT", "ECHO")]


@pytest.fixture
def raw_own(own_redis):
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(own_redis.url)
    yield client
    client.close()


@pytest.mark.parametrize("negative", [None, tenuto.Backoff(base=60, max=600)])
def test_hit_is_one_command_and_cold_miss_two(own_redis, raw_own, negative) -> None:
    cache = tenuto.Cache(own_redis.url, namespace="n", jitter=0.0)
    calls = []

    @cache.cached(ttl=300, stale_ttl=3600, negative=negative)
    def lyrics(song: str) -> str | None:
        calls.append(song)
        return None if song.startswith("none") else f"la la {song}"

    lyrics("warm-up")  # loads the two scripts into the server once
    assert round_trips_during(raw_own, lambda: lyrics("a")) == ["EVALSHA", "EVALSHA"]
    assert round_trips_during(raw_own, lambda: lyrics("a")) == ["EVALSHA"]
    if negative is not None:
        assert round_trips_during(raw_own, lambda: lyrics("none-1")) == ["EVALSHA", "EVALSHA"]
        assert sorted(raw_own.keys("*")) == sorted(
            cache.backend_key(lyrics.key(s)).encode() for s in ("warm-up", "a", "none-1")
        ), "no second key for the negative streak, and no lock left behind"
    assert calls == ["warm-up", "a"] + (["none-1"] if negative else [])


def test_async_calls_bind_to_the_loop_when_awaited(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    cache.set("k", {"v": 1}, ttl=60)
    assert asyncio.run(cache.aget("k")).value == {"v": 1}
    assert asyncio.run(cache.aset("k", 2, ttl=60)).payload == 2
    pending = cache.aget("k")  # made outside any loop, awaited inside one

    async def later() -> object:
        return (await pending).value

    assert asyncio.run(later()) == 2


def test_a_cancelled_async_leader_releases_its_lock_at_once(redis_server, raw_redis, namespace):
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    started: list[asyncio.Event] = []  # made inside the loop (Python 3.9 binds at creation)

    @cache.cached(ttl=60, lock_ttl=30)
    async def slow(x: int) -> int:
        started[0].set()
        await asyncio.Event().wait()  # never answers
        return x

    lock_key = companion_key(f"{namespace}:{slow.key(1)}", "lock")

    async def main() -> float:
        started.append(asyncio.Event())
        task = asyncio.create_task(slow(1))
        await started[0].wait()
        assert raw_redis.exists(lock_key), "the leader holds the lock while it loads"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        while raw_redis.exists(lock_key):
            assert time.monotonic() - t0 < 2, "lock not released (lock_ttl is 30 s)"
            await asyncio.sleep(0.001)
        return time.monotonic() - t0

    asyncio.run(main())


def test_a_cancelled_redis_read_stops_its_rust_work(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)

    async def main() -> None:
        task = asyncio.create_task(cache.aget("k"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await cache.aget("k")).state == "miss", "the cache still works"

    asyncio.run(main())


def test_another_process_waits_for_the_write_without_polling(own_redis, raw_own) -> None:
    """Two caches on one Redis stand for two processes (each has its own flights)."""
    leader_cache = tenuto.Cache(own_redis.url, namespace="p")
    follower_cache = tenuto.Cache(own_redis.url, namespace="p")
    gate = threading.Event()
    calls = []

    def make(cache: tenuto.Cache):
        @cache.cached(ttl=60, name="recs")
        def recs(seed: str) -> dict:
            calls.append(seed)
            assert gate.wait(10)
            return {"seed": seed}

        return recs

    lead, follow = make(leader_cache), make(follower_cache)
    gate.set()
    lead("warm")  # both scripts loaded
    gate.clear()
    out: dict[str, object] = {}
    leader = threading.Thread(target=lambda: out.setdefault("leader", lead("s")))
    leader.start()
    while not raw_own.exists(companion_key(f"p:{lead.key('s')}", "lock")):
        time.sleep(0.001)
    raw_own.config_resetstat()
    follower = threading.Thread(target=lambda: out.setdefault("follower", follow("s")))
    follower.start()
    while not raw_own.exists(companion_key(f"p:{lead.key('s')}", "waiters")):
        time.sleep(0.001)
    gate.set()
    leader.join(10)
    follower.join(10)
    assert out == {"leader": {"seed": "s"}, "follower": {"seed": "s"}}
    assert calls == ["warm", "s"], "one upstream call for both processes"
    stats = command_calls(raw_own)
    assert stats.get("blpop") == 1, f"the follower blocked once, no polling: {stats}"
    assert "mget" not in stats, f"no polling loop: {stats}"


def test_a_forgotten_await_warns(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    with pytest.warns(RuntimeWarning, match="never awaited"):
        cache.aset("k", 1, ttl=60)  # no await: nothing is written
    assert cache.get("k").state == "miss"
