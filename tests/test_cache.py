"""One behaviour suite for the envelope cache, run on memory and on a real Redis."""

from __future__ import annotations

import asyncio
import datetime

import pytest

import tenuto


def test_hit_then_stale_then_miss(cache: tenuto.Cache, clock) -> None:
    env = cache.set("song:1", {"title": "Tenuto", "bpm": 92.5}, ttl=300, stale_ttl=3600)
    start = int(clock.now())
    assert (env.fetched_at, env.fresh_until, env.stale_until) == (start, start + 300, start + 3600)
    assert all(type(v) is int for v in (env.fetched_at, env.fresh_until, env.stale_until))

    hit = cache.get("song:1")
    assert hit.state == "hit" and hit.hit and bool(hit)
    assert hit.value == {"title": "Tenuto", "bpm": 92.5}
    assert hit.envelope == env

    clock.advance(300)  # fresh_until is inclusive
    assert cache.get("song:1").state == "hit"
    clock.advance(1)
    stale = cache.get("song:1")
    assert stale.state == "stale" and not stale.hit and bool(stale)
    assert stale.value == {"title": "Tenuto", "bpm": 92.5}

    clock.set(start + 3600)  # stale_until is inclusive too
    assert cache.get("song:1").state == "stale"
    clock.advance(1)
    miss = cache.get("song:1")
    assert miss.state == "miss" and miss.value is None and miss.envelope is None and not miss


def test_default_has_no_stale_window(cache: tenuto.Cache, clock) -> None:
    env = cache.set("k", 1, ttl=60)
    assert env.stale_until == env.fresh_until
    clock.advance(61)
    assert cache.get("k").state == "miss"


def test_missing_key_is_a_miss(cache: tenuto.Cache) -> None:
    assert cache.get("nothing-here").state == "miss"


def test_overwrite_replaces_value_and_times(cache: tenuto.Cache, clock) -> None:
    cache.set("k", "old", ttl=10)
    clock.advance(5)
    env = cache.set("k", "new", ttl=100)
    assert env.fetched_at == int(clock.now())
    assert cache.get("k").value == "new"


def test_values_round_trip(cache: tenuto.Cache) -> None:
    value = {
        "ids": ["4uLU6hMCjMI75M1A2tKUQC", "é", "😀"],
        "features": {"tempo": 120.0, "key": 0, "mode": True, "missing": None},
        "nested": [[1, 2], {"a": [{"b": -1.5e-7}]}],
        "big": 2**62,
    }
    cache.set("v", value, ttl=10)
    assert cache.get("v").value == value


def test_get_many_and_set_many(cache: tenuto.Cache, clock) -> None:
    envelopes = cache.set_many({"a": 1, "b": [2], "c": {"x": 3}}, ttl=10, stale_ttl=20)
    assert set(envelopes) == {"a", "b", "c"}
    assert envelopes["b"].payload == [2]
    found = cache.get_many(["a", "b", "zzz", "c"])
    assert list(found) == ["a", "b", "zzz", "c"]
    assert {k: v.value for k, v in found.items()} == {"a": 1, "b": [2], "zzz": None, "c": {"x": 3}}
    assert [v.state for v in found.values()] == ["hit", "hit", "miss", "hit"]
    clock.advance(15)
    assert {v.state for v in cache.get_many(["a", "b", "c"]).values()} == {"stale"}
    assert cache.get_many([]) == {}


def test_delete_and_clear(
    cache: tenuto.Cache, backend: str, clock, namespace: str, request
) -> None:
    cache.set("a", 1, ttl=10)
    cache.set("b", 2, ttl=10)
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert cache.get("a").state == "miss"

    url = None if backend == "memory" else request.getfixturevalue("redis_server").url
    neighbour = tenuto.Cache(url, namespace=namespace + "x", jitter=0.0, clock=clock)
    neighbour.set("b", "theirs", ttl=10)
    cache.clear()
    assert cache.get("b").state == "miss"
    assert neighbour.get("b").value == "theirs", "clear() touches this namespace only"


def test_stats_count_what_happened(cache: tenuto.Cache, clock) -> None:
    cache.set("a", 1, ttl=10, stale_ttl=20)
    cache.get("a")
    cache.get("nope")
    clock.advance(11)
    cache.get("a")
    cache.delete("a")
    stats = cache.stats()
    assert isinstance(stats, dict)
    assert (stats["hits"], stats["misses"], stats["stale_hits"]) == (1, 1, 1)
    assert (stats["sets"], stats["deletes"], stats["errors"]) == (1, 1, 0)
    assert stats["hit_rate"] == pytest.approx(1 / 3)
    assert stats["degraded"] is False
    assert stats["backend"] == cache.backend


