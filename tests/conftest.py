"""Shared fixtures: a real redis-server on a free loopback port, and one behaviour suite
run against both backends.

Without a redis-server binary the Redis tests skip locally, but fail when ``CI`` is set:
CI must run them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

import tenuto
from tenuto.testing import FakeClock

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A redis-server child process on 127.0.0.1 that a test can stop and restart."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)  # polling a readiness condition, bounded by the deadline
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def redis_binary() -> str:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the Redis tests")
        pytest.skip("redis-server is not installed")
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess(redis_binary())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A private server the test may kill and restart."""
    server = RedisProcess(redis_binary())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def raw_redis(redis_server: RedisProcess):
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
def cache(backend: str, clock: FakeClock, namespace: str, request: pytest.FixtureRequest) -> tenuto.Cache:
    """A jitter-free cache on the fake clock, on each backend in turn."""
    url = None
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url
    return tenuto.Cache(url, namespace=namespace, jitter=0.0, clock=clock, fail_open=False)
