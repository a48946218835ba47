"""FastAPI / Starlette integration: a pure ASGI middleware that sets `X-Cache` /
`X-Data-Stale` from the cached calls each request made, and a guarded stats router.

    app = FastAPI()
    app.add_middleware(TenutoMiddleware)
    app.include_router(stats_router(cache, guard=is_admin))
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from tenuto._core import Cache, RequestState, _request_var
from tenuto._inbound import InboundLimit, client_address
from tenuto._limits import RateLimiter

__all__ = [
    "RateLimit",
    "RateLimitExceeded",
    "TenutoMiddleware",
    "rate_limit_handler",
    "stats_router",
]


class RateLimitExceeded(HTTPException):
    """A 429 from `RateLimit`; `rate_limit_handler` renders it as `{"error": ...}`."""


async def rate_limit_handler(request: Request, exc: Exception) -> JSONResponse:
    """`app.add_exception_handler(RateLimitExceeded, rate_limit_handler)`: 429 bodies as
    `{"error": "..."}` instead of FastAPI's `{"detail": "..."}`."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class RateLimit:
    """Per-client limit as a dependency: `Depends(RateLimit("60/minute"))`. Up to N
    requests back to back, never more than N in any sliding window; refusals raise
    `RateLimitExceeded` (HTTP 429 with `Retry-After`); every response gets
    `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`. The client is
    `key(request)` if given, else the peer address (X-Forwarded-For only with
    `trust_proxy=N` proxies in front). The counts are per app, not per worker: shared
    through Redis by every worker and host, per `name` (default `"fastapi:{rate}"`: name
    dependencies that should not share a budget), when `url` names a Redis or, by
    default, when the app's `TenutoMiddleware` was given a Redis-backed `cache=`;
    `url="memory://"` keeps them per process."""

    def __init__(
        self,
        rate: str,
        key: Callable[[Request], str] | None = None,
        *,
        trust_proxy: int = 0,
        url: str | None = None,
        name: str | None = None,
    ) -> None:
        self.inbound = InboundLimit(rate, trust_proxy, name or f"fastapi:{rate}", url)
        self.key = key

    @property
    def limiter(self) -> RateLimiter:
        """The limiter behind this dependency (made at the first request)."""
        return self.inbound.limiter

    def __call__(self, request: Request, response: Response) -> None:
        if self.key is not None:
            client = self.key(request)
        else:
            peer = request.client.host if request.client else None
            client = client_address(peer, request.headers, self.inbound.trust_proxy)
        app_cache = getattr(request.app.state, "tenuto_cache", None)
        ok, headers, message = self.inbound.decide(client, app_cache)
        if not ok:
            raise RateLimitExceeded(status_code=429, detail=message, headers=headers)
        response.headers.update(headers)


# FastAPI reads the annotations of a dependency instance's `__call__`; postponed (string)
# annotations cannot be resolved there on Python 3.9 (an instance has no __globals__), and
# `request` would be taken for a query parameter. Real classes work on every version.
RateLimit.__call__.__annotations__.update(request=Request, response=Response)


Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TenutoMiddleware:
    """Opens a request scope for every HTTP request and adds `X-Cache: hit|miss|stale`
    (the worst state of its cached calls) and `X-Data-Stale: 1` when stale data was
    served. Pure ASGI: no BaseHTTPMiddleware, so streaming and background tasks work.

    `cache=` (optional): the app's cache; when it is on Redis, the app's `RateLimit`
    dependencies share that Redis (limits per app, not per worker)."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], cache: Cache | None = None
    ) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.cache is not None and "app" in scope:
            scope["app"].state.tenuto_cache = self.cache
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = RequestState()
        var = _request_var()
        token = var.set(state)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and state.state is not None:
                headers = list(message.get("headers", []))
                headers.append((b"x-cache", state.state.encode()))
                if state.state == "stale":
                    headers.append((b"x-data-stale", b"1"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            var.reset(token)


Guard = Callable[[Request], "bool | Awaitable[bool]"]


def stats_router(cache: Cache, *, guard: Guard | None = None, path: str = "/stats") -> APIRouter:
    """`GET {path}`: `cache.stats()` as JSON. `guard(request)` (sync or async) must return
    true for the request to be served (else 403). The guard is required, as on Flask: the
    view tells how the app's caches behave (pass `guard=lambda request: True` to open it
    on purpose)."""
    if guard is None:
        raise ValueError(
            "stats_router needs guard= (a function of the request returning True to allow)"
        )
    router = APIRouter()

    async def allowed(request: Request) -> None:
        verdict = guard(request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if not verdict:
            raise HTTPException(status_code=403, detail="stats are not available to this client")

    @router.get(path, dependencies=[Depends(allowed)])
    def tenuto_stats() -> dict[str, Any]:
        return cache.stats()

    return router


def metrics_router(*, path: str = "/metrics", guard: Guard | None = None) -> APIRouter:
    """`GET {path}`: a Prometheus scrape of every tenuto object in the process
    (`tenuto.metrics`; needs prometheus_client). Labels carry no cache keys, so the
    guard is optional; `guard(request)` (sync or async) returning false answers 403."""
    from tenuto import metrics

    metrics.exposition()  # fails now, not at the first scrape, without prometheus_client
    router = APIRouter()

    async def allowed(request: Request) -> None:
        if guard is None:
            return
        verdict = guard(request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if not verdict:
            raise HTTPException(status_code=403, detail="metrics are not available to this client")

    @router.get(path, dependencies=[Depends(allowed)])
    def tenuto_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(content=body, media_type=content_type)

    return router
