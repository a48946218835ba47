"""`@cache.cached`: the decorator, and the little of a cached call that must be Python.

The native base class (`_core.CachedCall`) and the engine behind it make every decision:
the key, hits, stale-while-revalidate, single-flight (threads, tasks and processes),
stale-if-error, negative backoff, and the store. Python runs the user's function: inline
for sync functions (the native call calls it), as a coroutine for `async def` (between
one native awaitable that begins the call and one that stores its outcome), and
background refreshes on a thread pool or as tasks.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import os
import threading
import types
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tenuto import _live
from tenuto._core import Cache, CachedCall, Lookup, Ticket, _record_state, _seconds

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
        _seconds("Backoff.base", self.base)
        _seconds("Backoff.max", self.max)
        if self.factor < 1:
            raise ValueError(f"Backoff.factor must be at least 1, got {self.factor!r}")
        if self.max < self.base:
            raise ValueError(f"Backoff.max ({self.max}) must not be below base ({self.base})")
        if not callable(self.when):
            raise TypeError("Backoff.when must be callable")

    def seconds(self, n: int) -> float:
        """TTL of the n-th consecutive negative answer."""
        return min(self.base * self.factor ** max(n - 1, 0), self.max)


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


def submit_refresh(ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Runs a sync function's background refresh on the pool (called by the native call)."""
    try:
        _refresh_pool().submit(ticket.run_refresh, args, kwargs)
    except RuntimeError:  # the pool is shut down (interpreter exit)
        ticket.abandon()


# Async refreshes are tasks; keep them referenced until done so they are not collected.
_tasks: set[asyncio.Task[Any]] = set()


