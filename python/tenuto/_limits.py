"""`tenuto.RateLimiter` and `tenuto.CircuitBreaker`: the native cores plus context
managers (sync and async) and decorators. Async paths await the cores' `_a…` twins, so
waiting for Redis never blocks the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tenuto import _live
from tenuto._core import CircuitBreakerCore, CircuitOpen, RateLimited, RateLimiterCore

__all__ = ["CircuitBreaker", "CircuitOpen", "RateLimited", "RateLimiter"]

F = TypeVar("F", bound=Callable[..., Any])

# Waiting for a lease held in another process: polling with backoff (seconds).
LEASE_POLL_MIN, LEASE_POLL_MAX = 0.005, 0.2


class RateLimiter(RateLimiterCore):
    """`RateLimiter(rate, min_interval=None, max_concurrency=None, burst=None, url=None,
    name="default", fail_open=True, *, mode="outbound", max_keys=100_000, clock=None)`.

    Never more than N admissions in any sliding window of the period. Outbound (default):
    admissions evenly spaced (period / N, or `min_interval` when larger), `burst` back to
    back at most. Inbound: up to N back to back. `max_concurrency` caps the calls in
    flight inside `with lim:` / `async with lim:` / `@lim.limit`, threads and tasks alike.
    With `url` (Redis/Valkey) the rate is shared by every process and host using the same
    `name`, decided by one Lua script on the server's clock, and so is the concurrency cap
    (leases that expire after `lease_ttl` seconds if their holder dies); when Redis cannot
    be reached, `fail_open=True` admits (counted in `stats()`), False refuses.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _live.limiters.add(self)
        # Shared leases held by the calls in progress, per thread / task.
        self._leases: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
            f"tenuto_leases_{id(self)}", default=()
        )

    def _take_lease(self, token: str | None) -> bool:
        if token is None:
            return False
        self._leases.set((*self._leases.get(), token))
        return True

    def _pop_lease(self) -> str | None:
        stack = self._leases.get()
        if not stack:
            return None
        self._leases.set(stack[:-1])
        return stack[-1]

    def _give_back(self) -> None:
        token = self._pop_lease()
        try:
            if token is not None:
                self._unlease(token)
        finally:
            self.release()

    def __enter__(self) -> RateLimiter:
        self._wait_slot()
        try:
            pause = LEASE_POLL_MIN
            while not self._take_lease(self._lease()):  # every lease in use, elsewhere too
                time.sleep(pause)
                pause = min(pause * 2, LEASE_POLL_MAX)
        except BaseException:
            self.release()
            raise
        try:
            self.acquire()
        except BaseException:
            self._give_back()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._give_back()

    async def aacquire(self, timeout: float | None = None, key: str | None = None) -> None:
        """Waits for admission without blocking the event loop; `RateLimited` when that
        would take longer than `timeout` seconds."""
        waited = 0.0
        while True:
            ok, retry_after = await self._atry_acquire(key)
            if ok:
                return
            if timeout is not None and waited + retry_after > timeout:
                err = RateLimited(
                    f"rate limit {self.name!r} ({self.rate}): retry in {retry_after:.3f} s"
                )
                err.retry_after = retry_after  # type: ignore[attr-defined]
                raise err
            await asyncio.sleep(retry_after)
            waited += retry_after

    async def afeedback(self, status: int, retry_after: float | None = None) -> None:
        """`feedback` from async code: the pause shared through Redis is sent from
        tenuto's runtime, never blocking the event loop."""
        await self._afeedback(status, retry_after)

    async def _aslot(self) -> None:
        while not self._try_slot():
            freed = self._slot_freed()
            if self._try_slot():  # released between the two checks
                freed.cancel()
                return
            await freed

    async def __aenter__(self) -> RateLimiter:
        await self._aslot()
        try:
            pause = LEASE_POLL_MIN
            while not self._take_lease(await self._alease()):
                await asyncio.sleep(pause)
                pause = min(pause * 2, LEASE_POLL_MAX)
        except BaseException:
            self.release()
            raise
        try:
            await self.aacquire()
        except BaseException:
            await self._agive_back()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._agive_back()

    async def _agive_back(self) -> None:
        token = self._pop_lease()
        try:
            if token is not None:
                await self._aunlease(token)  # goes through even if this task is cancelled
        finally:
            self.release()

    def limit(self, fn: F) -> F:
        """Decorator: every call (sync or async) goes through `with lim:`."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def limited_async(*args: Any, **kwargs: Any) -> Any:
                async with self:
                    return await fn(*args, **kwargs)

            return limited_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def limited(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return limited  # type: ignore[return-value]


class CircuitBreaker(CircuitBreakerCore):
    """`CircuitBreaker(failures=5, reset_after=30, half_open_max=1, name=None, *,
    failure_rate=None, window=60, min_calls=10, url=None, clock=None)`: closed → open after
    `failures` consecutive failures, or (with `failure_rate`) when at least `min_calls`
    calls in the last `window` seconds failed at that rate or more; open calls raise
    `tenuto.CircuitOpen(retry_after)` at once; after `reset_after` seconds up to
    `half_open_max` probes go through, and a probe's outcome closes or reopens it.
    Exceptions count as failures; `BaseException`s (cancellation) count as nothing.
    With `url` (Redis) the state is shared by every process using the same `name`, on the
    server's clock (the failure-rate rule stays per process); while Redis cannot be
    reached, each process's own state decides."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _live.breakers.add(self)
        # Which calls in progress are probes, per thread / task (contexts do not leak).
        self._probes: contextvars.ContextVar[tuple[bool, ...]] = contextvars.ContextVar(
            f"tenuto_breaker_{id(self)}", default=()
        )

    def _enter(self) -> None:
        self._probes.set((*self._probes.get(), self._permit()))

    def _pop_probe(self) -> bool:
        stack = self._probes.get()
        self._probes.set(stack[:-1])
        return stack[-1] if stack else False

    def _exit(self, exc: BaseException | None) -> None:
        probe = self._pop_probe()
        if exc is None:
            self._success(probe)
        elif isinstance(exc, Exception):
            self._failure(probe)

    def __enter__(self) -> CircuitBreaker:
        self._enter()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._exit(exc)

    async def __aenter__(self) -> CircuitBreaker:
        self._probes.set((*self._probes.get(), await self._apermit()))
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        probe = self._pop_probe()
        if exc is None:
            await self._asuccess(probe)
        elif isinstance(exc, Exception):
            await self._afailure(probe)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self:
            return fn(*args, **kwargs)

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with self:
            return await fn(*args, **kwargs)

    def __call__(self, fn: F) -> F:
        """Decorator for sync and async functions."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                return await self.acall(fn, *args, **kwargs)

            return guarded_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return self.call(fn, *args, **kwargs)

        return guarded  # type: ignore[return-value]
