"""One behaviour on every backend: what a memory hit returns is what a round trip through
Redis returns. Untyped values follow JSON rules; typed cached functions (a return
annotation, or `type=`) come back as their type through pydantic on both backends."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import random
import uuid

import pytest

import tenuto

pydantic = pytest.importorskip("pydantic")


def round_trip(cache: tenuto.Cache, value: object) -> object:
    cache.set("v", value, ttl=60)
    return cache.get("v").value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ((1, "a", (2, 3)), [1, "a", [2, 3]]),
        (
            {1: "a", 2.5: "b", False: "c", None: "d"},
            {"1": "a", "2.5": "b", "false": "c", "null": "d"},
        ),
        ({"nested": [{"t": (1,)}]}, {"nested": [{"t": [1]}]}),
        (2**64 + 1, 2**64 + 1),
        (-(2**200), -(2**200)),
        (1e-310, 1e-310),
        (-0.0, -0.0),
        ("é😀\u0000", "é😀\u0000"),
    ],
)
def test_untyped_values_follow_json_rules_on_both(cache: tenuto.Cache, value, expected) -> None:
    got = round_trip(cache, value)
    assert got == expected and type(got) is type(expected)
    if isinstance(expected, float):
        assert repr(got) == repr(expected)


def test_big_ints_and_floats_round_trip_exactly(cache: tenuto.Cache) -> None:
    rng = random.Random(7)
    floats = [rng.random() for _ in range(2000)] + [rng.uniform(-1e300, 1e300) for _ in range(200)]
    ints = [2**64 + 1, 2**63, -(2**63) - 1, 10**40, 7]
    got = round_trip(cache, {"f": floats, "i": ints})
    assert got["i"] == ints and all(type(i) is int for i in got["i"])
    off = [a for a, b in zip(floats, got["f"]) if a.hex() != b.hex()]
    assert off == [], f"{len(off)} floats changed"


@pytest.mark.parametrize(
    "value",
    [{1, 2}, dt.datetime(2024, 1, 1), uuid.uuid4(), decimal.Decimal("1.5"), object(), b"raw"],
    ids=["set", "datetime", "uuid", "decimal", "object", "bytes"],
)
def test_unencodable_values_raise_the_same_type_error_on_both(cache: tenuto.Cache, value) -> None:
    cache.set("v", "old", ttl=60)
    with pytest.raises(TypeError, match=type(value).__name__):
        cache.set("v", value, ttl=60)
    assert cache.get("v").value == "old", "a refused value leaves the stored one intact"


def test_nan_is_refused_on_both(cache: tenuto.Cache) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        cache.set("v", float("nan"), ttl=60)


class Track(pydantic.BaseModel):
    id: str
    released: dt.date
    energy: float
    tags: tuple[str, ...]


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_typed_functions_return_their_type_on_both(cache: tenuto.Cache, clock) -> None:
    calls = []

    @cache.cached(ttl=60)
    def track(i: int) -> Track:
        calls.append(i)
        return Track(id=f"t{i}", released=dt.date(2020, 1, i), energy=0.1 * i, tags=("a", "b"))

    @cache.cached(ttl=60)
    def when(i: int) -> dt.datetime:
        return dt.datetime(2024, 5, i, tzinfo=dt.timezone.utc)

    @cache.cached(ttl=60)
    def things(i: int) -> tuple[set[int], uuid.UUID, decimal.Decimal, Point]:
        return {i, i + 1}, uuid.UUID(int=i), decimal.Decimal("1.10"), Point(i, -i)

    for _ in range(2):  # the miss's value, then the hit's
        got = track(3)
        assert got == Track(id="t3", released=dt.date(2020, 1, 3), energy=0.1 * 3, tags=("a", "b"))
        assert when(2) == dt.datetime(2024, 5, 2, tzinfo=dt.timezone.utc)
        assert things(4) == ({4, 5}, uuid.UUID(int=4), decimal.Decimal("1.10"), Point(4, -4))
    assert calls == [3]


def test_typed_values_stay_readable_json_for_other_processes(
    redis_server, raw_redis, namespace
) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, jitter=0.0)

    @cache.cached(ttl=60)
    def track(i: int) -> Track:
        return Track(id=f"t{i}", released=dt.date(2020, 1, 1), energy=0.5, tags=("x",))

    track(1)
    import json

    stored = json.loads(raw_redis.get(cache.backend_key(track.key(1))))
    assert stored["payload"] == {"id": "t1", "released": "2020-01-01", "energy": 0.5, "tags": ["x"]}


def test_explicit_type_and_async_functions(cache: tenuto.Cache) -> None:
    import asyncio

    @cache.cached(ttl=60, type=dt.date)
    async def day(i: int):  # no annotation: type= decides
        return dt.date(2021, 1, i)

    async def main() -> None:
        assert await day(5) == dt.date(2021, 1, 5)
        assert await day(5) == dt.date(2021, 1, 5)

    asyncio.run(main())


def test_memory_hits_share_the_stored_object_unless_isolated() -> None:
    cache = tenuto.Cache()

    @cache.cached(ttl=60)
    def shared(i: int) -> dict:
        return {"items": [i]}

    @cache.cached(ttl=60, isolated=True)
    def isolated(i: int) -> dict:
        return {"items": [i]}

    assert shared(1) is shared(1), "like functools.lru_cache, hits return the stored object"
    first = isolated(1)
    first["items"].append("mutated")
    assert isolated(1) == {"items": [1]}, "isolated=True hands out a fresh copy per hit"


@pytest.mark.parametrize("name", ["lock_ttl", "wait_timeout"])
@pytest.mark.parametrize("seconds", [1e300, float("inf"), -1.0, 0.0])
def test_extreme_durations_are_value_errors(name: str, seconds: float) -> None:
    cache = tenuto.Cache()
    with pytest.raises(ValueError, match=name):
        cache.cached(ttl=60, **{name: seconds})(lambda x: x)


@pytest.mark.parametrize("name", ["connect_timeout", "command_timeout"])
def test_extreme_timeouts_are_value_errors(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        tenuto.Cache("redis://127.0.0.1:1", **{name: 1e300})


@pytest.mark.parametrize("ttl", [2**63, 1e300])
def test_huge_ttls_are_value_errors(cache: tenuto.Cache, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        cache.set("k", 1, ttl=ttl)


def test_generators_are_refused_at_decoration() -> None:
    cache = tenuto.Cache()

    def tracks():
        yield 1

    async def atracks():
        yield 1

    for fn in (tracks, atracks):
        with pytest.raises(TypeError, match="return a list"):
            cache.cached(ttl=60)(fn)


def test_user_keys_cannot_name_a_cached_calls_lock(redis_server, raw_redis, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)

    @cache.cached(ttl=60, wait_timeout=5)
    def song(x: int) -> int:
        return x

    cache.set("lock:" + song.key(1), "not a lock", ttl=60)
    cache.set("waiters:" + song.key(1), "not a count", ttl=60)
    assert song(1) == 1 and cache.stats()["backend_errors"] == 0
    with pytest.raises(ValueError, match=r"\|"):
        tenuto.Cache(namespace="a|b")


def test_huge_backoff_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Backoff.max"):
        tenuto.Backoff(base=1, max=1.8e19)


def test_values_the_store_dropped_are_freed() -> None:
    """The per-function memo behind fast hits must not keep values alive."""
    import weakref

    cache = tenuto.Cache(serializer="object", max_entries=2)

    class Blob:
        pass

    @cache.cached(ttl=60)
    def blob(i: int) -> Blob:
        return Blob()

    refs = [weakref.ref(blob(i)) for i in range(2)]
    assert blob(0) is refs[0]() and blob(1) is refs[1](), "hits remembered by the memo"
    blob.invalidate(0)
    for i in range(2, 6):
        blob(i)  # pushes key 1 out of the store
    # No gc.collect(): the values are in no cycle, so refcounting frees them at once.
    assert refs[0]() is None and refs[1]() is None


@pytest.mark.parametrize("value", [2**70, -(2**70), 2**63])
def test_huge_integers_are_value_errors_naming_the_argument(value: int) -> None:
    if value > 0:
        assert tenuto.Cache(max_entries=value).get("k").state == "miss"  # a bound, not a size
    else:
        with pytest.raises(ValueError, match="max_entries"):
            tenuto.Cache(max_entries=value)
    with pytest.raises(ValueError, match="status"):
        tenuto.RateLimiter("5/minute").feedback(value)


def test_clearing_any_namespace_leaves_limiter_state_alone(redis_server, namespace) -> None:
    limiter = tenuto.RateLimiter("2/minute", url=redis_server.url, name=namespace, mode="inbound")
    assert limiter.try_acquire()[0] and limiter.try_acquire()[0]
    tenuto.Cache(redis_server.url, namespace="tenuto").clear()
    assert not limiter.try_acquire()[0], "the limit still remembers its two admissions"
