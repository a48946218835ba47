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

from fastapi import APIRouter, Depends, HTTPException, Request

from tenuto._core import Cache, RequestState, _request_var

__all__ = ["TenutoMiddleware", "stats_router"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TenutoMiddleware:
    """Opens a request scope for every HTTP request and adds `X-Cache: hit|miss|stale`
    (the worst state of its cached calls) and `X-Data-Stale: 1` when stale data was
    served. Pure ASGI: no BaseHTTPMiddleware, so streaming and background tasks work."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
    true for the request to be served (else 403); without a guard the route is open, so
    mount it only where that is fine."""
    router = APIRouter()

    async def allowed(request: Request) -> None:
        if guard is None:
            return
        verdict = guard(request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if not verdict:
            raise HTTPException(status_code=403, detail="stats are not available to this client")

    @router.get(path, dependencies=[Depends(allowed)])
    def tenuto_stats() -> dict[str, Any]:
        return cache.stats()

    return router
