"""Extreme numbers through the public API: every one is accepted or refused with a
ValueError/TypeError that names the argument; none panics (a PanicException is a
BaseException that `except Exception` misses) or overflows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import tenuto
from tenuto.testing import FakeClock

EXTREMES = [1e300, -1e300, float("inf"), float("nan"), 2**70, -(2**70), 2**63, 1e11, 0, -1]


def calls(x: Any) -> dict[str, Callable[[], object]]:
    cache = tenuto.Cache()
    limiter = tenuto.RateLimiter("5/minute")
    return {
        "Cache(max_entries)": lambda: tenuto.Cache(max_entries=x),
        "Cache(jitter)": lambda: tenuto.Cache(jitter=x),
        "Cache(max_value_bytes)": lambda: tenuto.Cache(max_value_bytes=x),
        "Cache(connect_timeout)": lambda: tenuto.Cache("redis://127.0.0.1:1", connect_timeout=x),
        "Cache(command_timeout)": lambda: tenuto.Cache("redis://127.0.0.1:1", command_timeout=x),
        "set(ttl)": lambda: cache.set("k", 1, ttl=x),
        "set(stale_ttl)": lambda: cache.set("k", 1, ttl=1, stale_ttl=x),
        "cached(ttl)": lambda: cache.cached(ttl=x)(lambda a: a)(1),
        "cached(lock_ttl)": lambda: cache.cached(ttl=1, lock_ttl=x)(lambda a: a)(1),
        "cached(wait_timeout)": lambda: cache.cached(ttl=1, wait_timeout=x)(lambda a: a)(1),
        "Backoff(base)": lambda: tenuto.Backoff(base=x),
        "Backoff(max)": lambda: tenuto.Backoff(base=1, max=x),
        "Backoff(factor)": lambda: cache.cached(
            ttl=1, negative=tenuto.Backoff(base=1, factor=x, max=10), name=f"f{x}"
        )(lambda a: None)(1),
        "RateLimiter(min_interval)": lambda: tenuto.RateLimiter("5/minute", min_interval=x),
        "RateLimiter(max_concurrency)": lambda: tenuto.RateLimiter("5/minute", max_concurrency=x),
        "RateLimiter(burst)": lambda: tenuto.RateLimiter("5/minute", burst=x),
        "RateLimiter(max_keys)": lambda: tenuto.RateLimiter("5/minute", max_keys=x),
        "RateLimiter(lease_ttl)": lambda: tenuto.RateLimiter("5/minute", lease_ttl=x),
        "feedback(status)": lambda: limiter.feedback(status=x),
        "feedback(retry_after)": lambda: limiter.feedback(status=429, retry_after=x),
        "CircuitBreaker(failures)": lambda: tenuto.CircuitBreaker(failures=x),
        "CircuitBreaker(reset_after)": lambda: tenuto.CircuitBreaker(reset_after=x),
        "CircuitBreaker(half_open_max)": lambda: tenuto.CircuitBreaker(half_open_max=x),
        "CircuitBreaker(window)": lambda: tenuto.CircuitBreaker(failure_rate=0.5, window=x),
        "CircuitBreaker(failure_rate)": lambda: tenuto.CircuitBreaker(failure_rate=x),
        "CircuitBreaker(min_calls)": lambda: tenuto.CircuitBreaker(failure_rate=0.5, min_calls=x),
        "IdRegistry(validated_ttl)": lambda: tenuto.IdRegistry(cache, validated_ttl=x),
        "IdRegistry(missing_ttl)": lambda: tenuto.IdRegistry(cache, missing_ttl=x),
        "FakeClock()": lambda: FakeClock(x),
        "FakeClock.advance": lambda: FakeClock().advance(x),
    }


@pytest.mark.parametrize("x", EXTREMES, ids=repr)
def test_extreme_numbers_never_panic_or_overflow(x: Any) -> None:
    failures = []
    for name, call in calls(x).items():
        try:
            call()
        except (ValueError, TypeError):
            pass  # refused, by name
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # a Rust panic surfaces as a BaseException
            failures.append(f"{name}: PANIC {type(exc).__name__}: {exc}")
    assert failures == []


def test_limits_never_overflow_their_clocks() -> None:
    with pytest.raises(ValueError, match="100000days"):
        tenuto.RateLimiter("1/100000days")
    limiter = tenuto.RateLimiter("5/minute")
    assert limiter.stats()["paused_for"] == 0, "never paused is no pause, not 7e9 s"
    with pytest.raises(ValueError, match="timeout"):
        limiter.acquire(timeout=1e11)
    with pytest.raises(ValueError, match="reset_after"):
        tenuto.CircuitBreaker(reset_after=1e11)
    breaker = tenuto.CircuitBreaker(failures=1, reset_after=1e9, clock=FakeClock())
    with pytest.raises(ConnectionError):
        breaker.call(_fail)
    assert breaker.state == "open", "a long reset stays open"


def _fail() -> None:
    raise ConnectionError("503")
