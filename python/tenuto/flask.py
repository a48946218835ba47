"""Flask integration: `X-Cache` / `X-Data-Stale` headers from the cached calls each request
made, and an optional stats view.

    app = Flask(__name__)
    cache = tenuto.Cache.from_env()
    Tenuto(app, cache=cache)                       # or Tenuto(cache=cache).init_app(app)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, Response, abort, current_app, g, jsonify, make_response, request

from tenuto._core import Cache, RequestState, _request_var, current_state
from tenuto._inbound import InboundLimit, check_trust_proxy, client_address

__all__ = ["Tenuto", "limit"]

F = TypeVar("F", bound=Callable[..., Any])


def limit(
    rate: str,
    key: Callable[[], str] | None = None,
    *,
    trust_proxy: int = 0,
    url: str | None = None,
    name: str | None = None,
) -> Callable[[F], F]:
    """Per-client limit on a view: `@limit("60/minute")`. Up to N requests back to back,
    never more than N in any sliding window. Refusals are HTTP 429 with a JSON
    `{"error": ...}` body and `Retry-After`; every response carries `RateLimit-Limit`,
    `RateLimit-Remaining` and `RateLimit-Reset`. The client is `key()` if given, else the
    peer address (X-Forwarded-For only with `trust_proxy=N` proxies in front). The counts
    are per app, not per worker: shared through Redis by every worker and host, per `name`
    (default: the view's module and name), when `url` names a Redis or, by default, when
    the app's `Tenuto(app, cache=...)` cache is on Redis; `url="memory://"` keeps them
    per process."""
    check_trust_proxy(trust_proxy)

    def decorate(view: F) -> F:
        inbound = InboundLimit(
            rate, trust_proxy, name or f"flask:{view.__module__}.{view.__qualname__}", url
        )

        @functools.wraps(view)
        def limited(*args: Any, **kwargs: Any) -> Any:
            client = (
                key()
                if key is not None
                else client_address(request.remote_addr, request.headers, trust_proxy)
            )
            extension = current_app.extensions.get("tenuto")
            app_cache = getattr(extension, "cache", None)
            ok, headers, message = inbound.decide(client, app_cache)
            if not ok:
                response = jsonify(error=message)
                response.status_code = 429
            else:
                response = make_response(view(*args, **kwargs))
            response.headers.update(headers)
            return response

        limited.inbound = inbound  # type: ignore[attr-defined]
        return limited  # type: ignore[return-value]

    return decorate


class Tenuto:
    """Opens a request scope around every request; after it, sets
    `X-Cache: hit|miss|stale` (the worst state of the request's cached calls) and
    `X-Data-Stale: 1` when stale data was served. Responses of requests that made no cached
    call get no header.

    `stats_path` (off by default) adds a JSON view of `cache.stats()`, served only when
    `stats_guard()` returns true: the view tells how the app's caches behave, so guard it.

    `metrics_path` (off by default, e.g. "/metrics") adds a Prometheus scrape view of every
    tenuto object in the process (`tenuto.metrics`; needs prometheus_client). Its labels
    carry no cache keys, so it may stay unguarded; `metrics_guard()` can still restrict it.
    """

    def __init__(
        self,
        app: Flask | None = None,
        cache: Cache | None = None,
        *,
        stats_path: str | None = None,
        stats_guard: Callable[[], bool] | None = None,
        metrics_path: str | None = None,
        metrics_guard: Callable[[], bool] | None = None,
    ) -> None:
        if stats_path is not None and cache is None:
            raise ValueError("stats_path needs cache=")
        if stats_path is not None and stats_guard is None:
            raise ValueError("stats_path needs stats_guard= (a function returning True to allow)")
        self.cache = cache
        self.stats_path = stats_path
        self.stats_guard = stats_guard
        self.metrics_path = metrics_path
        self.metrics_guard = metrics_guard
        if metrics_path is not None:
            from tenuto import metrics

            metrics.exposition()  # fails now, not at the first scrape, without prometheus_client
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.extensions["tenuto"] = self
        app.before_request(self._open_scope)
        app.after_request(self._set_headers)
        app.teardown_request(self._close_scope)
        if self.stats_path is not None:
            app.add_url_rule(self.stats_path, "tenuto_stats", self._stats_view)
        if self.metrics_path is not None:
            app.add_url_rule(self.metrics_path, "tenuto_metrics", self._metrics_view)

    @staticmethod
    def _open_scope() -> None:
        g._tenuto_scope = _request_var().set(RequestState())

    @staticmethod
    def _set_headers(response: Response) -> Response:
        state = current_state()
        if state is not None:
            response.headers["X-Cache"] = state
            if state == "stale":
                response.headers["X-Data-Stale"] = "1"
        return response

    @staticmethod
    def _close_scope(_exc: BaseException | None) -> None:
        token = g.pop("_tenuto_scope", None)
        if token is not None:
            _request_var().reset(token)

    def _stats_view(self) -> Any:
        assert self.cache is not None and self.stats_guard is not None
        if not self.stats_guard():
            abort(403)
        return jsonify(self.cache.stats())

    def _metrics_view(self) -> Any:
        from tenuto import metrics

        if self.metrics_guard is not None and not self.metrics_guard():
            abort(403)
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)
