"""A Flask service whose slow upstream sits behind tenuto.

    REDIS_URL=redis://127.0.0.1:6379/0 gunicorn --preload -w 2 --threads 4 examples.flask_app:app

Without REDIS_URL (or TENUTO_URL) the cache is in memory.
"""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify, request

import tenuto
from tenuto.flask import Tenuto

app = Flask(__name__)
cache = tenuto.Cache.from_env(namespace="flask-demo")
Tenuto(
    app, cache=cache, stats_path="/stats", stats_guard=lambda: request.remote_addr == "127.0.0.1"
)
UPSTREAM_SECONDS = float(os.environ.get("UPSTREAM_SECONDS", "0.3"))


@cache.cached(ttl=300, stale_ttl=3600)
def trending(country: str, limit: int = 10) -> dict:
    """Stands in for a slow, rate-limited upstream API."""
    time.sleep(UPSTREAM_SECONDS)
    if log_path := os.environ.get("UPSTREAM_LOG"):  # lets the tests count upstream calls
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()} {country}\n")
    return {
        "country": country,
        "tracks": [f"{country}-{i}" for i in range(limit)],
        "pid": os.getpid(),
    }


@app.get("/trending/<country>")
def trending_view(country: str):
    return jsonify(trending(country, int(request.args.get("limit", 10))))
