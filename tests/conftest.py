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
from tenuto.testing import FakeClock, RedisCluster, RedisServer


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


def redis_py_client(url: str):
    """redis-py on `url`, a single server's or a cluster's (tenuto.testing URLs)."""
    import redis

    if "+cluster://" in url:
        from redis.cluster import RedisCluster as PyCluster

        host, port = url.split("://", 1)[1].split(",")[0].rsplit(":", 1)
        return PyCluster(host=host, port=int(port))
    return redis.Redis.from_url(url)


def new_redis_cluster() -> RedisCluster:
    try:
        return RedisCluster()
    except FileNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("redis-cli is not installed, and CI must run the cluster tests")
        pytest.skip("redis-cli is not installed")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """3 primaries + 3 replicas on loopback, shared by the whole session. At the end, no
    node may have refused a command for touching several slots."""
    with new_redis_cluster() as cluster:
        yield cluster
        refused = {
            node.port: line
            for node in cluster.nodes
            if node.running
            for line in cluster.info(node, "info", "errorstats").splitlines()
            if "CROSSSLOT" in line
        }
        assert refused == {}, f"CROSSSLOT errors during the session: {refused}"


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


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def backend_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The URL of the shared server for `backend` (None: memory)."""
    if backend == "redis":
        return str(request.getfixturevalue("redis_server").url)
    if backend == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return None


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A standalone server's URL, then the cluster's: state shared through either."""
    url = backend_url(request.param, request)
    assert url is not None
    return url


@pytest.fixture
def cache(
    backend: str, clock: FakeClock, namespace: str, request: pytest.FixtureRequest
) -> tenuto.Cache:
    """A jitter-free cache on the fake clock, on each backend in turn."""
    url = backend_url(backend, request)
    return tenuto.Cache(url, namespace=namespace, jitter=0.0, clock=clock, fail_open=False)
