"""The Flask app the fault suite runs under gunicorn (`--preload -w 4 --threads 8`).

Configured by the environment the test sets (see `tests/chaos.py`):
CHAOS_REDIS_URL, CHAOS_NAMESPACE, CHAOS_COMMAND_TIMEOUT, CHAOS_UPSTREAM_SECONDS,
CHAOS_UPSTREAM_LOG (one line "pid key" per upstream call).
"""

from __future__ import annotations

import os
import time

from flask import Flask, g, jsonify, request

import tenuto
from tenuto.flask import Tenuto

ENV = os.environ
cache = tenuto.Cache(
    ENV["CHAOS_REDIS_URL"],
    namespace=ENV["CHAOS_NAMESPACE"],
    connect_timeout=0.25,
    command_timeout=float(ENV["CHAOS_COMMAND_TIMEOUT"]),
)
UPSTREAM_SECONDS = float(ENV["CHAOS_UPSTREAM_SECONDS"])
UPSTREAM_LOG = ENV["CHAOS_UPSTREAM_LOG"]

app = Flask(__name__)
Tenuto(
    app, cache=cache, stats_path="/stats", stats_guard=lambda: request.remote_addr == "127.0.0.1"
)


def record_upstream_call(key: str) -> None:
    """One short O_APPEND write per call: lines from concurrent workers do not interleave."""
    fd = os.open(UPSTREAM_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {key}\n".encode())
    finally:
        os.close(fd)


@cache.cached(ttl=60, stale_ttl=600)
def hot(key: str) -> dict:
    """A slow upstream whose answers stay fresh for the whole run: every call it gets
    after the warm-up is one an outage caused."""
    time.sleep(UPSTREAM_SECONDS)
    record_upstream_call(f"hot:{key}")
    return {"key": key, "pid": os.getpid()}


@cache.cached(ttl=1, stale_ttl=600)
def brief(key: str) -> dict:
    """Stale after a second: background refreshes run all through the faults."""
    time.sleep(UPSTREAM_SECONDS)
    record_upstream_call(f"brief:{key}")
    return {"key": key, "pid": os.getpid()}


@app.before_request
def start_timer() -> None:
    g.chaos_start = time.perf_counter()


@app.after_request
def server_time(response):
    # Time spent inside the worker, so the test can tell tenuto's latency from the
    # client's and the scheduler's.
    response.headers["X-Server-Seconds"] = f"{time.perf_counter() - g.chaos_start:.6f}"
    return response


@app.get("/hot/<key>")
def hot_view(key: str):
    return jsonify(hot(key))


@app.get("/brief/<key>")
def brief_view(key: str):
    return jsonify(brief(key))


@app.get("/probe/<key>")
def probe_view(key: str):
    """What this worker's cache finds under `key` now (the test writes it to Redis)."""
    found = cache.get(key)
    return jsonify(pid=os.getpid(), state=found.state, value=found.value)


@app.get("/health")
def health_view():
    return jsonify(pid=os.getpid(), stats=cache.stats())
