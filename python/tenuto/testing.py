"""Test helpers for apps that use tenuto: a fake clock, and a pytest plugin.

The plugin is registered through the ``pytest11`` entry point, so its fixtures are
available in any pytest run where tenuto is installed:

- ``tenuto_clock``: a :class:`FakeClock` starting at a fixed epoch time.
- ``tenuto_cache``: a fresh memory :class:`tenuto.Cache` on that clock, without jitter.

Expiry then happens when the test says so (``tenuto_clock.advance(301)``), never by
sleeping.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

from tenuto._core import Cache, FakeClock

__all__ = ["FakeClock", "RedisServer", "free_port", "tenuto_cache", "tenuto_clock"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A throwaway ``redis-server`` (or ``valkey-server``) on 127.0.0.1, for tests and
    benchmarks: no persistence, loopback only; ``stop()`` and ``start()`` again on the
    same port to simulate an outage."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        found = binary or shutil.which("redis-server") or shutil.which("valkey-server")
        if found is None:
            raise FileNotFoundError("no redis-server or valkey-server on PATH")
        self.binary = found
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
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

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): connections stay open and commands hang, like a
        stalled host. Always ``resume()`` it (``stop()`` also ends a paused server)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused server run again (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
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
