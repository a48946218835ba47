"""`tenuto.Client`: the native `ClientCore` (the whole uncached call in Rust: limiter,
breaker, request, retries, JSON) plus cached calls. A cached call is a `@cache.cached`
load of the native call, so single-flight (threads, tasks, processes), stale-while-
revalidate and stale-if-error are the cache engine's, as for any cached function; the
load sends the stored ETag / Last-Modified, and a 304 keeps the stored body."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from tenuto._core import ClientCore

__all__ = ["Client"]

# Per-call options that are not part of the cache key (headers may hold credentials and
# do not select the resource), read by the load that runs for that call.
_CALL_OPTIONS: contextvars.ContextVar[tuple[Any, Any, Any]] = contextvars.ContextVar(
    "tenuto_client_call", default=(None, None, None)
)


class Client(ClientCore):
    """`Client(base_url, *, headers=None, timeout=10.0, connect_timeout=None, retries=3,
    backoff=0.2, max_retry_after=60.0, limiter=None, breaker=None, cache=None, http2=True,
    deadline=None, redact=None, retry_budget=0.2, max_backoff=30.0, clock=None)`.

    JSON over HTTP(S) with pooled connections (HTTP/2 where the server offers it, gzip and
    brotli). Every attempt waits for `limiter` (a `tenuto.RateLimiter`) and asks `breaker`
    (a `tenuto.CircuitBreaker`). Connect errors, timeouts, 5xx and 429 are retried up to
    `retries` times with full-jitter backoff (`backoff` × 2^n, at most `max_backoff`),
    while retries stay within `retry_budget` of the calls of the last 10 s (plus 3);
    other 4xx never are. A `Retry-After` is waited for and fed to the limiter (a Redis
    limiter pauses every process); one longer than `max_retry_after`, or than what is
    left of the call's `deadline` (seconds), raises `RateLimited` at once. `timeout` is
    per attempt. Query values of `key`, `token`, `api_key`, `password`, `secret`,
    `signature` (and the names in `redact`) and Authorization headers never appear in
    messages. With `cache` and a `ttl` per call, responses are cached (see `get_json`).
    """

    def __init__(self, base_url: str, *, cache: Any = None, **kwargs: Any) -> None:
        self._cache = cache
        # The cached functions behind cached calls: per (method, async), per (ttl, stale_ttl).
        self._loaders: dict[tuple[str, bool], dict[tuple[Any, Any], Any]] = {
            (method, is_async): {} for method in ("GET", "POST") for is_async in (False, True)
        }
        self._loaders[("GET", False)] = self._sync_gets  # read natively by get_json
        self._loaders_lock = threading.Lock()
        # Cached calls, and the loads they caused by the state they found (a load that
        # found a stale value is its refresh); every other call was served as a hit.
        self._loads = {"miss": 0, "stale": 0}
        self._not_modified = 0

    # --- calls: `get_json` is native (ClientCore), cached hits included -----------------

    def post_json(
        self,
        path: str,
        json: Any = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
        *,
        ttl: Any = None,
        stale_ttl: Any = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Any:
        """POST `json` to `path` and return the JSON answer; cached (keyed by the body too)
        only when given a `ttl`, for POSTs that read."""
        if ttl is None:
            return self._json("POST", path, params, headers, json, timeout, deadline)
        return self._cached("POST", path, params, json, headers, ttl, stale_ttl, timeout, deadline)

    async def aget_json(
        self,
        path: str,
        params: Any = None,
        headers: dict[str, str] | None = None,
        *,
        ttl: Any = None,
        stale_ttl: Any = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Any:
        """`get_json` for async code: the call runs on tenuto's runtime; cancelling the
        awaiting task cancels the request."""
        if ttl is None:
            return await self._ajson("GET", path, params, headers, None, timeout, deadline)
        return await self._acached(
            "GET", path, params, None, headers, ttl, stale_ttl, timeout, deadline
        )

    async def apost_json(
        self,
        path: str,
        json: Any = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
        *,
        ttl: Any = None,
        stale_ttl: Any = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Any:
        """`post_json` for async code."""
        if ttl is None:
            return await self._ajson("POST", path, params, headers, json, timeout, deadline)
        return await self._acached(
            "POST", path, params, json, headers, ttl, stale_ttl, timeout, deadline
        )

    def refresh_json(
        self, path: str, params: Any = None, *, ttl: Any, stale_ttl: Any = None
    ) -> Any:
        """Fetches a cached GET now (single-flighted, not a cached read) and stores it;
        returns the body. For prewarming: `ttl` and `stale_ttl` as the readers pass them."""
        if isinstance(params, (list, tuple)):
            params = sorted(params, key=repr)
        self._count_cached_call()
        return self._loader("GET", ttl, stale_ttl, False).refresh(path, params, None)["body"]

    async def arefresh_json(
        self, path: str, params: Any = None, *, ttl: Any, stale_ttl: Any = None
    ) -> Any:
        """`refresh_json` for async code."""
        if isinstance(params, (list, tuple)):
            params = sorted(params, key=repr)
        self._count_cached_call()
        loader = self._loader("GET", ttl, stale_ttl, True)
        return (await loader.refresh(path, params, None))["body"]

    def stats(self) -> dict[str, Any]:
        """Calls, requests (attempts), retries, statuses, errors, latency p50/p95/p99
        (seconds), and the states of cached calls."""
        stats = self._stats()
        misses, stale = self._loads["miss"], self._loads["stale"]
        stats["cache"] = {
            "hit": max(stats.pop("cached_calls") - misses - stale, 0),
            "stale": stale,
            "miss": misses,
            "not_modified": self._not_modified,
        }
        return stats

    # --- cached calls ------------------------------------------------------------------

    def _loader(self, method: str, ttl: Any, stale_ttl: Any, is_async: bool) -> Any:
        """The cached function behind cached calls of one method and TTL pair."""
        loaders = self._loaders[(method, is_async)]
        loader = loaders.get((ttl, stale_ttl))
        if loader is not None:
            return loader
        if self._cache is None:
            raise ValueError("ttl needs a cache: Client(..., cache=tenuto.Cache(...))")
        with self._loaders_lock:
            loader = loaders.get((ttl, stale_ttl))
            if loader is None:
                loader = self._make_loader(method, ttl, stale_ttl, is_async)
                loaders[(ttl, stale_ttl)] = loader
        return loader

    def _make_loader(self, method: str, ttl: Any, stale_ttl: Any, is_async: bool) -> Any:
        # The key is the method and base URL (in the name), path, params (a dict's keys
        # are sorted by the key's canonical JSON) and body.
        name = f"tenuto.client:{method} {self.base_url}"
        cache = self._cache
        revalidate = self._revalidate
        arevalidate = self._arevalidate
        client = self

        def envelope(prior: Any, answer: tuple[int, Any, Any, Any]) -> dict[str, Any]:
            status, value, etag, modified = answer
            if status == 304 and prior is not None:
                client._not_modified += 1
                return {
                    "body": prior["body"],
                    "etag": etag or prior.get("etag"),
                    "last_modified": modified or prior.get("last_modified"),
                }
            return {"body": value, "etag": etag, "last_modified": modified}

        def validators(found: Any) -> tuple[Any, Any]:
            """The stored value's ETag and Last-Modified; counts the load by state."""
            client._loads["stale" if found.state == "stale" else "miss"] += 1
            if isinstance(found.value, dict):
                return found.value.get("etag"), found.value.get("last_modified")
            return None, None

        if is_async:

            async def aload(path: str, params: Any, body: Any) -> Any:
                headers, timeout, deadline = _CALL_OPTIONS.get()
                found = await cache.aget(aloaded.key(path, params, body))
                etag, modified = validators(found)
                answer = await arevalidate(
                    method, path, params, headers, body, timeout, deadline, etag, modified
                )
                return envelope(found.value, answer)

            aloaded: Any = cache.cached(ttl=ttl, stale_ttl=stale_ttl, name=name)(aload)
            return aloaded

        def load(path: str, params: Any, body: Any) -> Any:
            headers, timeout, deadline = _CALL_OPTIONS.get()
            found = cache.get(loaded.key(path, params, body))
            etag, modified = validators(found)
            answer = revalidate(
                method, path, params, headers, body, timeout, deadline, etag, modified
            )
            return envelope(found.value, answer)

        loaded: Any = cache.cached(ttl=ttl, stale_ttl=stale_ttl, name=name)(load)
        return loaded

    def _cached(
        self,
        method: str,
        path: str,
        params: Any,
        body: Any,
        headers: Any,
        ttl: Any,
        stale_ttl: Any,
        timeout: Any,
        deadline: Any,
    ) -> Any:
        loader = self._loader(method, ttl, stale_ttl, False)
        self._count_cached_call()
        if isinstance(params, (list, tuple)):  # pairs in any order name one resource
            params = sorted(params, key=repr)
        if headers is None and timeout is None and deadline is None:
            return loader(path, params, body)["body"]
        token = _CALL_OPTIONS.set((headers, timeout, deadline))
        try:
            return loader(path, params, body)["body"]
        finally:
            _CALL_OPTIONS.reset(token)

    async def _acached(
        self,
        method: str,
        path: str,
        params: Any,
        body: Any,
        headers: Any,
        ttl: Any,
        stale_ttl: Any,
        timeout: Any,
        deadline: Any,
    ) -> Any:
        loader = self._loader(method, ttl, stale_ttl, True)
        self._count_cached_call()
        if isinstance(params, (list, tuple)):
            params = sorted(params, key=repr)
        token = _CALL_OPTIONS.set((headers, timeout, deadline))
        try:
            return (await loader(path, params, body))["body"]
        finally:
            _CALL_OPTIONS.reset(token)
