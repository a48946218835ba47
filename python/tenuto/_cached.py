"""`@cache.cached`: the slow path of a cached call, and the decorator's helpers.

The native base class (`_core.CachedCall`) derives the key and answers fresh memory hits
in Rust; everything else comes here: Redis lookups, stale-while-revalidate, single-flight
loads (threads, tasks and, on Redis, processes), stale-if-error and negative caching.
The time spent here is dominated by the upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from tenuto._core import Cache, CachedCall, Envelope, Lookup, _record_state
from tenuto._singleflight import SingleFlight

log = logging.getLogger("tenuto.cached")

REFRESH_THREADS = 4


def _always_none(value: object) -> bool:
    return value is None


@dataclass(frozen=True)
class Backoff:
    """Negative caching: results for which ``when(result)`` is true (e.g. "no lyrics") are
    cached for ``base × factor^(n−1)`` seconds, at most ``max``, where n counts the
    consecutive negative answers for that key; a positive answer resets n."""

    base: float = 60.0
    factor: float = 2.0
    max: float = 3600.0
    when: Callable[[Any], bool] = _always_none

    def __post_init__(self) -> None:
        for field, value in (("base", self.base), ("factor", self.factor), ("max", self.max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Backoff.{field} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"Backoff.{field} must be a positive number, got {value!r}")
        if self.factor < 1:
            raise ValueError(f"Backoff.factor must be at least 1, got {self.factor!r}")
        if self.max < self.base:
            raise ValueError(f"Backoff.max ({self.max}) must not be below base ({self.base})")
        if not callable(self.when):
            raise TypeError("Backoff.when must be callable")

    def seconds(self, n: int) -> float:
        """TTL of the n-th consecutive negative answer."""
        return min(self.base * self.factor ** max(n - 1, 0), self.max)


class _Loaded(NamedTuple):
    """What one load gives every caller sharing it."""

    value: Any
    envelope: Envelope | None
    stale_fallback: bool


# Background refreshes of sync functions run on a small shared pool, rebuilt after fork
# (a forked child has none of the parent's threads).
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _refresh_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(REFRESH_THREADS, thread_name_prefix="tenuto-refresh")
        return _pool


def _forget_pool_in_child() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)

# Async refreshes are tasks; keep them referenced until done so they are not collected.
_tasks: set[asyncio.Task[Any]] = set()


@contextlib.contextmanager
def _landing(flight: Any, key: str) -> Iterator[list[_Loaded]]:
    """Lands a background refresh's flight with what the block appends, or with its
    error (logged, not raised: nobody awaits a background refresh); an interrupted
    refresh abandons the flight so a waiter takes over."""
    outcome: list[_Loaded] = []
    try:
        yield outcome
    except Exception as exc:
        log.warning("background refresh of %s failed: %r", key, exc)
        flight.land_error(exc)
    except BaseException:
        flight.abandon()
        raise
    else:
        flight.land_value(outcome[0])


class _CachedBase(CachedCall):
    """Shared state of sync and async cached functions (set once, by `decorator`)."""

    _fn: Callable[..., Any]
    _cache: Cache
    _ttl: float
    _stale_ttl: float | None
    _negative: Backoff | None
    _distributed: bool
    _lock_ttl: float
    _wait_timeout: float
    _breaker: Any
    _flights: SingleFlight

    def __repr__(self) -> str:
        return f"<cached {self.key_name} on {self._cache!r}>"

    def _negative_key(self, key: str) -> str:
        return key + "#negative"

    def _plan_store(self, key: str, value: Any, streak: int) -> tuple[float, float | None, int]:
        """TTLs for storing `value`, and the new negative streak (0 for a positive)."""
        if self._negative is not None and self._negative.when(value):
            return self._negative.seconds(streak + 1), None, streak + 1
        return self._ttl, self._stale_ttl, 0

    def _fallback(self, key: str, prior: Lookup | None, exc: Exception) -> _Loaded:
        """Stale-if-error: the stale value, if there is one; else the error goes on."""
        if prior is None or prior.state != "stale":
            raise exc
        log.warning("fetch for %s failed (%r); serving the stale value", key, exc)
        return _Loaded(prior.value, prior.envelope, True)


class CachedFunction(_CachedBase):
    """A sync function behind the cache. Concurrent threads share one call per key."""

    def _slow(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._resolve(key, args, kwargs).value

    def _resolve(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Lookup:
        found = self._cache.get(key)
        _record_state(found.state)
        if found.state == "hit":
            return found
        if found.state == "stale":
            self._refresh_in_background(key, args, kwargs, found)
            return found
        loaded = self._flights.do(key, lambda: self._load(key, args, kwargs, found, recheck=True))
        return Lookup("miss", loaded.envelope, loaded.stale_fallback)

    def _load(
        self,
        key: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        prior: Lookup | None,
        recheck: bool = False,
    ) -> _Loaded:
        if recheck:  # a flight that landed just before this one may have stored it
            again = self._cache._peek(key)
            if again.state == "hit":
                return _Loaded(again.value, again.envelope, False)
        token = ""
        if self._distributed:
            since = self._cache.now()
            token = self._cache._lock(key, self._lock_ttl)
            if token is None:  # another process is fetching: wait for its write
                written = self._cache._wait_for_write(key, since, self._wait_timeout)
                if written is not None and written.state != "miss":
                    return _Loaded(written.value, written.envelope, False)
        try:
            try:
                if self._breaker is None:
                    value = self._fn(*args, **kwargs)
                else:  # an open breaker raises CircuitOpen: stale data is served instead
                    value = self._breaker.call(self._fn, *args, **kwargs)
            except Exception as exc:
                return self._fallback(key, prior, exc)
            return _Loaded(value, self._store(key, value), False)
        finally:
            if token:
                self._cache._unlock(key, token)

    def _store(self, key: str, value: Any) -> Envelope:
        streak = 0
        if self._negative is not None:
            streak = self._cache.get(self._negative_key(key)).value or 0
        ttl, stale_ttl, streak = self._plan_store(key, value, streak)
        envelope = self._cache.set(key, value, ttl=ttl, stale_ttl=stale_ttl)
        if self._negative is not None:
            if streak:
                self._cache.set(self._negative_key(key), streak, ttl=self._negative.max * 4)
            else:
                self._cache.delete(self._negative_key(key))
        return envelope

    def _refresh_in_background(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], found: Lookup
    ) -> None:
        leader, flight = self._flights._group.join(key)
        if not leader:
            return  # a refresh (or a load) of this key is already running
        flight.hand_off()
        try:
            _refresh_pool().submit(self._run_refresh, flight, key, args, kwargs, found)
        except RuntimeError:  # the pool is shut down (interpreter exit)
            flight.abandon()

    def _run_refresh(
        self, flight: Any, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], found: Lookup
    ) -> None:
        with _landing(flight, key) as outcome:
            outcome.append(self._load(key, args, kwargs, found))

    # Public helpers, named after the call they describe.

    def lookup(self, *args: Any, **kwargs: Any) -> Lookup:
        """Calls through the cache and says how: a Lookup with the state the call found
        ("hit", "stale" or "miss"), the value returned, and `stale_fallback`."""
        return self._resolve(self.key(*args, **kwargs), args, kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Fetches now (single-flighted) and stores the result; returns it."""
        key = self.key(*args, **kwargs)
        return self._flights.do(key, lambda: self._load(key, args, kwargs, None)).value

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forgets the cached result of this call; True if there was one."""
        key = self.key(*args, **kwargs)
        if self._negative is not None:
            self._cache.delete(self._negative_key(key))
        return self._cache.delete(key)


class AsyncCachedFunction(_CachedBase):
    """An `async def` behind the cache. Concurrent tasks share one call per key."""

    def _slow(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._aslow(key, args, kwargs)

    async def _aslow(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return (await self._aresolve(key, args, kwargs)).value

    async def _aresolve(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Lookup:
        found = await self._cache.aget(key)
        _record_state(found.state)
        if found.state == "hit":
            return found
        if found.state == "stale":
            self._refresh_in_background(key, args, kwargs, found)
            return found
        loaded = await self._flights.ado(
            key, lambda: self._aload(key, args, kwargs, found, recheck=True)
        )
        return Lookup("miss", loaded.envelope, loaded.stale_fallback)

    async def _aload(
        self,
        key: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        prior: Lookup | None,
        recheck: bool = False,
    ) -> _Loaded:
        if recheck:
            again = await self._cache._apeek(key)
            if again.state == "hit":
                return _Loaded(again.value, again.envelope, False)
        token = ""
        if self._distributed:
            since = self._cache.now()
            token = await self._cache._alock(key, self._lock_ttl)
            if token is None:
                written = await self._cache._await_for_write(key, since, self._wait_timeout)
                if written is not None and written.state != "miss":
                    return _Loaded(written.value, written.envelope, False)
        try:
            try:
                if self._breaker is None:
                    value = await self._fn(*args, **kwargs)
                else:
                    value = await self._breaker.acall(self._fn, *args, **kwargs)
            except Exception as exc:
                return self._fallback(key, prior, exc)
            return _Loaded(value, await self._astore(key, value), False)
        finally:
            if token:
                await self._cache._aunlock(key, token)

    async def _astore(self, key: str, value: Any) -> Envelope:
        streak = 0
        if self._negative is not None:
            streak = (await self._cache.aget(self._negative_key(key))).value or 0
        ttl, stale_ttl, streak = self._plan_store(key, value, streak)
        envelope = await self._cache.aset(key, value, ttl=ttl, stale_ttl=stale_ttl)
        if self._negative is not None:
            if streak:
                await self._cache.aset(self._negative_key(key), streak, ttl=self._negative.max * 4)
            else:
                await self._cache.adelete(self._negative_key(key))
        return envelope

    def _refresh_in_background(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], found: Lookup
    ) -> None:
        leader, flight = self._flights._group.join(key)
        if not leader:
            return
        task = asyncio.get_running_loop().create_task(
            self._run_refresh(flight, key, args, kwargs, found)
        )
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    async def _run_refresh(
        self, flight: Any, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], found: Lookup
    ) -> None:
        with _landing(flight, key) as outcome:
            outcome.append(await self._aload(key, args, kwargs, found))

    async def lookup(self, *args: Any, **kwargs: Any) -> Lookup:
        """Calls through the cache and says how (see the sync `lookup`)."""
        return await self._aresolve(self.key(*args, **kwargs), args, kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Fetches now (single-flighted) and stores the result; returns it."""
        key = self.key(*args, **kwargs)
        return (await self._flights.ado(key, lambda: self._aload(key, args, kwargs, None))).value

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forgets the cached result of this call; True if there was one."""
        key = self.key(*args, **kwargs)
        if self._negative is not None:
            await self._cache.adelete(self._negative_key(key))
        return await self._cache.adelete(key)

    alookup = lookup
    arefresh = refresh
    ainvalidate = invalidate


_KIND_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KIND_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_KIND_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _check_seconds(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def decorator(
    cache: Cache,
    *,
    ttl: float,
    stale_ttl: float | None,
    name: str | None,
    key: Callable[..., Any] | None,
    negative: Backoff | None,
    distributed: bool | None,
    lock_ttl: float,
    wait_timeout: float,
    breaker: Any = None,
) -> Callable[[Callable[..., Any]], Any]:
    """Builds the decorator returned by `Cache.cached` (arguments checked up front)."""
    _check_seconds("ttl", ttl)
    _check_seconds("stale_ttl", stale_ttl, optional=True)
    if stale_ttl is not None and stale_ttl < ttl:
        raise ValueError(f"stale_ttl ({stale_ttl}) must not be shorter than ttl ({ttl})")
    _check_seconds("lock_ttl", lock_ttl)
    _check_seconds("wait_timeout", wait_timeout)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError("name must be a non-empty str")
    if key is not None and not callable(key):
        raise TypeError("key must be a callable taking the function's arguments")
    if negative is not None and not isinstance(negative, Backoff):
        raise TypeError("negative must be a tenuto.Backoff")
    if breaker is not None and not (hasattr(breaker, "call") and hasattr(breaker, "acall")):
        raise TypeError("breaker must be a tenuto.CircuitBreaker")
    use_lock = cache.backend == "redis" if distributed is None else bool(distributed)

    def decorate(fn: Callable[..., Any]) -> Any:
        if not callable(fn):
            raise TypeError("@cache.cached decorates functions")
        is_async = inspect.iscoroutinefunction(fn)
        key_name = name or f"{fn.__module__}.{fn.__qualname__}"
        signature = inspect.signature(fn)
        params = [
            (
                p.name,
                p.kind in _KIND_POSITIONAL,
                p.kind in _KIND_KEYWORD,
                p.default is not inspect.Parameter.empty,
                None if p.default is inspect.Parameter.empty else p.default,
            )
            for p in signature.parameters.values()
        ]
        bind = None
        if key is None and any(p.kind in _KIND_VARIADIC for p in signature.parameters.values()):
            bind = functools.partial(_bind_arguments, signature)
        cls = AsyncCachedFunction if is_async else CachedFunction
        wrapper = cls(cache, key_name, params, key=key, bind=bind, is_async=is_async)
        wrapper._fn = fn
        wrapper._cache = cache
        wrapper._ttl = ttl
        wrapper._stale_ttl = stale_ttl
        wrapper._negative = negative
        wrapper._distributed = use_lock
        wrapper._lock_ttl = lock_ttl
        wrapper._wait_timeout = wait_timeout
        wrapper._breaker = breaker
        wrapper._flights = SingleFlight()
        functools.update_wrapper(wrapper, fn)
        return wrapper

    return decorate


def _bind_arguments(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