async def test_async_twins(cache: tenuto.Cache, clock) -> None:
    env = await cache.aset("a", {"x": 1}, ttl=10, stale_ttl=20)
    assert env.payload == {"x": 1}
    hit = await cache.aget("a")
    assert (hit.state, hit.value) == ("hit", {"x": 1})
    await cache.aset_many({"b": 2, "c": 3}, ttl=10)
    found = await cache.aget_many(["a", "b", "c", "d"])
    assert {k: v.value for k, v in found.items()} == {"a": {"x": 1}, "b": 2, "c": 3, "d": None}
    clock.advance(11)
    assert (await cache.aget("a")).state == "stale"
    assert await cache.adelete("b") is True
    assert (await cache.aget("b")).state == "miss"
    assert await cache.aclear() is None
    assert (await cache.aget("c")).state == "miss"


async def test_many_concurrent_async_calls(cache: tenuto.Cache) -> None:
    await asyncio.gather(*(cache.aset(f"k{i}", i, ttl=10) for i in range(200)))
    lookups = await asyncio.gather(*(cache.aget(f"k{i}") for i in range(200)))
    assert [lk.value for lk in lookups] == list(range(200))


def test_memory_async_hit_needs_no_loop() -> None:
    """A memory hit is an already-completed awaitable: it can be driven without a loop."""
    cache = tenuto.Cache(jitter=0.0)
    cache.set("k", "v", ttl=10)
    awaitable = cache.aget("k")
    with pytest.raises(StopIteration) as done:
        next(awaitable.__await__())
    assert done.value.value.value == "v"


def test_memory_keeps_json_values_as_they_are_and_objects_only_when_asked() -> None:
    cache = tenuto.Cache()
    value = {"a": [1, 2.5, None]}
    cache.set("v", value, ttl=10)
    assert cache.get("v").value is value, "a plain JSON value is kept, not copied"
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        cache.set("o", object(), ttl=10)
    objects = tenuto.Cache(serializer="object")
    obj = object()
    objects.set("o", obj, ttl=10)
    assert objects.get("o").value is obj
    with pytest.raises(ValueError, match="memory only"):
        tenuto.Cache("redis://127.0.0.1:1", serializer="object")


def test_memory_is_bounded_and_counts_evictions() -> None:
    cache = tenuto.Cache(max_entries=50)
    for i in range(500):
        cache.set(f"k{i}", i, ttl=100)
    stats = cache.stats()
    assert stats["size"] <= 50
    assert stats["evictions"] == 450
    assert cache.get("k499").value == 499, "the newest entry is kept"


def test_jitter_spreads_ttls_within_bounds(clock) -> None:
    cache = tenuto.Cache(jitter=0.1, clock=clock)
    now = int(clock.now())
    fresh = {cache.set(f"k{i}", i, ttl=1000, stale_ttl=5000).fresh_until - now for i in range(300)}
    assert min(fresh) >= 900 and max(fresh) <= 1100
    assert len(fresh) > 20, "ttls are spread, not identical"
    for i in range(300):
        env = cache.get(f"k{i}").envelope
        assert env.stale_until > env.fresh_until


def test_envelope_and_lookup_types() -> None:
    env = tenuto.Envelope({"a": 1}, 10, 20, 30)
    assert env.to_dict() == {
        "payload": {"a": 1},
        "fetched_at": 10,
        "fresh_until": 20,
        "stale_until": 30,
    }
    assert [env.state(t) for t in (20, 21, 30, 31)] == ["hit", "stale", "stale", "miss"]
    with pytest.raises(ValueError, match="fetched_at <= fresh_until"):
        tenuto.Envelope(None, 10, 5, 30)
    assert "Envelope(payload={'a': 1}" in repr(env)


