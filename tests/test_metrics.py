"""`tenuto.metrics`: a scrape of running Flask and FastAPI apps returns the documented
families, with values that match each object's `stats()`."""

from __future__ import annotations

import pytest

import tenuto
import tenuto.metrics

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(scraped, name: str, **labels: str) -> float:
    return scraped[name, tuple(sorted(labels.items()))]


def exercise(namespace: str, url: str | None = None):
    """A cache, a cached function (one load that fails, one that succeeds, hits), a
    limiter, a breaker and a registry, each used a little."""
    cache = tenuto.Cache(url, namespace=namespace, jitter=0.0)

    @cache.cached(ttl=60, name=f"{namespace}.song")
    def song(i: int) -> dict:
        if i < 0:
            raise ValueError("no such song")
        return {"id": i}

    song(1)
    song(1)
    song(2)
    with pytest.raises(ValueError):
        song(-1)
    limiter = tenuto.RateLimiter("2/minute", name=f"{namespace}-lim", mode="inbound")
    for _ in range(3):
        limiter.try_acquire()
    breaker = tenuto.CircuitBreaker(failures=1, name=f"{namespace}-br")
    with pytest.raises(ConnectionError), breaker:
        raise ConnectionError
    registry = tenuto.IdRegistry(cache, name=f"{namespace}-reg")
    registry.mark_validated("s1", "d1")
    registry.get("s1")
    registry.get("s2")
    return cache, song, limiter, breaker, registry


def check(scraped, namespace: str, cache, limiter, breaker, registry) -> None:
    stats = cache.stats()
    tier = stats["backend"]
    assert (
        value(scraped, "tenuto_cache_requests_total", cache=namespace, tier=tier, result="hit")
        == stats["hits"]
    )
    assert (
        value(scraped, "tenuto_cache_requests_total", cache=namespace, tier=tier, result="miss")
        == stats["misses"]
    )
    assert (
        value(scraped, "tenuto_cache_requests_total", cache=namespace, tier=tier, result="stale")
        == 0
    )
    assert value(scraped, "tenuto_cache_coalesced_total", cache=namespace) == stats["coalesced"]
    assert value(scraped, "tenuto_backend_up", cache=namespace) == 1
    assert (
        value(scraped, "tenuto_cache_fail_open_total", cache=namespace, reason="backend_error") == 0
    )
    fn = f"{namespace}.song"
    assert value(scraped, "tenuto_upstream_calls_total", function=fn, outcome="ok") == 2
    assert value(scraped, "tenuto_upstream_calls_total", function=fn, outcome="error") == 1
    assert value(scraped, "tenuto_upstream_seconds_count", function=fn) == 3
    assert value(scraped, "tenuto_upstream_seconds_bucket", function=fn, le="+Inf") == 3
    lim = limiter.stats()
    assert (
        value(scraped, "tenuto_ratelimit_decisions_total", limiter=lim["name"], decision="admitted")
        == lim["admitted"]
        == 2
    )
    assert (
        value(scraped, "tenuto_ratelimit_decisions_total", limiter=lim["name"], decision="refused")
        == lim["refused"]
        == 1
    )
    assert value(scraped, "tenuto_breaker_state", breaker=breaker.stats()["name"]) == 2  # open
    reg = registry.stats()
    for result in ("validated", "unknown"):
        assert (
            value(scraped, "tenuto_registry_lookups_total", registry=reg["name"], result=result)
            == reg[result]
        )


def test_register_into_a_registry(namespace) -> None:
    objects = exercise(namespace)
    registry = prometheus_client.CollectorRegistry()
    tenuto.metrics.register(registry)
    tenuto.metrics.register(registry)  # once per registry
    scraped = samples(prometheus_client.generate_latest(registry).decode())
    cache, _song, limiter, breaker, reg = objects
    check(scraped, namespace, cache, limiter, breaker, reg)


def test_flask_metrics_view(namespace, redis_server) -> None:
    from flask import Flask

    from tenuto.flask import Tenuto

    cache, _song, limiter, breaker, reg = exercise(namespace, redis_server.url)
    app = Flask(__name__)
    Tenuto(app, cache=cache, metrics_path="/metrics")
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    check(samples(response.get_data(as_text=True)), namespace, cache, limiter, breaker, reg)

    guarded = Flask("guarded")
    Tenuto(guarded, metrics_path="/metrics", metrics_guard=lambda: False)
    assert guarded.test_client().get("/metrics").status_code == 403


def test_fastapi_metrics_router(namespace) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tenuto.fastapi import metrics_router

    cache, _song, limiter, breaker, reg = exercise(namespace)
    app = FastAPI()
    app.include_router(metrics_router())
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    check(samples(response.text), namespace, cache, limiter, breaker, reg)

    guarded = FastAPI()
    guarded.include_router(metrics_router(guard=lambda request: False))
    with TestClient(guarded) as client:
        assert client.get("/metrics").status_code == 403


def test_local_tier_and_outage_families(namespace, own_redis) -> None:
    cache = tenuto.Cache(own_redis.url, namespace=namespace, local=10, local_ttl=60)
    cache.set("k", 1, ttl=60)
    cache.get("k")
    own_redis.stop()
    cache.get("k")
    cache.get("other")
    body, _ = tenuto.metrics.exposition()
    scraped = samples(body.decode())
    stats = cache.stats()
    assert (
        value(scraped, "tenuto_cache_requests_total", cache=namespace, tier="local", result="hit")
        == stats["local_hits"]
        >= 1
    )
    assert value(scraped, "tenuto_backend_up", cache=namespace) == 0
    assert (
        value(scraped, "tenuto_cache_fail_open_total", cache=namespace, reason="backend_error")
        == stats["backend_errors"]
        > 0
    )
