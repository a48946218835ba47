"""Shared fixtures: a real redis-server on a free loopback port, and one behaviour suite
run against both backends.

Without a redis-server binary the Redis tests skip locally, but fail when ``CI`` is set:
CI must run them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import tenuto
from tenuto.testing import FakeClock, RedisServer


def new_redis_server() -> RedisServer:
    try:
        return RedisServer()
    except FileNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the Redis tests")
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with new_redis_server() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private server the test may kill and restart."""
    with new_redis_server() as server:
        yield server


@pytest.fixture
def raw_redis(redis_server: RedisServer):
    """redis-py on the shared server, to read what tenuto wrote."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cache(
    backend: str, clock: FakeClock, namespace: str, request: pytest.FixtureRequest
) -> tenuto.Cache:
    """A jitter-free cache on the fake clock, on each backend in turn."""
    url = None
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url
    return tenuto.Cache(url, namespace=namespace, jitter=0.0, clock=clock, fail_open=False)
