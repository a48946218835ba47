"""OpenTelemetry spans for upstream loads, when `opentelemetry` is installed (extra
`tenuto[otel]`) and the app has set a tracer provider; nothing otherwise. A span wraps
the user function only when the cache calls it (a miss, a refresh): hits never see it.
Without a provider (the API's default proxy) a load skips the span machinery, which would
cost microseconds for spans nobody records."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

try:
    from opentelemetry import trace
except ImportError:  # the package is optional
    trace = None  # type: ignore[assignment]


def traced_load(fn: Callable[..., Any], function: str, backend: str) -> Callable[..., Any]:
    """`fn` inside a `tenuto.load` span (attributes: the function, `cache.hit` false, the
    backend, and `db.system.name` = redis on Redis), or `fn` itself without OpenTelemetry."""
    if trace is None:
        return fn
    tracer = trace.get_tracer("tenuto")
    attributes: dict[str, Any] = {
        "tenuto.function": function,
        "cache.hit": False,
        "tenuto.backend": backend,
    }
    if backend == "redis":
        attributes["db.system.name"] = "redis"

    untraced = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

    def recording() -> bool:
        return not isinstance(trace.get_tracer_provider(), untraced)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def traced_async(*args: Any, **kwargs: Any) -> Any:
            if not recording():
                return await fn(*args, **kwargs)
            with tracer.start_as_current_span("tenuto.load", attributes=attributes):
                return await fn(*args, **kwargs)

        return traced_async

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        if not recording():
            return fn(*args, **kwargs)
        with tracer.start_as_current_span("tenuto.load", attributes=attributes):
            return fn(*args, **kwargs)

    return traced