def test_from_env(monkeypatch, redis_server) -> None:
    monkeypatch.delenv("TENUTO_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert tenuto.Cache.from_env().backend == "memory"
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    from_redis = tenuto.Cache.from_env(namespace="envtest")
    assert (from_redis.backend, from_redis.namespace) == ("redis", "envtest")
    monkeypatch.setenv("TENUTO_URL", "memory://")
    assert tenuto.Cache.from_env().backend == "memory", "TENUTO_URL wins over REDIS_URL"
    with pytest.raises(TypeError, match="from the environment"):
        tenuto.Cache.from_env(url="memory://")


def test_valkey_scheme_and_password_redaction(redis_server) -> None:
    cache = tenuto.Cache(
        f"valkey://127.0.0.1:{redis_server.port}/0", namespace="vk", fail_open=False
    )
    cache.set("k", 1, ttl=10)
    assert cache.get("k").value == 1
    secret = tenuto.Cache("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in secret.url and "hunter2" not in repr(secret)


class TestBadInput:
    def test_unknown_scheme(self) -> None:
        with pytest.raises(ValueError, match="unsupported cache URL"):
            tenuto.Cache("memcached://localhost")
        with pytest.raises(ValueError, match="unsupported cache URL"):
            tenuto.Cache("localhost:6379")

    def test_bad_redis_url(self) -> None:
        with pytest.raises(ValueError, match="invalid Redis URL"):
            tenuto.Cache("redis://:pw@[::1")

    @pytest.mark.parametrize("db", ["99999999999", "-1"])
    def test_database_index_out_of_range(self, db: str) -> None:
        with pytest.raises(ValueError, match="database index .* is out of range"):
            tenuto.Cache(f"redis://127.0.0.1:1/{db}")

    @pytest.mark.parametrize("ttl", [0, -1, -0.5, float("nan"), float("inf")])
    def test_non_positive_ttl(self, cache: tenuto.Cache, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl"):
            cache.set("k", 1, ttl=ttl)

    @pytest.mark.parametrize("ttl", [None, True, [1]])
    def test_non_numeric_ttl(self, cache: tenuto.Cache, ttl) -> None:
        with pytest.raises(TypeError, match="ttl"):
            cache.set("k", 1, ttl=ttl)

    @pytest.mark.parametrize("ttl", ["60", "5x", "minutes", "-5m", "0s"])
    def test_bad_duration_text(self, cache: tenuto.Cache, ttl) -> None:
        with pytest.raises(ValueError, match="ttl"):
            cache.set("k", 1, ttl=ttl)

    def test_stale_shorter_than_fresh(self, cache: tenuto.Cache) -> None:
        with pytest.raises(ValueError, match="stale_ttl"):
            cache.set("k", 1, ttl=60, stale_ttl=30)

    @pytest.mark.parametrize("key", [1, b"k", None, ("a",)])
    def test_non_str_key(self, cache: tenuto.Cache, key) -> None:
        with pytest.raises(TypeError, match="keys must be str"):
            cache.get(key)
        with pytest.raises(TypeError, match="keys must be str"):
            cache.set(key, 1, ttl=1)

    def test_get_many_needs_an_iterable_of_str(self, cache: tenuto.Cache) -> None:
        with pytest.raises(TypeError):
            cache.get_many("abc")
        with pytest.raises(TypeError, match="keys must be str"):
            cache.get_many(["a", 1])

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"namespace": ""}, "namespace"),
            ({"max_entries": 0}, "max_entries"),
            ({"jitter": 1.5}, "jitter"),
            ({"jitter": -0.1}, "jitter"),
            ({"serializer": "yaml"}, "serializer"),
            ({"max_value_bytes": 0}, "max_value_bytes"),
        ],
    )
    def test_bad_options(self, kwargs, match) -> None:
        with pytest.raises(ValueError, match=match):
            tenuto.Cache(**kwargs)

    def test_bad_clock(self) -> None:
        with pytest.raises(TypeError, match="clock"):
            tenuto.Cache(clock=42)


def test_callable_clock() -> None:
    now = [1_000.0]
    cache = tenuto.Cache(jitter=0.0, clock=lambda: now[0])
    assert cache.set("k", 1, ttl=10).fresh_until == 1010
    now[0] = 1011.0
    assert cache.get("k").state == "miss"


class TestFamiliarDurations:
    """TTLs as the host apps and other caches write them: seconds, timedeltas, "90d"."""

    @pytest.mark.parametrize(
        ("ttl", "seconds"),
        [
            ("90s", 90),
            ("15m", 900),
            ("2h", 7200),
            ("90d", 90 * 86400),
            ("1.5h", 5400),
            (datetime.timedelta(days=180), 180 * 86400),
            (datetime.timedelta(minutes=5), 300),
            (300, 300),
        ],
    )
    def test_units(self, cache: tenuto.Cache, ttl, seconds: int) -> None:
        envelope = cache.set("k", 1, ttl=ttl, stale_ttl=ttl)
        assert envelope.fresh_until - envelope.fetched_at == seconds

    def test_default_ttl_and_a_bare_decorator(self, clock) -> None:
        cache = tenuto.Cache(jitter=0.0, clock=clock, default_ttl="5m")
        calls = []

        @cache.cached
        def song(i: int) -> dict:
            calls.append(i)
            return {"id": i}

        assert song(1) == song(1) == {"id": 1} and calls == [1]
        clock.advance(301)
        assert song(1) == {"id": 1} and calls == [1, 1], "expired after default_ttl"
        envelope = cache.set("k", 1)
        assert envelope.fresh_until - envelope.fetched_at == 300

    def test_no_ttl_anywhere(self) -> None:
        cache = tenuto.Cache()
        with pytest.raises(TypeError, match="default_ttl"):
            cache.set("k", 1)
        with pytest.raises(TypeError, match="needs ttl="):

            @cache.cached
            def song() -> int:
                return 1

    @pytest.mark.parametrize("name", ["timeout", "expire"])
    def test_other_caches_names_for_ttl(self, name: str) -> None:
        with pytest.raises(TypeError, match="tenuto's is ttl="):
            tenuto.Cache().cached(**{name: 60})

    def test_unknown_keyword(self) -> None:
        with pytest.raises(TypeError, match='unexpected keyword argument "colour"'):
            tenuto.Cache().cached(ttl=60, colour="red")