class CachedFunction(CachedCall):
    """A sync function behind the cache. Concurrent threads share one call per key; the
    whole call (lookup, single-flight, store) is native around the function."""

    def __repr__(self) -> str:
        return f"<cached {self.key_name}>"

    def lookup(self, *args: Any, **kwargs: Any) -> Lookup:
        """Calls through the cache and says how: a Lookup with the state the call found
        ("hit", "stale" or "miss"), the value returned, and `stale_fallback`."""
        return self._resolve(self.key(*args, **kwargs), args, kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Fetches now (single-flighted) and stores the result; returns it."""
        return self._resolve(self.key(*args, **kwargs), args, kwargs, True).value

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forgets the cached result of this call; True if there was one."""
        return self._cache.delete(self.key(*args, **kwargs))

    def followers(self, *args: Any, **kwargs: Any) -> int:
        """Callers in this process waiting for the load of this call now."""
        return self._followers(self.key(*args, **kwargs))


class AsyncCachedFunction(CachedCall):
    """An `async def` behind the cache. Concurrent tasks share one call per key: one
    native awaitable before the function, one after."""

    def __repr__(self) -> str:
        return f"<cached {self.key_name}>"

    async def _aslow(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return (await self._aresolve(key, args, kwargs)).value

    async def _aresolve(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any], force: bool = False
    ) -> Lookup:
        lookup, ticket = await self._abegin(key, force)
        if ticket is not None:
            if lookup is not None:  # stale: served now, refreshed in the background
                task = asyncio.get_running_loop().create_task(
                    self._refresh_task(ticket, args, kwargs)
                )
                _tasks.add(task)
                task.add_done_callback(_tasks.discard)
            else:
                lookup = await self._load(ticket, args, kwargs)
        _record_state(lookup.state)
        return lookup

    async def _load(self, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Lookup:
        ticket.claim()
        try:
            if self._breaker is None:
                value = await self._fn(*args, **kwargs)
            else:  # an open breaker raises CircuitOpen: stale data is served instead
                value = await self._breaker.acall(self._fn, *args, **kwargs)
        except Exception as exc:
            return ticket.fail(exc)
        except BaseException:
            ticket.abandon()  # cancelled: a waiter takes over, the lock is released
            raise
        return await ticket.store(value)

    async def _refresh_task(
        self, ticket: Ticket, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            await self._load(ticket, args, kwargs)
        except Exception as exc:
            log.warning("background refresh of %s failed: %r", self.key_name, exc)

    async def lookup(self, *args: Any, **kwargs: Any) -> Lookup:
        """Calls through the cache and says how (see the sync `lookup`)."""
        return await self._aresolve(self.key(*args, **kwargs), args, kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Fetches now (single-flighted) and stores the result; returns it."""
        return (await self._aresolve(self.key(*args, **kwargs), args, kwargs, True)).value

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forgets the cached result of this call; True if there was one."""
        return await self._cache.adelete(self.key(*args, **kwargs))

    def followers(self, *args: Any, **kwargs: Any) -> int:
        """Tasks or threads in this process waiting for the load of this call now."""
        return self._followers(self.key(*args, **kwargs))

    alookup = lookup
    arefresh = refresh
    ainvalidate = invalidate


_KIND_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KIND_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_KIND_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


# Return annotations that JSON already round-trips: no TypeAdapter needed for them.
_PLAIN = (dict, list, str, int, float, bool, type(None), Any, object)


def _plain_json(tp: Any) -> bool:
    if tp in _PLAIN:
        return True
    origin = typing.get_origin(tp)
    if origin in (dict, list, typing.Union, types.UnionType if hasattr(types, "UnionType") else ()):
        args = typing.get_args(tp)
        if origin is dict and args and args[0] is not str:
            return False
        return all(_plain_json(a) for a in args)
    return False


def _adapter(fn: Callable[..., Any], explicit: Any) -> Any:
    """A pydantic `TypeAdapter` for the cached values: `type=`, else the return annotation
    when pydantic is installed and the type is more than plain JSON (a model, a
    dataclass, datetime, UUID, Decimal, tuple, set...). None: JSON rules."""
    tp = explicit
    if tp is None:
        try:
            tp = typing.get_type_hints(fn).get("return")
        except Exception:  # unresolvable forward references: JSON rules
            return None
        if tp is None or _plain_json(tp):
            return None
    try:
        from pydantic import TypeAdapter
    except ImportError:
        if explicit is not None:
            raise ImportError("type= needs pydantic (pip install pydantic)") from None
        return None
    try:
        return TypeAdapter(tp)
    except Exception:
        if explicit is not None:
            raise
        log.debug("no TypeAdapter for %r; %s keeps JSON rules", tp, fn)
        return None


def decorator(
    cache: Cache,
    *,
    ttl: Any,
    stale_ttl: Any,
    name: str | None,
    key: Callable[..., Any] | None,
    negative: Backoff | None,
    distributed: bool | None,
    lock_ttl: Any = None,
    wait_timeout: Any = None,
    breaker: Any = None,
    type: Any = None,
    isolated: bool = False,
) -> Callable[[Callable[..., Any]], Any]:
    """Builds the decorator returned by `Cache.cached` (arguments checked up front)."""
    # Durations as seconds (numbers, timedeltas and "90s" / "15m" / "90d" alike).
    ttl = _seconds("ttl", ttl)
    stale_ttl = None if stale_ttl is None else _seconds("stale_ttl", stale_ttl)
    if stale_ttl is not None and stale_ttl < ttl:
        raise ValueError(f"stale_ttl ({stale_ttl}) must not be shorter than ttl ({ttl})")
    lock_ttl = 30.0 if lock_ttl is None else _seconds("lock_ttl", lock_ttl)
    wait_timeout = 8.0 if wait_timeout is None else _seconds("wait_timeout", wait_timeout)
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
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@cache.cached cannot cache the generator {fn.__qualname__}(): a generator "
                "is used up once read; return a list instead"
            )
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
        wrapper = cls(
            cache,
            key_name,
            params,
            fn,
            ttl,
            stale_ttl=stale_ttl,
            key=key,
            bind=bind,
            is_async=is_async,
            negative=negative,
            lock_ttl=lock_ttl if use_lock else None,
            wait_timeout=wait_timeout,
            breaker=breaker,
            adapter=_adapter(fn, type),
            isolated=isolated,
        )
        wrapper._fn = fn
        wrapper._cache = cache
        wrapper._breaker = breaker
        functools.update_wrapper(wrapper, fn)
        _live.functions.add(wrapper)
        return wrapper

    return decorate


def _bind_arguments(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
