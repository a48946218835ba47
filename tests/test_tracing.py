"""OpenTelemetry spans for upstream loads: one per load, none for hits."""

from __future__ import annotations

import pytest

import tenuto

sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = sdk.TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tracer_provider)


def test_loads_are_spans_and_hits_are_not(redis_server, namespace) -> None:
    EXPORTER.clear()
    cache = tenuto.Cache(redis_server.url, namespace=namespace)

    @cache.cached(ttl=60, name=f"{namespace}.song")
    def song(i: int) -> dict:
        return {"id": i}

    song(1)
    song(1)
    song(2)
    spans = EXPORTER.get_finished_spans()
    assert [s.name for s in spans] == ["tenuto.load", "tenuto.load"]
    attributes = dict(spans[0].attributes)
    assert attributes["cache.hit"] is False
    assert attributes["db.system.name"] == "redis"
    assert attributes["tenuto.function"] == f"{namespace}.song"


async def test_async_loads_are_spans(namespace) -> None:
    EXPORTER.clear()
    cache = tenuto.Cache(namespace=namespace)

    @cache.cached(ttl=60)
    async def song(i: int) -> dict:
        return {"id": i}

    await song(1)
    await song(1)
    spans = EXPORTER.get_finished_spans()
    assert len(spans) == 1 and "db.system.name" not in dict(spans[0].attributes)
