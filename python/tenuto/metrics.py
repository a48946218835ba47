"""Prometheus metrics for every tenuto object in the process (``pip install
'tenuto[prometheus]'``). The counters are the native ones behind each ``stats()``: the
collector reads them when scraped, so hit paths do no extra work. No label carries a
cache key; labels name caches (namespaces), functions, limiters, breakers and registries.

```
tenuto.metrics.register()                       # into prometheus_client's default registry
tenuto.metrics.register(my_registry)            # or any CollectorRegistry
body, content_type = tenuto.metrics.exposition()  # the text a /metrics view returns
```

Flask: ``Tenuto(app, metrics_path="/metrics")``; FastAPI:
``app.include_router(tenuto.fastapi.metrics_router())``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from tenuto import _live
from tenuto._core import all_cache_stats

__all__ = ["TenutoCollector", "exposition", "register"]

_RESULTS = ("hit", "stale", "miss", "error")
_FAIL_OPEN_REASONS = {
    "backend_error": "backend_errors",
    "refused_write": "refused_writes",
    "decode_error": "decode_errors",
}
# tenuto_breaker_state: 0 closed, 1 half-open, 2 open.
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # noqa: F401 - the metric families
    except ImportError as exc:  # pragma: no cover - the message is the point
        raise ImportError(
            "tenuto.metrics needs prometheus_client: pip install 'tenuto[prometheus]'"
        ) from exc
    return prometheus_client


class TenutoCollector:
    """A prometheus_client collector of every live cache, cached function, limiter,
    breaker and ID registry. Caches sharing a namespace are summed."""

    def collect(self) -> Iterator[Any]:
        core = _prometheus().core
        caches = all_cache_stats()

        requests = core.CounterMetricFamily(
            "tenuto_cache_requests",
            "Cache lookups by tier and result (a cached call counts once).",
            labels=["cache", "tier", "result"],
        )
        coalesced = core.CounterMetricFamily(
            "tenuto_cache_coalesced",
            "Calls that shared another caller's read or load.",
            labels=["cache"],
        )
        fail_open = core.CounterMetricFamily(
            "tenuto_cache_fail_open",
            "Backend faults absorbed: calls served from memory instead.",
            labels=["cache", "reason"],
        )
        backend_up = core.GaugeMetricFamily(
            "tenuto_backend_up",
            "1 while the cache's backend answers, 0 while it is marked down.",
            labels=["cache"],
        )
        counts: dict[tuple[str, str, str], int] = defaultdict(int)
        other: dict[tuple[str, str], int] = defaultdict(int)
        up: dict[str, int] = {}
        for stats in caches:
            name = stats["namespace"]
            tier = stats["backend"]
            local_hits = stats.get("local_hits", 0)
            counts[name, tier, "hit"] += stats["hits"] - local_hits
            counts[name, tier, "stale"] += stats["stale_hits"]
            counts[name, tier, "miss"] += stats["misses"]
            counts[name, tier, "error"] += stats["errors"]
            if "local_hits" in stats:
                counts[name, "local", "hit"] += local_hits
                for result in ("stale", "miss", "error"):
                    counts[name, "local", result] += 0
            other[name, "coalesced"] += stats["coalesced"]
            for reason, key in _FAIL_OPEN_REASONS.items():
                other[name, reason] += stats[key]
            up[name] = min(up.get(name, 1), 0 if stats["degraded"] else 1)
        for (name, tier, result), value in sorted(counts.items()):
            requests.add_metric([name, tier, result], value)
        for name in sorted(up):
            coalesced.add_metric([name], other[name, "coalesced"])
            for reason in _FAIL_OPEN_REASONS:
                fail_open.add_metric([name, reason], other[name, reason])
            backend_up.add_metric([name], up[name])
        yield requests
        yield coalesced
        yield fail_open
        yield backend_up
        yield from self._upstream(core)
        yield from self._limits(core)
        yield from self._registries(core)

    @staticmethod
    def _upstream(core: Any) -> Iterator[Any]:
        calls = core.CounterMetricFamily(
            "tenuto_upstream_calls",
            "Calls of cached functions to their upstream (loads and refreshes).",
            labels=["function", "outcome"],
        )
        seconds = core.HistogramMetricFamily(
            "tenuto_upstream_seconds",
            "Duration of cached functions' upstream calls.",
            labels=["function"],
        )
        merged: dict[str, dict[str, Any]] = {}
        for fn in list(_live.functions):
            stats = fn._upstream_stats()
            into = merged.setdefault(
                stats["name"],
                {"ok": 0, "errors": 0, "buckets": None, "sum": 0.0},
            )
            into["ok"] += stats["ok"]
            into["errors"] += stats["errors"]
            into["sum"] += stats["sum"]
            if into["buckets"] is None:
                into["buckets"] = [list(b) for b in stats["buckets"]]
            else:
                for mine, theirs in zip(into["buckets"], stats["buckets"]):
                    mine[1] += theirs[1]
        for name in sorted(merged):
            stats = merged[name]
            calls.add_metric([name, "ok"], stats["ok"])
            calls.add_metric([name, "error"], stats["errors"])
            buckets = [("+Inf" if math.isinf(le) else repr(le), n) for le, n in stats["buckets"]]
            seconds.add_metric([name], buckets, stats["sum"])
        yield calls
        yield seconds

    @staticmethod
    def _limits(core: Any) -> Iterator[Any]:
        decisions = core.CounterMetricFamily(
            "tenuto_ratelimit_decisions",
            "Rate-limiter answers: admitted, refused, and pauses after an upstream 429.",
            labels=["limiter", "decision"],
        )
        totals: dict[tuple[str, str], int] = defaultdict(int)
        for limiter in list(_live.limiters):
            stats = limiter.stats()
            totals[stats["name"], "admitted"] += stats["admitted"]
            totals[stats["name"], "refused"] += stats["refused"]
            totals[stats["name"], "paused"] += stats["throttle_events"]
        for (name, decision), value in sorted(totals.items()):
            decisions.add_metric([name, decision], value)
        yield decisions
        state = core.GaugeMetricFamily(
            "tenuto_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["breaker"],
        )
        states: dict[str, int] = {}
        for breaker in list(_live.breakers):
            stats = breaker.stats()
            value = _BREAKER_STATES.get(stats["state"], 0)
            states[stats["name"]] = max(states.get(stats["name"], 0), value)
        for name in sorted(states):
            state.add_metric([name], states[name])
        yield state

    @staticmethod
    def _registries(core: Any) -> Iterator[Any]:
        lookups = core.CounterMetricFamily(
            "tenuto_registry_lookups",
            "ID registry answers: validated, known missing, unknown.",
            labels=["registry", "result"],
        )
        totals: dict[tuple[str, str], int] = defaultdict(int)
        for registry in list(_live.registries):
            stats = registry.stats()
            for result in ("validated", "missing", "unknown"):
                totals[stats["name"], result] += stats[result]
        for (name, result), value in sorted(totals.items()):
            lookups.add_metric([name, result], value)
        yield lookups


_registered: set[int] = set()
_own_registry: Any = None


def register(registry: Any = None) -> TenutoCollector:
    """Adds the collector to `registry` (prometheus_client's default when None), once."""
    prometheus = _prometheus()
    target = prometheus.REGISTRY if registry is None else registry
    collector = TenutoCollector()
    if id(target) not in _registered:
        target.register(collector)
        _registered.add(id(target))
    return collector


def exposition() -> tuple[bytes, str]:
    """`(body, content type)` of a scrape of tenuto's metrics alone."""
    global _own_registry
    prometheus = _prometheus()
    if _own_registry is None:
        _own_registry = prometheus.CollectorRegistry(auto_describe=False)
        _own_registry.register(TenutoCollector())
    return prometheus.generate_latest(_own_registry), prometheus.CONTENT_TYPE_LATEST
