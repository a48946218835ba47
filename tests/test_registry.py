"""`tenuto.IdRegistry` on memory and Redis: formats, TTLs, order and duplicates, bulk
operations, resolve (batching, concurrency, partial failure, dedup across resolves)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

import tenuto


@pytest.fixture
def registry(cache: tenuto.Cache) -> tenuto.IdRegistry:
    return tenuto.IdRegistry(cache, validated_ttl=180 * 86400, missing_ttl=14 * 86400)


def test_mark_and_read_both_directions(registry: tenuto.IdRegistry) -> None:
    registry.mark_validated("sp1", "rb1")
    assert registry.get("sp1") == "rb1"
    assert registry.reverse("rb1") == "sp1"
    assert registry.get("sp2") is None and registry.reverse("rb2") is None
    assert registry.is_missing("sp1") is False


def test_missing_marks_and_validation_clears_them(registry: tenuto.IdRegistry) -> None:
    registry.mark_missing("sp1", reason="404 from upstream")
    assert registry.is_missing("sp1") is True
    registry.mark_validated("sp1", "rb1")
    assert registry.is_missing("sp1") is False and registry.get("sp1") == "rb1"


def test_remapping_removes_the_superseded_halves(registry: tenuto.IdRegistry) -> None:
    """Re-mapping an ID leaves no stale record of the old pair, in either direction."""
    registry.mark_validated("s", "d1")
    registry.mark_validated("s", "d2")
    assert registry.reverse("d1") is None
    assert registry.get("s") == "d2" and registry.reverse("d2") == "s"
    # d2 taken over by another source: s no longer maps to it.
    registry.mark_validated("t", "d2")
    assert registry.get("s") is None
    assert registry.get("t") == "d2" and registry.reverse("d2") == "t"
    # A record reused by another pair meanwhile is not removed.
    registry.mark_validated("u", "d3")
    registry.mark_validated("v", "d4")
    registry.mark_validated("u", "d4")
    assert registry.reverse("d4") == "u" and registry.get("v") is None
    assert registry.reverse("d3") is None and registry.get("u") == "d4"


def test_forget(registry: tenuto.IdRegistry) -> None:
    registry.mark_validated("sp1", "rb1")
    registry.mark_missing("sp2")
    registry.forget("sp1")
    registry.forget("sp2")
    assert registry.get("sp1") is None and registry.reverse("rb1") is None
    assert registry.is_missing("sp2") is False


def test_ttls_expire_with_the_clock(clock) -> None:
    """On memory, expiry follows the cache clock; on Redis the key TTLs do it (checked
    with redis-py in test_records_in_the_host_format)."""
    registry = tenuto.IdRegistry(tenuto.Cache(clock=clock))
    registry.mark_validated("sp1", "rb1")
    registry.mark_missing("sp2")
    clock.advance(14 * 86400 + 1)
    assert registry.is_missing("sp2") is False, "missing marks last 14 days"
    assert registry.get("sp1") == "rb1"
    clock.advance(166 * 86400)
    assert registry.get("sp1") is None, "mappings last 180 days"


def test_bulk_check_keeps_order_and_duplicates(registry: tenuto.IdRegistry) -> None:
    registry.bulk_mark_missing(["b", "d"], reason="gone")
    to_check, known_missing = registry.bulk_check_missing(["a", "b", "c", "b", "d", "a"])
    assert to_check == ["a", "c", "a"]
    assert known_missing == ["b", "b", "d"]
    assert registry.bulk_check_missing([]) == ([], [])


def test_bulk_get_and_reverse(registry: tenuto.IdRegistry) -> None:
    registry.bulk_mark_validated({"s1": "r1", "s2": "r2"})
    registry.bulk_mark_validated([("s3", "r3")])
    assert registry.bulk_get(["s3", "s9", "s1"]) == {"s3": "r3", "s1": "r1"}
    assert registry.bulk_reverse(["r2", "r9"]) == {"r2": "s2"}


def test_bulk_of_twenty_thousand_ids(backend: str, request, namespace: str) -> None:
    """More than one chunk (10,000 keys) per bulk call."""
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    registry = tenuto.IdRegistry(tenuto.Cache(url, namespace=namespace, max_entries=100_000))
    pairs = {f"s{i}": f"r{i}" for i in range(20_000)}
    registry.bulk_mark_validated(pairs)
    ids = list(pairs) + ["unknown"]
    assert registry.bulk_get(ids) == pairs
    assert registry.bulk_check_missing(ids) == (ids, [])


def test_records_in_the_host_format(redis_server, raw_redis, clock, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, clock=clock, fail_open=False)
    registry = tenuto.IdRegistry(cache, name="reccobeat")
    registry.mark_validated("4uLU6hMCjMI75M1A2tKUQC", "rb-77")
    registry.mark_missing("0000", reason="not in catalogue")
    at = "2023-11-14T22:13:20+00:00"  # the fake clock's time, ISO-8601 UTC
    expected = {"spotify_id": "4uLU6hMCjMI75M1A2tKUQC", "reccobeat_id": "rb-77", "validated_at": at}
    assert (
        json.loads(raw_redis.get(f"{namespace}:reccobeat:validated:4uLU6hMCjMI75M1A2tKUQC"))
        == expected
    )
    assert json.loads(raw_redis.get(f"{namespace}:reccobeat:reverse:rb-77")) == expected
    missing = json.loads(raw_redis.get(f"{namespace}:reccobeat:missing:0000"))
    assert missing == {"spotify_id": "0000", "marked_at": at, "reason": "not in catalogue"}
    assert (
        180 * 86400 - 2
        <= raw_redis.ttl(f"{namespace}:reccobeat:validated:4uLU6hMCjMI75M1A2tKUQC")
        <= 180 * 86400
    )
    assert 14 * 86400 - 2 <= raw_redis.ttl(f"{namespace}:reccobeat:missing:0000") <= 14 * 86400


def test_field_names_follow_the_configuration(redis_server, raw_redis, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    registry = tenuto.IdRegistry(
        cache, name="lastfm", source_field="mbid", target_field="lastfm_url"
    )
    registry.mark_validated("m1", "https://last.fm/x")
    record = json.loads(raw_redis.get(f"{namespace}:lastfm:validated:m1"))
    assert record["mbid"] == "m1" and record["lastfm_url"] == "https://last.fm/x"


def test_host_app_records_are_read(redis_server, raw_redis, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    registry = tenuto.IdRegistry(cache)
    record = {"spotify_id": "s1", "reccobeat_id": "r1", "validated_at": "2025-01-01T00:00:00"}
    raw_redis.set(f"{namespace}:reccobeat:validated:s1", json.dumps(record))
    assert registry.get("s1") == "r1"


def test_corrupt_values_read_as_unknown_and_count(redis_server, raw_redis, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    registry = tenuto.IdRegistry(cache)
    raw_redis.set(f"{namespace}:reccobeat:validated:s1", "not json")
    raw_redis.set(f"{namespace}:reccobeat:missing:s2", "[1, 2]")
    raw_redis.set(f"{namespace}:reccobeat:validated:s3", json.dumps({"spotify_id": "s3"}))
    assert registry.get("s1") is None
    assert registry.bulk_check_missing(["s2"]) == (["s2"], [])
    assert registry.bulk_get(["s3"]) == {}
    assert registry.stats()["errors"] == 3


class TestBadInput:
    @pytest.mark.parametrize("bad", [1, None, b"s1", ("s",)])
    def test_non_str_ids(self, registry: tenuto.IdRegistry, bad) -> None:
        with pytest.raises(TypeError, match="IDs must be str"):
            registry.mark_validated(bad, "r1")
        with pytest.raises(TypeError, match="IDs must be str"):
            registry.bulk_get(["ok", bad])

    def test_empty_ids(self, registry: tenuto.IdRegistry) -> None:
        with pytest.raises(ValueError, match="must not be empty"):
            registry.mark_missing("")
        with pytest.raises(ValueError, match="must not be empty"):
            registry.bulk_mark_validated({"s1": "r1", "s2": ""})
        assert registry.get("s1") is None, "nothing was written before the error"

    def test_a_single_str_is_not_a_list_of_ids(self, registry: tenuto.IdRegistry) -> None:
        with pytest.raises(TypeError, match="not a single str"):
            registry.bulk_get("s1")

    def test_bad_configuration(self, cache: tenuto.Cache) -> None:
        with pytest.raises(ValueError):
            tenuto.IdRegistry(cache, name="")
        with pytest.raises(ValueError):
            tenuto.IdRegistry(cache, source_field="x", target_field="x")
        with pytest.raises(ValueError):
            tenuto.IdRegistry(cache, validated_ttl=0)

    def test_bad_resolve_arguments(self, registry: tenuto.IdRegistry) -> None:
        with pytest.raises(ValueError, match="batch_size"):
            registry.resolve(["a"], lambda b: {}, batch_size=0)
        with pytest.raises(TypeError, match="concurrency"):
            registry.resolve(["a"], lambda b: {}, concurrency="4")


class Fetcher:
    """A fake upstream: knows `known`, records its batches, can fail some of them."""

    def __init__(self, known: dict[str, str], fail_on: set[str] = frozenset()) -> None:
        self.known = known
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def __call__(self, batch: list[str]) -> dict[str, str]:
        with self.lock:
            self.batches.append(list(batch))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(0.01)  # stands in for the upstream's latency, so batches overlap
            if self.fail_on & set(batch):
                raise ConnectionError("upstream 503")
            return {s: self.known[s] for s in batch if s in self.known}
        finally:
            with self.lock:
                self.in_flight -= 1


def test_resolve_workflow(registry: tenuto.IdRegistry) -> None:
    registry.mark_validated("known", "r-known")
    registry.mark_missing("gone")
    ids = [f"s{i}" for i in range(230)] + ["known", "gone", "s1"]
    fetch = Fetcher({f"s{i}": f"r{i}" for i in range(0, 230, 2)})
    result = registry.resolve(ids, fetch, batch_size=50, concurrency=4)
    assert list(result) == [f"s{i}" for i in range(230)] + ["known", "gone"], "input order"
    assert result["known"] == "r-known" and result["gone"] is None
    assert result["s0"] == "r0" and result["s1"] is None
    assert sorted(len(b) for b in fetch.batches) == [30, 50, 50, 50, 50]
    assert all("known" not in b and "gone" not in b for b in fetch.batches)
    assert 1 < fetch.max_in_flight <= 4
    # Both outcomes were recorded: a second resolve fetches nothing.
    again = Fetcher({})
    assert registry.resolve(ids, again) == result and again.batches == []
    assert registry.is_missing("s1") and registry.get("s2") == "r2"


def test_failed_batch_records_nothing_and_reports_partial(registry: tenuto.IdRegistry) -> None:
    ids = [f"s{i}" for i in range(10)]
    fetch = Fetcher({i: i.upper() for i in ids}, fail_on={"s7"})
    with pytest.raises(tenuto.ResolveError) as raised:
        registry.resolve(ids, fetch, batch_size=5, concurrency=2)
    err = raised.value
    assert err.partial == {f"s{i}": f"S{i}" for i in range(5)}
    assert err.failed == [f"s{i}" for i in range(5, 10)]
    assert isinstance(err.errors[0], ConnectionError)
    assert isinstance(err, tenuto.TenutoError)
    assert registry.bulk_get(ids) == err.partial
    assert registry.bulk_check_missing(ids) == (ids, []), "failed IDs are not marked missing"
    assert registry.stats()["errors"] == 1


def test_fetch_answers_outside_the_batch_are_ignored(registry: tenuto.IdRegistry) -> None:
    assert registry.resolve(["a"], lambda batch: {"a": "A", "intruder": "X"}) == {"a": "A"}
    assert registry.get("intruder") is None


def test_fetch_must_return_str_ids(registry: tenuto.IdRegistry) -> None:
    with pytest.raises(tenuto.ResolveError) as raised:
        registry.resolve(["a"], lambda batch: {"a": 42})
    assert isinstance(raised.value.errors[0], TypeError)
    assert registry.get("a") is None


def test_concurrent_resolves_fetch_each_id_once(registry: tenuto.IdRegistry) -> None:
    release = threading.Event()
    fetched: list[str] = []

    def fetch(batch: list[str]) -> dict[str, str]:
        fetched.extend(batch)
        assert release.wait(10)
        return {s: s.upper() for s in batch}

    results: list[dict] = []
    first = threading.Thread(
        target=lambda: results.append(registry.resolve(["a", "b", "c"], fetch))
    )
    first.start()
    while registry._flights.followers("a") == 0 and len(fetched) < 3:
        time.sleep(0.001)  # wait for the first resolve to lead the flights of a, b, c
    second = threading.Thread(
        target=lambda: results.append(registry.resolve(["b", "c", "d"], fetch))
    )
    second.start()
    while registry._flights.followers("b") == 0:
        time.sleep(0.001)
    release.set()
    first.join(10)
    second.join(10)
    assert sorted(fetched) == ["a", "b", "c", "d"], "b and c were fetched once"
    assert {"a": "A", "b": "B", "c": "C"} in results and {"b": "B", "c": "C", "d": "D"} in results


async def test_aresolve(registry: tenuto.IdRegistry) -> None:
    in_flight = 0
    peak = 0
    batches: list[list[str]] = []

    async def fetch(batch: list[str]) -> dict[str, str]:
        nonlocal in_flight, peak
        batches.append(batch)
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return {s: s.upper() for s in batch if s != "x3"}

    ids = [f"x{i}" for i in range(12)]
    result = await registry.resolve(ids, fetch, batch_size=2, concurrency=3)
    assert result == {i: (None if i == "x3" else i.upper()) for i in ids}
    assert len(batches) == 6 and peak == 3
    assert await registry.abulk_get(["x0", "x3"]) == {"x0": "X0"}
    assert await registry.abulk_check_missing(["x0", "x3"]) == (["x0"], ["x3"])
    assert await registry.abulk_reverse(["X0"]) == {"X0": "x0"}


async def test_aresolve_partial_failure(registry: tenuto.IdRegistry) -> None:
    async def fetch(batch: list[str]) -> dict[str, str]:
        if "bad" in batch:
            raise TimeoutError("70 s")
        return {s: s.upper() for s in batch}

    with pytest.raises(tenuto.ResolveError) as raised:
        await registry.aresolve(["ok", "bad"], fetch, batch_size=1)
    assert raised.value.partial == {"ok": "OK"} and raised.value.failed == ["bad"]


def test_registry_fails_open(namespace) -> None:
    from tenuto.testing import free_port

    cache = tenuto.Cache(f"redis://127.0.0.1:{free_port()}/0", namespace=namespace)
    registry = tenuto.IdRegistry(cache)
    registry.mark_validated("s1", "r1")
    assert registry.get("s1") == "r1", "served from memory while Redis is down"
    assert registry.resolve(["s1", "s2"], lambda b: {"s2": "r2"}) == {"s1": "r1", "s2": "r2"}


def test_pickled_host_records_both_directions(redis_server, raw_redis, namespace) -> None:
    """The MoodList backend stores each record as a pickled plain dict (protocol 4) under
    `agentic:reccobeat:{validated,reverse,missing}:{id}`. With record_format="pickle"
    tenuto writes what that code reads, and reads what it writes, never unpickling
    anything but data."""
    import datetime
    import os
    import pickle

    ns = f"{namespace}agentic"
    cache = tenuto.Cache(redis_server.url, namespace=ns)
    reg = tenuto.IdRegistry(cache, name="reccobeat", record_format="pickle")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    host = {"spotify_id": "sp1", "reccobeat_id": "rb1", "validated_at": now}
    raw_redis.set(f"{ns}:reccobeat:validated:sp1", pickle.dumps(host, protocol=4))
    raw_redis.set(f"{ns}:reccobeat:reverse:rb1", pickle.dumps(host, protocol=4))
    missing = {"spotify_id": "sp2", "marked_at": now, "reason": "404"}
    raw_redis.set(f"{ns}:reccobeat:missing:sp2", pickle.dumps(missing, protocol=4))
    assert reg.get("sp1") == "rb1" and reg.reverse("rb1") == "sp1"
    assert reg.bulk_check_missing(["sp1", "sp2", "sp3"]) == (["sp1", "sp3"], ["sp2"])

    reg.mark_validated("sp9", "rb9")
    reg.mark_missing("sp8", reason="gone")
    written = pickle.loads(raw_redis.get(f"{ns}:reccobeat:validated:sp9"))
    assert written["spotify_id"] == "sp9" and written["reccobeat_id"] == "rb9"
    datetime.datetime.fromisoformat(written["validated_at"])
    assert pickle.loads(raw_redis.get(f"{ns}:reccobeat:reverse:rb9"))["spotify_id"] == "sp9"
    assert pickle.loads(raw_redis.get(f"{ns}:reccobeat:missing:sp8"))["reason"] == "gone"

    # A JSON-format registry on the same keys reads the pickles too (a mixed rollout).
    assert tenuto.IdRegistry(cache, name="reccobeat").get("sp9") == "rb9"
    # A record that names code is never run: it reads as unknown and counts an error.
    raw_redis.set(f"{ns}:reccobeat:validated:evil", pickle.dumps(os.system, protocol=4))
    errors = reg.stats()["errors"]
    assert reg.get("evil") is None and reg.stats()["errors"] == errors + 1
    with pytest.raises(ValueError, match="record_format"):
        tenuto.IdRegistry(cache, record_format="yaml")
