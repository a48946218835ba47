"""`tenuto.Client` against a real HTTP server on loopback that is slow, fails, rate limits
(Retry-After in seconds and as a date), answers invalid JSON, resets connections and
serves ETags. Waits are on a FakeClock wherever the client's own clock decides them."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

import tenuto
from tenuto.testing import FakeClock

START = 1_700_000_000.0

# What a scripted answer can be: (status, headers, body), or one of these.
RESET = "reset"  # close the connection with a TCP RST before answering
HANG = "hang"  # answer only when released (or the client goes away)


class Headers(dict):  # type: ignore[type-arg]
    """Header names are case-insensitive (reqwest sends them lower-case)."""

    def __init__(self, items: Any) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


@dataclass
class Seen:
    path: str
    query: str
    headers: Headers
    body: bytes
    at: float = field(default_factory=time.monotonic)


class Upstream:
    """A threaded HTTP/1.1 server answering from per-path scripts (then `default`)."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Any]] = {}
        self.defaults: dict[str, Any] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.disconnected = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                seen = Seen(parts.path, parts.query, Headers(self.headers.items()), body)
                with upstream.lock:
                    upstream.seen.append(seen)
                    script = upstream.scripts.get(parts.path)
                    answer = script.pop(0) if script else upstream.defaults.get(parts.path)
                if answer is None:
                    answer = (200, {}, json.dumps({"path": parts.path, "query": parts.query}))
                if callable(answer):
                    answer = answer(seen)
                if answer == RESET:
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.connection.close()
                    self.close_connection = True
                    return
                if answer == HANG:
                    upstream.hanging.set()
                    if not upstream.wait_or_disconnect(self.connection):
                        self.close_connection = True
                        return
                    answer = (200, {}, '{"late": true}')
                status, headers, payload = answer
                data = payload if isinstance(payload, bytes) else payload.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if status != 304:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if status != 304:
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def wait_or_disconnect(self, conn: socket.socket) -> bool:
        """True when released; False when the client closed the connection first."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.release.wait(0.02):
                return True
            readable, _, _ = select.select([conn], [], [], 0)
            if readable:
                try:
                    if conn.recv(1, socket.MSG_PEEK) == b"":
                        self.disconnected.set()
                        return False
                except OSError:
                    self.disconnected.set()
                    return False
        return True

    def script(self, path: str, *answers: Any, then: Any = None) -> None:
        with self.lock:
            self.scripts[path] = list(answers)
            if then is not None:
                self.defaults[path] = then

    def hits(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def ok(body: Any, **headers: str) -> tuple[int, dict[str, str], str]:
    return (200, headers, json.dumps(body))


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


# --- plain calls ---------------------------------------------------------------------


def test_get_post_and_request(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url + "/v1/", headers={"X-App": "t"})
    got = client.get_json("/items", params={"q": "a b", "n": 2, "on": True, "tags": ["x", "y"]})
    assert got["path"] == "/v1/items"
    assert got["query"] == "q=a+b&n=2&on=true&tags=x&tags=y"
    seen = upstream.hits("/v1/items")[0]
    assert seen.headers["X-App"] == "t"
    assert "gzip" in seen.headers["Accept-Encoding"] and "br" in seen.headers["Accept-Encoding"]

    upstream.script("/v1/echo", then=lambda s: ok({"got": json.loads(s.body)}))
    assert client.post_json("echo", json={"ids": [1, 2]}) == {"got": {"ids": [1, 2]}}
    assert upstream.hits("/v1/echo")[0].headers["Content-Type"] == "application/json"

    upstream.script("/v1/raw", (404, {"X-Why": "gone"}, '{"error": "missing"}'))
    response = client.request("GET", "raw")
    assert isinstance(response, tenuto.Response)
    assert (response.status, response.ok) == (404, False)
    assert response.headers["x-why"] == "gone"
    assert response.content == b'{"error": "missing"}'
    assert response.json() == {"error": "missing"}
    with pytest.raises(tenuto.UpstreamError) as info:
        response.raise_for_status()
    assert info.value.status == 404


async def test_async_calls(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url)
    results = await asyncio.gather(*(client.aget_json(f"/a/{i}") for i in range(50)))
    assert [r["path"] for r in results] == [f"/a/{i}" for i in range(50)]
    upstream.script("/p", then=lambda s: ok(json.loads(s.body)))
    assert await client.apost_json("/p", json=[1, "two"]) == [1, "two"]
    response = await client.arequest("DELETE", "/d")
    assert response.status == 200
    assert client.stats()["calls"] == 52


# --- retries -------------------------------------------------------------------------


def test_5xx_and_resets_are_retried_with_backoff_on_the_clock(upstream: Upstream) -> None:
    clock = FakeClock(START)
    client = tenuto.Client(upstream.url, retries=3, backoff=1.0, clock=clock)
    upstream.script("/flaky", (500, {}, "boom"), RESET, (503, {}, ""), ok({"ok": 1}))
    assert client.get_json("/flaky") == {"ok": 1}
    assert len(upstream.hits("/flaky")) == 4
    waited = clock.now() - START
    assert 0 <= waited < 1 + 2 + 4, "full jitter under 1, 2, 4 s"
    stats = client.stats()
    assert (stats["calls"], stats["requests"], stats["retries"]) == (1, 4, 3)
    assert stats["statuses"] == {500: 1, 503: 1, 200: 1}
    assert stats["connect_errors"] == 1
    assert stats["latency"]["p50"] > 0


def test_other_4xx_are_never_retried(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url, retries=3, backoff=0.0)
    for status in (400, 401, 403, 404, 422):
        upstream.script(f"/s{status}", (status, {}, '{"detail": "no"}'))
        with pytest.raises(tenuto.UpstreamError) as info:
            client.get_json(f"/s{status}")
        assert info.value.status == status
        assert info.value.body == '{"detail": "no"}'
        assert len(upstream.hits(f"/s{status}")) == 1


def test_exhausted_retries_raise_typed_errors(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url, retries=2, backoff=0.0)
    upstream.script("/down", then=(502, {}, "bad gateway"))
    with pytest.raises(tenuto.UpstreamError) as info:
        client.get_json("/down")
    assert info.value.status == 502 and "bad gateway" in str(info.value)
    assert len(upstream.hits("/down")) == 3

    upstream.script("/reset", then=RESET)
    client = tenuto.Client(upstream.url, retries=2, backoff=0.0)  # a fresh retry budget
    with pytest.raises(tenuto.UpstreamError) as info:
        client.get_json("/reset")
    assert info.value.status is None
    assert len(upstream.hits("/reset")) == 3

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    with pytest.raises(tenuto.UpstreamError, match="cannot reach"):
        tenuto.Client(f"http://127.0.0.1:{port}", retries=1, backoff=0.0).get_json("/")


def test_timeouts_are_retried_then_raise_upstream_timeout(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url, timeout=0.2, retries=1, backoff=0.0)
    upstream.script("/slow", then=HANG)
    started = time.monotonic()
    with pytest.raises(tenuto.UpstreamTimeout) as info:
        client.get_json("/slow")
    assert isinstance(info.value, tenuto.UpstreamError)
    assert 0.4 <= time.monotonic() - started < 2.0
    wait_until(lambda: len(upstream.hits("/slow")) == 2)
    assert client.stats()["timeouts"] == 2
    # A per-call timeout overrides the client's.
    upstream.release.set()
    assert client.get_json("/slow", timeout=5.0) == {"late": True}


def test_invalid_json_is_not_retried(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url)
    upstream.script("/bad", (200, {}, "<html>oops</html>"))
    with pytest.raises(tenuto.InvalidJSON) as info:
        client.get_json("/bad")
    assert info.value.status == 200 and info.value.body == "<html>oops</html>"
    assert isinstance(info.value, tenuto.UpstreamError) and isinstance(
        info.value, tenuto.TenutoError
    )
    assert len(upstream.hits("/bad")) == 1


def test_retry_after_seconds_and_dates_are_waited(upstream: Upstream) -> None:
    clock = FakeClock(START)
    client = tenuto.Client(upstream.url, backoff=0.0, clock=clock)
    upstream.script("/rs", (429, {"Retry-After": "7"}, ""), ok(1))
    assert client.get_json("/rs") == 1
    assert clock.now() - START == pytest.approx(7.0)

    date = email.utils.formatdate(clock.now() + 30, usegmt=True)
    before = clock.now()
    upstream.script("/rd", (503, {"Retry-After": date}, ""), ok(2))
    assert client.get_json("/rd") == 2
    assert clock.now() - before == pytest.approx(30.0, abs=1.0)
    assert client.stats()["retries"] == 2


def test_long_retry_after_raises_rate_limited_at_once(upstream: Upstream) -> None:
    clock = FakeClock(START)
    client = tenuto.Client(upstream.url, max_retry_after=60, clock=clock)
    upstream.script("/long", (429, {"Retry-After": "120"}, ""))
    with pytest.raises(tenuto.RateLimited) as info:
        client.get_json("/long")
    assert info.value.retry_after == 120.0
    assert clock.now() == START, "nothing was waited"
    assert len(upstream.hits("/long")) == 1

    # Fed to a limiter, the long pause holds no later call either: each raises at once.
    limited = tenuto.Client(
        upstream.url, max_retry_after=60, clock=clock, limiter=tenuto.RateLimiter("9/second")
    )
    upstream.script("/long", (429, {"Retry-After": "120"}, ""))
    for _ in range(2):
        with pytest.raises(tenuto.RateLimited) as info:
            limited.get_json("/long")
        assert 119 < info.value.retry_after <= 120
    assert len(upstream.hits("/long")) == 2 and clock.now() == START

    upstream.script("/short", (429, {"Retry-After": "5"}, ""))
    with pytest.raises(tenuto.RateLimited) as info:
        client.get_json("/short", deadline=2.0)
    assert info.value.retry_after == 5.0 and clock.now() == START


def test_retry_after_pauses_the_limiter(upstream: Upstream) -> None:
    clock = FakeClock(START)
    limiter = tenuto.RateLimiter("1000/second", clock=clock)
    client = tenuto.Client(upstream.url, limiter=limiter, backoff=0.0, clock=clock)
    upstream.script("/rl", (429, {"Retry-After": "10"}, ""), ok("fine"))
    assert client.get_json("/rl") == "fine"
    first, second = upstream.hits("/rl")
    assert limiter.stats()["throttle_events"] == 1
    assert clock.now() - START >= 10.0
    # The limiter stays slowed down for every call of every client using it.
    other = tenuto.Client(upstream.url, limiter=limiter, clock=clock)
    assert other.get_json("/x")["path"] == "/x"


def test_the_retry_budget_stops_retry_storms(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url, retries=3, backoff=0.0)
    upstream.script("/storm", then=(500, {}, ""))
    for _ in range(40):
        with pytest.raises(tenuto.UpstreamError):
            client.get_json("/storm")
    stats = client.stats()
    assert stats["retries"] <= 40 * 0.2 + 3
    assert stats["requests"] == len(upstream.hits("/storm")) == 40 + stats["retries"]
    assert stats["retry_budget_exhausted"] > 0


def test_an_open_breaker_refuses_without_a_request(upstream: Upstream) -> None:
    breaker = tenuto.CircuitBreaker(failures=2, reset_after=30)
    client = tenuto.Client(upstream.url, retries=0, breaker=breaker)
    upstream.script("/b", then=(500, {}, ""))
    for _ in range(2):
        with pytest.raises(tenuto.UpstreamError):
            client.get_json("/b")
    with pytest.raises(tenuto.CircuitOpen) as info:
        client.get_json("/b")
    assert 0 < info.value.retry_after <= 30
    assert len(upstream.hits("/b")) == 2
    assert breaker.state == "open"


def test_limiter_concurrency_slots_bound_requests_in_flight(upstream: Upstream) -> None:
    limiter = tenuto.RateLimiter("1000/second", max_concurrency=2)
    client = tenuto.Client(upstream.url, limiter=limiter)
    in_flight = [0, 0]  # now, most
    lock = threading.Lock()

    def slowly(seen: Seen) -> Any:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return ok(1)

    upstream.script("/c", then=slowly)

    async def many() -> list[Any]:
        return await asyncio.gather(*(client.aget_json("/c") for _ in range(8)))

    assert asyncio.run(many()) == [1] * 8
    assert in_flight[1] == 2
    assert limiter.stats()["in_flight"] == 0


def test_a_redis_limiter_caps_concurrency_across_limiters(
    upstream: Upstream, redis_server: Any, namespace: str
) -> None:
    # Two limiters of one name and URL stand for two processes: two leases in all.
    clients = [
        tenuto.Client(
            upstream.url,
            limiter=tenuto.RateLimiter(
                "1000/second", max_concurrency=2, url=redis_server.url, name=namespace
            ),
        )
        for _ in range(2)
    ]
    in_flight = [0, 0]
    lock = threading.Lock()

    def slowly(seen: Seen) -> Any:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return ok(1)

    upstream.script("/lease", then=slowly)

    async def many() -> list[Any]:
        return await asyncio.gather(*(c.aget_json("/lease") for c in clients for _ in range(5)))

    assert asyncio.run(many()) == [1] * 10
    assert in_flight[1] == 2


# --- redaction -----------------------------------------------------------------------


def test_messages_never_show_credentials(upstream: Upstream, caplog: Any) -> None:
    client = tenuto.Client(
        upstream.url, headers={"Authorization": "Bearer SEKRIT-TOKEN"}, redact=["session"]
    )
    upstream.script(
        "/auth",
        then=lambda s: (401, {}, json.dumps({"error": "bad " + s.headers["Authorization"]})),
    )
    with pytest.raises(tenuto.UpstreamError) as info:
        client.get_json("/auth", params={"api_key": "SEKRIT-KEY", "session": "SEKRIT-S", "q": 1})
    text = str(info.value) + info.value.url + info.value.body
    assert "SEKRIT" not in text, text
    assert "api_key=***" in info.value.url and "q=1" in info.value.url
    creds = tenuto.Client("http://user:SEKRIT-PW@127.0.0.1:1", retries=0)
    assert "SEKRIT" not in repr(creds) and "SEKRIT" not in creds.base_url
    with pytest.raises(tenuto.UpstreamError) as info:
        creds.get_json("/x", params={"token": "SEKRIT-T"})
    assert "SEKRIT" not in str(info.value)


# --- cancellation --------------------------------------------------------------------


async def test_cancelling_the_task_aborts_the_request(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url, timeout=30)
    upstream.script("/hang", then=HANG)
    task = asyncio.ensure_future(client.aget_json("/hang"))
    while not upstream.hanging.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The server sees the connection go away: the request was dropped, not left running.
    assert await asyncio.to_thread(upstream.disconnected.wait, 5.0)


# --- cache ---------------------------------------------------------------------------


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock(START)


def cached_client(upstream: Upstream, cache: tenuto.Cache, clock: FakeClock, **kw: Any) -> Any:
    return tenuto.Client(upstream.url, cache=cache, clock=clock, backoff=0.0, **kw)


def test_cached_get_serves_hits_and_keys_on_sorted_params(
    upstream: Upstream, cache: tenuto.Cache, clock: FakeClock
) -> None:
    client = cached_client(upstream, cache, clock)
    first = client.get_json("/t", params={"a": 1, "b": 2}, ttl=60)
    assert client.get_json("/t", params={"b": 2, "a": 1}, ttl=60) == first
    assert client.get_json("/t", params=[("b", 2), ("a", 1)], ttl=60)["query"] == "a=1&b=2"
    assert client.get_json("/t", params=[("a", 1), ("b", 2)], ttl=60)["query"] == "a=1&b=2"
    assert len(upstream.hits("/t")) == 2, "a dict in any order is one key, sorted pairs another"
    client.get_json("/t", params={"a": 1, "b": 3}, ttl=60)
    assert len(upstream.hits("/t")) == 3
    upstream.script("/p", then=lambda s: ok(json.loads(s.body)))
    assert client.post_json("/p", json={"x": 1}, ttl=60) == {"x": 1}
    assert client.post_json("/p", json={"x": 1}, ttl=60) == {"x": 1}
    assert client.post_json("/p", json={"x": 2}, ttl=60) == {"x": 2}
    assert client.post_json("/p", json={"x": 1}) == {"x": 1}, "no ttl: not cached"
    assert len(upstream.hits("/p")) == 3
    states = client.stats()["cache"]
    assert (states["hit"], states["miss"]) == (3, 5)


def test_twenty_threads_share_one_request(
    upstream: Upstream, cache: tenuto.Cache, clock: FakeClock
) -> None:
    client = cached_client(upstream, cache, clock)
    upstream.script("/sf", then=HANG)
    results: list[Any] = []

    def caller() -> None:
        results.append(client.get_json("/sf", ttl=60))

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for t in threads:
        t.start()
    loader = client._loader("GET", 60, None, False)
    wait_until(lambda: upstream.hanging.is_set() and loader.followers("/sf", None, None) == 19)
    upstream.release.set()
    for t in threads:
        t.join(10)
    assert results == [{"late": True}] * 20
    assert len(upstream.hits("/sf")) == 1


async def test_twenty_tasks_share_one_request(upstream: Upstream, fake_clock: FakeClock) -> None:
    cache = tenuto.Cache(jitter=0.0, clock=fake_clock)
    client = cached_client(upstream, cache, fake_clock)
    upstream.script("/sfa", then=HANG)
    tasks = [asyncio.ensure_future(client.aget_json("/sfa", ttl=60)) for _ in range(20)]
    while not upstream.hanging.is_set():
        await asyncio.sleep(0.005)
    loader = client._loader("GET", 60, None, True)
    while loader.followers("/sfa", None, None) < 19:
        await asyncio.sleep(0.005)
    upstream.release.set()
    assert await asyncio.gather(*tasks) == [{"late": True}] * 20
    assert len(upstream.hits("/sfa")) == 1


def test_stale_is_served_while_refreshing_and_when_the_upstream_fails(
    upstream: Upstream, cache: tenuto.Cache, clock: FakeClock
) -> None:
    client = cached_client(upstream, cache, clock, retries=0)
    upstream.script("/s", ok("v1"), (500, {}, ""), ok("v2"))
    assert client.get_json("/s", ttl=10, stale_ttl=100) == "v1"
    clock.advance(20)
    loader = client._loader("GET", 10, 100, False)
    assert client.get_json("/s", ttl=10, stale_ttl=100) == "v1", "stale while revalidating"
    loader._settle(loader.key("/s", None, None))
    assert len(upstream.hits("/s")) == 2, "the refresh failed: the stale value stays"
    # The next stale read refreshes again (on Redis only once the failed load's lock is
    # released, which happens in the background: poll, each read serving stale).
    served = []

    def refreshed() -> bool:
        served.append(client.get_json("/s", ttl=10, stale_ttl=100))
        loader._settle(loader.key("/s", None, None))
        return served[-1] == "v2"

    wait_until(refreshed)
    assert set(served) == {"v1", "v2"}
    assert len(upstream.hits("/s")) == 3, "one request per refresh"
    assert client.stats()["cache"]["stale"] == 2


def test_a_long_retry_after_serves_the_stale_value(
    upstream: Upstream, cache: tenuto.Cache, clock: FakeClock
) -> None:
    limiter = tenuto.RateLimiter("100/second", clock=clock)
    client = cached_client(upstream, cache, clock, limiter=limiter, max_retry_after=60)
    upstream.script("/r", ok("old"), (429, {"Retry-After": "3600"}, ""))
    assert client.get_json("/r", ttl=10, stale_ttl=1000) == "old"
    clock.advance(20)
    loader = client._loader("GET", 10, 1000, False)
    assert client.get_json("/r", ttl=10, stale_ttl=1000) == "old"
    loader._settle(loader.key("/r", None, None))
    assert len(upstream.hits("/r")) == 2
    assert client.stats()["rate_limited"] == 1
    assert limiter.stats()["paused_for"] > 3000, "every caller of the limiter pauses"
    assert client.get_json("/r", ttl=10, stale_ttl=1000) == "old"


def test_etag_revalidation_refreshes_without_a_new_body(
    upstream: Upstream, cache: tenuto.Cache, clock: FakeClock
) -> None:
    client = cached_client(upstream, cache, clock)

    def etagged(seen: Seen) -> Any:
        if seen.headers.get("If-None-Match") == '"v1"':
            return (304, {"ETag": '"v1"'}, b"")
        return ok(
            {"big": "body"}, ETag='"v1"', **{"Last-Modified": "Tue, 14 Nov 2023 22:13:20 GMT"}
        )

    upstream.script("/e", then=etagged)
    assert client.get_json("/e", ttl=10, stale_ttl=100) == {"big": "body"}
    clock.advance(20)
    loader = client._loader("GET", 10, 100, False)
    assert client.get_json("/e", ttl=10, stale_ttl=100) == {"big": "body"}
    loader._settle(loader.key("/e", None, None))
    first, second = upstream.hits("/e")
    assert "If-None-Match" not in first.headers
    assert second.headers["If-None-Match"] == '"v1"'
    assert second.headers["If-Modified-Since"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert loader.lookup("/e", None, None).state == "hit", "the 304 refreshed it"
    assert client.get_json("/e", ttl=10, stale_ttl=100) == {"big": "body"}
    assert len(upstream.hits("/e")) == 2
    assert client.stats()["cache"]["not_modified"] == 1


async def test_async_cached_calls_and_etags(upstream: Upstream, fake_clock: FakeClock) -> None:
    cache = tenuto.Cache(jitter=0.0, clock=fake_clock)
    client = cached_client(upstream, cache, fake_clock)
    upstream.script(
        "/ae",
        ok([1], ETag='"a"'),
        lambda s: (304, {}, b"") if s.headers.get("If-None-Match") else ok(0),
    )
    assert await client.aget_json("/ae", ttl=10) == [1]
    assert await client.aget_json("/ae", ttl=10) == [1]
    fake_clock.advance(11)  # past the TTL, no stale window: a miss that still has no prior
    assert await client.aget_json("/ae", ttl=10) == 0
    assert await client.apost_json("/ae", json={"q": 1}, ttl=10) == {"path": "/ae", "query": ""}


async def test_refresh_fetches_now_and_stores(upstream: Upstream, fake_clock: FakeClock) -> None:
    cache = tenuto.Cache(jitter=0.0, clock=fake_clock)
    client = cached_client(upstream, cache, fake_clock)
    upstream.script("/w", ok("v1"), ok("v2"), ok("v3"))
    assert client.get_json("/w", params={"a": 1}, ttl=60) == "v1"
    assert client.refresh_json("/w", params={"a": 1}, ttl=60) == "v2"
    assert client.get_json("/w", params={"a": 1}, ttl=60) == "v2", "the refresh was stored"
    assert await client.arefresh_json("/w", params={"a": 1}, ttl=60) == "v3"
    assert await client.aget_json("/w", params={"a": 1}, ttl=60) == "v3"
    assert len(upstream.hits("/w")) == 3


def test_ttl_without_a_cache_is_an_error(upstream: Upstream) -> None:
    with pytest.raises(ValueError, match="ttl needs a cache"):
        tenuto.Client(upstream.url).get_json("/", ttl=10)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"base_url": 5}, TypeError, "base_url"),
        ({"base_url": "ftp://x"}, ValueError, "base_url"),
        ({"base_url": "not a url"}, ValueError, "base_url"),
        ({"base_url": "http://x/?key=1"}, ValueError, "base_url"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"connect_timeout": -1}, ValueError, "connect_timeout"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 10**30}, ValueError, "retries"),
        ({"backoff": -0.1}, ValueError, "backoff"),
        ({"max_retry_after": float("inf")}, ValueError, "max_retry_after"),
        ({"retry_budget": -1}, ValueError, "retry_budget"),
        ({"deadline": 0}, ValueError, "deadline"),
        ({"headers": {"Bad Name": "x"}}, ValueError, "header"),
        ({"headers": {"X": "a\nb"}}, ValueError, "header"),
        ({"headers": [("X", "y")]}, TypeError, "headers"),
        ({"limiter": object()}, TypeError, "limiter"),
        ({"breaker": "no"}, TypeError, "breaker"),
        ({"cache": {}}, TypeError, "cache"),
        ({"clock": lambda: 0.0}, TypeError, "clock"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], error: type, match: str) -> None:
    kwargs = {"base_url": "http://127.0.0.1:1", **kwargs}
    base_url = kwargs.pop("base_url")
    with pytest.raises(error, match=match):
        tenuto.Client(base_url, **kwargs)


def test_bad_call_arguments(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url)
    with pytest.raises(TypeError, match="params"):
        client.get_json("/", params="a=1")
    with pytest.raises(TypeError, match="params"):
        client.get_json("/", params={"a": object()})
    with pytest.raises(ValueError, match="method"):
        client.request("GE T", "/")
    with pytest.raises(ValueError, match="timeout"):
        client.get_json("/", timeout=-1)
    with pytest.raises(ValueError, match="json or content"):
        client.request("POST", "/", json=1, content=b"1")
    with pytest.raises(ValueError):
        client.post_json("/", json=float("nan"))
    assert upstream.seen == []


# --- processes -----------------------------------------------------------------------


def test_a_forked_child_builds_its_own_connection_pool(upstream: Upstream) -> None:
    client = tenuto.Client(upstream.url)
    assert client.get_json("/before")["path"] == "/before"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if client.get_json("/child")["path"] == "/child" else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung")
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.get_json("/after")["path"] == "/after"


WORKER = """
import sys, time, tenuto
url, redis_url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
limiter = tenuto.RateLimiter("1000/second", url=redis_url, name=sys.argv[4])
client = tenuto.Client(url, limiter=limiter, backoff=0.0, max_retry_after=30)
for i in range(n):
    client.get_json("/shared")
"""


def test_processes_sharing_a_redis_limiter_never_call_inside_a_retry_after(
    upstream: Upstream, redis_server: Any, namespace: str
) -> None:
    window: dict[str, float] = {}
    lock = threading.Lock()

    def answer(seen: Seen) -> Any:
        with lock:
            if not window:  # the first call is told to wait 1.5 s; everyone must
                window["until"] = seen.at + 1.5
                return (429, {"Retry-After": "1.5"}, "")
        return ok("fine")

    upstream.script("/shared", then=answer)

    def worker() -> subprocess.Popen[bytes]:
        args = [sys.executable, "-c", WORKER, upstream.url, redis_server.url, "5", namespace]
        return subprocess.Popen(args)

    # The first worker's first call gets the 429; the others start inside the window.
    workers = [worker()]
    wait_until(lambda: bool(window), timeout=30)
    workers += [worker() for _ in range(3)]
    for w in workers:
        assert w.wait(60) == 0
    hits = upstream.hits("/shared")
    assert len(hits) == 4 * 5 + 1
    first = min(h.at for h in hits)
    inside = [h.at - first for h in hits if first < h.at < window["until"] - 0.05]
    assert inside == [], f"calls inside the Retry-After window: {inside}"
