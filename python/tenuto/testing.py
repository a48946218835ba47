"""Test helpers for apps that use tenuto: a fake clock, and a pytest plugin.

The plugin is registered through the ``pytest11`` entry point, so its fixtures are
available in any pytest run where tenuto is installed:

- ``tenuto_clock``: a :class:`FakeClock` starting at a fixed epoch time.
- ``tenuto_cache``: a fresh memory :class:`tenuto.Cache` on that clock, without jitter.

Expiry then happens when the test says so (``tenuto_clock.advance(301)``), never by
sleeping.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

from tenuto._core import Cache, FakeClock, companion_key

__all__ = [
    "FakeClock",
    "RedisCluster",
    "RedisServer",
    "companion_key",
    "free_port",
    "tenuto_cache",
    "tenuto_clock",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; both below 65536."""
    for _ in range(1000):
        port = random.randrange(20000, 30000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """A throwaway ``redis-server`` (or ``valkey-server``) on 127.0.0.1, for tests and
    benchmarks: no persistence, loopback only; ``stop()`` and ``start()`` again on the
    same port to simulate an outage."""

    def __init__(
        self,
        binary: str | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        found = binary or shutil.which("redis-server") or shutil.which("valkey-server")
        if found is None:
            raise FileNotFoundError("no redis-server or valkey-server on PATH")
        self.binary = found
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        # A private working directory: a replica's sync file (dump.rdb) never lands in the
        # caller's directory, and no server starts by loading another one's data.
        self._dir = tempfile.mkdtemp(prefix="tenuto-redis-")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir]
        args += ["--save", "", "--appendonly", "no", *self.extra_args]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
            if self._answers_ping():
                return self
            time.sleep(0.02)  # waiting for the server to listen, bounded by the deadline
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): connections stay open and commands hang, like a
        stalled host. Always ``resume()`` it (``stop()`` also ends a paused server)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused server run again (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisCluster:
    """A throwaway Redis Cluster on 127.0.0.1: ``masters`` primaries with ``replicas``
    replicas each (3 + 3 by default), created with ``redis-cli --cluster create``. Each
    node is a :class:`RedisServer` in ``nodes``; ``stop()`` ends them all. A short
    ``node_timeout`` (ms) makes failover after a killed primary quick."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout: int = 1000) -> None:
        cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        if cli is None:
            raise FileNotFoundError("no redis-cli or valkey-cli on PATH")
        self.cli = cli
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.nodes: list[RedisServer] = []
        self._dir: str | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        self._dir = tempfile.mkdtemp(prefix="tenuto-cluster-")
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                port = free_cluster_port()
                node = RedisServer(
                    port=port,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", os.path.join(self._dir, f"nodes-{port}.conf"),
                        "--cluster-node-timeout", str(self.node_timeout),
                        # A replica may take over however old its data: test clusters
                        # are killed right after they start.
                        "--cluster-replica-validity-factor", "0",
                    ],
                )  # fmt: skip
                self.nodes.append(node.start())
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            created = subprocess.run(
                [self.cli, "--cluster", "create", *addresses]
                + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def info(self, node: RedisServer, *args: str) -> str:
        """The output of ``redis-cli -p <node> <args>``."""
        done = subprocess.run(
            [self.cli, "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node reports ``cluster_state:ok`` with all slots served,
        and every replica is in sync with its primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.running]
            states = [self.info(n, "cluster", "info") for n in running]
            roles = [self.info(n, "info", "replication") for n in running]
            if (
                states
                and all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states)
                and all("role:master" in r or "master_link_status:up" in r for r in roles)
            ):
                return
            time.sleep(0.1)  # polling the cluster's own state, bounded by the deadline
        raise RuntimeError(f"the cluster was not healthy within {timeout} s")

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now (after a failover, a former replica)."""
        return [
            n
            for n in self.nodes
            if n.running and "role:master" in self.info(n, "info", "replication")
        ]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


try:
    import pytest
except ImportError:  # pragma: no cover - only the fixtures need pytest
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING or pytest is not None:

    @pytest.fixture
    def tenuto_clock() -> FakeClock:
        """A fake clock at 2023-11-14T22:13:20Z that moves only when told to."""
        return FakeClock(1_700_000_000)

    @pytest.fixture
    def tenuto_cache(tenuto_clock: FakeClock) -> Cache:
        """A fresh memory cache on ``tenuto_clock``, without jitter."""
        return Cache(namespace="test", jitter=0.0, clock=tenuto_clock)
