"""The FastAPI app the fault suite runs under uvicorn; the same routes and environment as
`chaos_flask_app`, with `async def` cached functions."""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI, Request

import tenuto
from tenuto.fastapi import TenutoMiddleware

ENV = os.environ
cache = tenuto.Cache(
    ENV["CHAOS_REDIS_URL"],
    namespace=ENV["CHAOS_NAMESPACE"],
    connect_timeout=0.25,
    command_timeout=float(ENV["CHAOS_COMMAND_TIMEOUT"]),
)
UPSTREAM_SECONDS = float(ENV["CHAOS_UPSTREAM_SECONDS"])
UPSTREAM_LOG = ENV["CHAOS_UPSTREAM_LOG"]

app = FastAPI()
app.add_middleware(TenutoMiddleware)


def record_upstream_call(key: str) -> None:
    fd = os.open(UPSTREAM_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {key}\n".encode())
    finally:
        os.close(fd)


@cache.cached(ttl=60, stale_ttl=600)
async def hot(key: str) -> dict:
    await asyncio.sleep(UPSTREAM_SECONDS)
    record_upstream_call(f"hot:{key}")
    return {"key": key, "pid": os.getpid()}


@cache.cached(ttl=1, stale_ttl=600)
async def brief(key: str) -> dict:
    await asyncio.sleep(UPSTREAM_SECONDS)
    record_upstream_call(f"brief:{key}")
    return {"key": key, "pid": os.getpid()}


@app.middleware("http")
async def server_time(request: Request, call_next):
    start = time.perf_counter()
    response = await call_next(request)
    response.headers["X-Server-Seconds"] = f"{time.perf_counter() - start:.6f}"
    return response


@app.get("/hot/{key}")
async def hot_view(key: str) -> dict:
    return await hot(key)


@app.get("/brief/{key}")
async def brief_view(key: str) -> dict:
    return await brief(key)


@app.get("/probe/{key}")
async def probe_view(key: str) -> dict:
    found = await cache.aget(key)
    return {"pid": os.getpid(), "state": found.state, "value": found.value}


@app.get("/health")
async def health_view() -> dict:
    return {"pid": os.getpid(), "stats": cache.stats()}
