"""A FastAPI service whose slow upstream sits behind tenuto.

REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI, Request

import tenuto
from tenuto.fastapi import TenutoMiddleware, stats_router

app = FastAPI()
app.add_middleware(TenutoMiddleware)
cache = tenuto.Cache.from_env(namespace="fastapi-demo")
app.include_router(stats_router(cache, guard=lambda request: request.client.host == "127.0.0.1"))
UPSTREAM_SECONDS = float(os.environ.get("UPSTREAM_SECONDS", "0.3"))
upstream_calls = 0


@cache.cached(ttl=300, stale_ttl=3600)
async def recommendations(seed: str, limit: int = 5) -> dict:
    """Stands in for a recommendation API that takes a long time per call."""
    global upstream_calls
    upstream_calls += 1
    await asyncio.sleep(UPSTREAM_SECONDS)
    return {"seed": seed, "tracks": [f"{seed}-rec-{i}" for i in range(limit)]}


@app.get("/recommendations/{seed}")
async def recommendations_view(seed: str, request: Request) -> dict:
    result = await recommendations(seed)
    return {**result, "upstream_calls": upstream_calls}
