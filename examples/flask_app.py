"""A Flask service over a YouTube-Music-like API, its slow upstream calls behind tenuto.

    python examples/upstream.py --port 8900 &
    UPSTREAM_URL=http://127.0.0.1:8900 REDIS_URL=redis://127.0.0.1:6379/0 \\
        gunicorn --preload -w 2 --threads 8 examples.flask_app:app

Without REDIS_URL (or TENUTO_URL) the cache is in memory. `create_app(upstream_url, cache,
use_tenuto=False)` is the same app with no tenuto at all: every request calls the upstream
(the demo's baseline).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Optional

import httpx
from flask import Flask, jsonify, request

import tenuto
from tenuto.flask import Tenuto, limit


class UpstreamError(Exception):
    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.retry_after = retry_after


def create_app(
    upstream_url: str, cache: tenuto.Cache | None = None, use_tenuto: bool = True
) -> Flask:
    if use_tenuto and cache is None:
        raise ValueError("create_app needs a cache= with use_tenuto=True")
    app = Flask(__name__)
    http = httpx.Client(base_url=upstream_url, timeout=10)
    app.extensions["upstream"] = http  # closed by whoever stops the app

    def upstream_json(method: str, path: str, **kwargs: Any) -> Any:
        """Every upstream call goes through here (the one place a tenuto.Client would
        replace). A 404 is None: "no such record" is an answer, not a failure."""
        agent = {"User-Agent": f"flask-app/{os.getpid()}"}  # the worker's, after a fork
        response = http.request(method, path, headers=agent, **kwargs)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise UpstreamError(response.status_code, response.headers.get("Retry-After"))
        return response.json()

    if use_tenuto:
        assert cache is not None
        Tenuto(app, cache=cache, stats_path="/stats", stats_guard=from_loopback)
        prefix = cache.stats()["namespace"]
        # After 5 failed calls in a row the upstream is left alone for 30 s; meanwhile the
        # cached functions serve their stale values without trying it.
        breaker = tenuto.CircuitBreaker(failures=5, reset_after=30, name=f"{prefix}:ytm")
        cached = functools.partial(cache.cached, breaker=breaker)

        def limited(rate: str, name: str) -> Callable[[Any], Any]:
            # Per API key (else per address), shared by every worker through the cache's
            # Redis; the name keeps two apps on one Redis apart.
            return limit(rate, key=api_key, name=f"{prefix}:{name}")
    else:
        cached = limited = no_decorator

    # -- the upstream calls: only these know tenuto --------------------------------------

    @cached(ttl="10m", stale_ttl="1d", name="trending")
    def trending(country: str, limit: int) -> dict:
        return upstream_json("GET", "/ytm/trending", params={"country": country, "limit": limit})

    @cached(ttl="1h", stale_ttl="1d", name="billboard")
    def billboard() -> dict:
        return upstream_json("GET", "/ytm/billboard")

    # Songs with no lyrics stay without for a while: keep that answer 12 h, then 24 h...
    # up to a week, instead of asking again on every request.
    @cached(
        ttl="6h",
        stale_ttl="7d",
        name="lyrics",
        negative=tenuto.Backoff(base=12 * 3600, factor=2, max=7 * 86400),
    )
    def lyrics(song_id: str) -> Optional[dict]:  # noqa: UP045 (read at run time, on 3.9 too)
        return upstream_json("GET", f"/ytm/lyrics/{song_id}")

    @cached(ttl="30m", stale_ttl="1d", name="artist_songs")
    def artist_songs(artist_id: str) -> dict:
        return upstream_json("GET", f"/ytm/artist/{artist_id}/songs")

    # -- the views: unchanged from an app without a cache --------------------------------

    @app.get("/trending")
    @limited("60/minute", "trending")
    def trending_view():
        country = request.args.get("country", "US").upper()
        return trending(country, request.args.get("limit", 20, type=int))

    @app.get("/billboard")
    @limited("60/minute", "billboard")
    def billboard_view():
        return billboard()

    @app.get("/lyrics/<song_id>")
    @limited("120/minute", "lyrics")
    def lyrics_view(song_id: str):
        found = lyrics(song_id)
        return {"id": song_id, "lyrics": found["lyrics"] if found else None}

    @app.get("/artist/<artist_id>/songs")
    @limited("60/minute", "artist_songs")
    def artist_songs_view(artist_id: str):
        return artist_songs(artist_id)

    @app.post("/songs")
    @limited("10/minute", "songs")
    def add_song():
        song = request.get_json(force=True)
        created = upstream_json("POST", "/ytm/songs", json=song)
        if use_tenuto:
            artist_songs.invalidate(song["artist"])  # the next read sees the new song
        return created, 201

    @app.get("/health")
    def health():
        if not use_tenuto:
            return {"status": "ok", "cache": None}
        assert cache is not None
        stats = cache.stats()
        keys = ("backend", "degraded", "hit_rate", "stale_rate")
        return {"status": "ok", "cache": {key: stats[key] for key in keys}}

    @app.errorhandler(UpstreamError)
    def upstream_failed(exc: UpstreamError):
        response = jsonify(error=str(exc))
        response.status_code = 503 if exc.status in (429, 503) else 502
        if exc.retry_after:
            response.headers["Retry-After"] = exc.retry_after
        return response

    @app.errorhandler(httpx.HTTPError)
    def upstream_unreachable(exc: httpx.HTTPError):
        return jsonify(error=f"upstream unreachable: {exc}"), 502

    return app


def api_key() -> str:
    return request.headers.get("X-Api-Key") or request.remote_addr or "unknown"


def from_loopback() -> bool:
    return request.remote_addr == "127.0.0.1"


def no_decorator(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
    """Stands in for `cache.cached(...)` and `limit(...)` in the app without tenuto."""
    return lambda function: function


def __getattr__(name: str) -> Any:
    """`examples.flask_app:app` for gunicorn: made on first access, from UPSTREAM_URL and
    the cache named by TENUTO_URL / REDIS_URL (memory without)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    upstream_url = os.environ.get("UPSTREAM_URL")
    if not upstream_url:
        raise RuntimeError("set UPSTREAM_URL (python examples/upstream.py prints one)")
    app = create_app(upstream_url, tenuto.Cache.from_env(namespace="flask-demo"))
    globals()["app"] = app
    return app
