"""A FastAPI service over a recommendation API that takes 20-70 s a call and admits 80
calls a minute: the recommendation workflow, behind tenuto.

    python examples/upstream.py --port 8900 &
    UPSTREAM_URL=http://127.0.0.1:8900 REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn examples.fastapi_app:app

`GET /recommendations?seeds=<spotify id>,<spotify id>...`:
1. Spotify IDs to the API's own IDs through the `tenuto.IdRegistry` (known pairs and
   known-missing IDs answered from the cache, the rest resolved upstream in batches);
2. audio features from the upstream (cached for 30 days), completed with
   `tenuto.Defaults` where the upstream has a field missing, null or out of range;
3. recommendations for those tracks, cached for 90 days.
Every upstream call goes through one outbound `tenuto.RateLimiter` (the API's 80/minute)
and one `tenuto.CircuitBreaker`. `create_app(upstream_url, cache, use_tenuto=False)` is the
same workflow with no cache, registry, limiter or breaker (the demo's baseline).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

import tenuto
from tenuto.fastapi import (
    RateLimit,
    RateLimitExceeded,
    TenutoMiddleware,
    rate_limit_handler,
    stats_router,
)


class UpstreamError(Exception):
    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.retry_after = retry_after


def create_app(
    upstream_url: str,
    cache: tenuto.Cache | None = None,
    use_tenuto: bool = True,
    *,
    limits_url: str | None = None,
) -> FastAPI:
    """`limits_url`: a Redis that every worker's limiter and breaker share (the API's 80
    calls a minute are for the whole service); None keeps them per process."""
    if use_tenuto and cache is None:
        raise ValueError("create_app needs a cache= with use_tenuto=True")
    clients: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        for client in clients.values():
            await client.aclose()

    app = FastAPI(lifespan=lifespan)
    features = tenuto.Defaults(tenuto.AUDIO_FEATURE_DEFAULTS, tenuto.AUDIO_FEATURE_RANGES)

    if use_tenuto:
        assert cache is not None
        prefix = cache.stats()["namespace"]
        # The API's own limit, spread out; a burst of 40 lets a cold start go at once
        # and still stays under 80 in any minute. At most 6 calls in flight.
        limiter = tenuto.RateLimiter(
            "80/minute", burst=40, max_concurrency=6, url=limits_url, name=prefix
        )
        breaker = tenuto.CircuitBreaker(failures=5, reset_after=30, url=limits_url, name=prefix)
        registry = tenuto.IdRegistry(cache, name="reccobeat")
        cached = cache.cached
        app.add_middleware(TenutoMiddleware, cache=cache)
        app.add_exception_handler(RateLimitExceeded, rate_limit_handler)
        app.include_router(stats_router(cache, guard=from_loopback))
        inbound = [Depends(RateLimit("60/minute", key=api_key, name=f"{prefix}:recommendations"))]
    else:
        cached = no_decorator
        inbound = []

    async def upstream_json(method: str, path: str, **kwargs: Any) -> Any:
        """Every upstream call goes through here (the one place a tenuto.Client would
        replace): through the breaker and the limiter, telling the limiter about 429s."""
        client = clients.get("http")
        if client is None:  # made on the serving loop, closed by the lifespan
            agent = {"User-Agent": f"fastapi-app/{os.getpid()}"}
            client = clients["http"] = httpx.AsyncClient(
                base_url=upstream_url, timeout=10, headers=agent
            )
        if not use_tenuto:
            return checked(await client.request(method, path, **kwargs))
        async with breaker, limiter:
            response = await client.request(method, path, **kwargs)
            if response.status_code == 429:
                retry_after = float(response.headers.get("Retry-After", "1"))
                await limiter.afeedback(429, retry_after=retry_after)
            return checked(response)

    # -- the upstream calls ------------------------------------------------------------

    async def resolve_batch(spotify_ids: list[str]) -> dict[str, str]:
        body = await upstream_json("POST", "/reco/resolve", json={"ids": spotify_ids})
        return body["found"]

    @cached(ttl="30d", stale_ttl="180d", name="audio_features")
    async def audio_features(reco_ids: list[str]) -> dict:
        params = {"ids": ",".join(reco_ids)}
        return (await upstream_json("GET", "/reco/audio-features", params=params))["features"]

    @cached(ttl="90d", stale_ttl="180d", name="recommendations")
    async def recommendations(reco_ids: list[str], size: int) -> dict:
        params = {"seeds": ",".join(reco_ids), "size": size}
        return await upstream_json("GET", "/reco/recommendations", params=params)

    # -- the workflow --------------------------------------------------------------------

    async def resolve(spotify_ids: list[str]) -> dict[str, Any]:
        if not use_tenuto:
            found = await resolve_batch(spotify_ids)
            return {spotify_id: found.get(spotify_id) for spotify_id in spotify_ids}
        try:
            return await registry.resolve(spotify_ids, resolve_batch, batch_size=50)
        except tenuto.ResolveError as exc:
            # The upstream is down: IDs the registry knows are enough to go on; the others
            # are resolved on a later request.
            return exc.partial

    @app.get("/recommendations", dependencies=inbound)
    async def recommendations_view(seeds: str, size: int = 10) -> dict:
        spotify_ids = [seed for seed in seeds.split(",") if seed]
        resolved = await resolve(spotify_ids)
        reco_ids = sorted({reco_id for reco_id in resolved.values() if reco_id})
        if not reco_ids:
            return {"seeds": resolved, "features": {}, "tracks": []}
        fetched = await audio_features(reco_ids)
        complete = features.complete_many({reco_id: {} for reco_id in reco_ids}, fetched)
        found = await recommendations(reco_ids, size)
        return {"seeds": resolved, "features": complete, "tracks": found["tracks"]}

    @app.get("/health")
    async def health() -> dict:
        if not use_tenuto:
            return {"status": "ok", "cache": None}
        stats = cache.stats()  # type: ignore[union-attr]
        return {
            "status": "ok",
            "cache": {key: stats[key] for key in ("backend", "degraded", "hit_rate")},
            "breaker": breaker.state,
            "registry": registry.stats(),
        }

    @app.exception_handler(UpstreamError)
    async def upstream_failed(_request: Request, exc: UpstreamError) -> JSONResponse:
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
        status = 503 if exc.status in (429, 503) else 502
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(tenuto.CircuitOpen)
    async def circuit_open(_request: Request, exc: tenuto.CircuitOpen) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        return JSONResponse({"error": "upstream circuit open"}, status_code=503, headers=headers)

    @app.exception_handler(httpx.HTTPError)
    async def upstream_unreachable(_request: Request, exc: httpx.HTTPError) -> JSONResponse:
        return JSONResponse({"error": f"upstream unreachable: {exc}"}, status_code=502)

    return app


def checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise UpstreamError(response.status_code, response.headers.get("Retry-After"))
    return response.json()


def api_key(request: Request) -> str:
    return request.headers.get("x-api-key") or (request.client.host if request.client else "-")


def from_loopback(request: Request) -> bool:
    return request.client is not None and request.client.host == "127.0.0.1"


def no_decorator(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
    """Stands in for `cache.cached(...)` in the app without tenuto."""
    return lambda function: function


def __getattr__(name: str) -> Any:
    """`examples.fastapi_app:app` for uvicorn: made on first access, from UPSTREAM_URL and
    the cache named by TENUTO_URL / REDIS_URL (memory without)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    upstream_url = os.environ.get("UPSTREAM_URL")
    if not upstream_url:
        raise RuntimeError("set UPSTREAM_URL (python examples/upstream.py prints one)")
    url = os.environ.get("TENUTO_URL") or os.environ.get("REDIS_URL")
    limits_url = url if url and not url.startswith("memory:") else None
    app = create_app(
        upstream_url, tenuto.Cache.from_env(namespace="fastapi-demo"), limits_url=limits_url
    )
    globals()["app"] = app
    return app
