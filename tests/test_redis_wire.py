"""What tenuto leaves in Redis is what other processes and languages read."""

from __future__ import annotations

import json

import pytest

import tenuto


@pytest.fixture
def rcache(redis_server, clock, namespace) -> tenuto.Cache:
    return tenuto.Cache(
        redis_server.url, namespace=namespace, jitter=0.0, clock=clock, fail_open=False
    )


def test_raw_value_is_the_json_envelope_with_ttl_to_stale_until(
    rcache, raw_redis, clock, namespace
) -> None:
    env = rcache.set("song:1", {"title": "Café", "n": [1, 2.5]}, ttl=300, stale_ttl=3600)
    key = f"{namespace}:song:1"
    assert rcache.backend_key("song:1") == key
    raw = raw_redis.get(key)
    assert json.loads(raw) == {
        "payload": {"title": "Café", "n": [1, 2.5]},
        "fetched_at": env.fetched_at,
        "fresh_until": env.fresh_until,
        "stale_until": env.stale_until,
    }
    assert list(json.loads(raw)) == ["payload", "fetched_at", "fresh_until", "stale_until"]
    assert 3599 <= raw_redis.ttl(key) <= 3600


def test_envelopes_written_by_the_host_app_are_read(rcache, raw_redis, clock, namespace) -> None:
    now = int(clock.now())
    host_written = {
        "payload": {"tracks": ["a"]},
        "fetched_at": now - 10,
        "fresh_until": now - 1,
        "stale_until": now + 100,
    }
    raw_redis.set(f"{namespace}:legacy", json.dumps(host_written), ex=100)
    lookup = rcache.get("legacy")
    assert (lookup.state, lookup.value) == ("stale", {"tracks": ["a"]})


@pytest.mark.parametrize(
    "junk", [b"not json", b'{"payload": 1}', b"\xff\xfe", b'"just a string"', b"[]"]
)
def test_unreadable_values_are_a_miss_and_an_error(rcache, raw_redis, namespace, junk) -> None:
    raw_redis.set(f"{namespace}:bad", junk)
    assert rcache.get("bad").state == "miss"
    assert rcache.get_many(["bad"])["bad"].state == "miss"
    stats = rcache.stats()
    assert stats["decode_errors"] == 2 and stats["errors"] == 2


def test_wrong_redis_type_under_a_key_does_not_crash(redis_server, raw_redis, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    raw_redis.rpush(f"{namespace}:list", "x")
    assert cache.get("list").state == "miss"
    assert cache.stats()["backend_errors"] == 1


def test_unencodable_value_raises_and_keeps_the_old_value(rcache) -> None:
    rcache.set("k", {"good": True}, ttl=10)
    with pytest.raises(TypeError, match="not JSON serializable"):
        rcache.set("k", {"bad": object()}, ttl=10)
    with pytest.raises(ValueError, match="not JSON compliant"):
        rcache.set("k", float("nan"), ttl=10)
    with pytest.raises(TypeError, match="keys must be"):
        rcache.set("k", {(1, 2): "tuple key"}, ttl=10)
    with pytest.raises(TypeError, match="not JSON serializable"):
        rcache.set_many({"k": 1, "other": {1, 2}}, ttl=10)
    assert rcache.get("k").value == {"good": True}
    assert rcache.get("other").state == "miss", "set_many writes nothing when one value is bad"


def test_value_over_the_size_limit_is_refused(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, max_value_bytes=1000)
    cache.set("k", "small", ttl=10)
    with pytest.raises(ValueError, match="max_value_bytes=1000"):
        cache.set("k", "x" * 2000, ttl=10)
    assert cache.get("k").value == "small"


def test_self_referencing_value_is_refused(rcache) -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested deeper"):
        rcache.set("k", loop, ttl=10)


def test_pickle_is_opt_in(redis_server, raw_redis, namespace) -> None:
    pickled = tenuto.Cache(
        redis_server.url, namespace=namespace, serializer="pickle", fail_open=False
    )
    value = {"set": {1, 2}, "tuple": (1, "a")}
    pickled.set("p", value, ttl=10)
    assert pickled.get("p").value == value
    stored = json.loads(raw_redis.get(f"{namespace}:p"))
    assert stored["codec"] == "pickle" and isinstance(stored["payload"], str)

    json_only = tenuto.Cache(redis_server.url, namespace=namespace)
    assert json_only.get("p").state == "miss", "a JSON cache never unpickles"
    assert json_only.stats()["decode_errors"] == 1


def test_json_payload_normalises_like_json_dumps(rcache) -> None:
    rcache.set("k", {"t": (1, 2), 1: "int key"}, ttl=10)
    assert rcache.get("k").value == {"t": [1, 2], "1": "int key"}
