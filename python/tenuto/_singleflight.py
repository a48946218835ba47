"""`tenuto.SingleFlight`: one execution per key for concurrent callers, threads and asyncio
tasks alike. The flight map and the waiting live in Rust (`_core.FlightGroup`); this
module only adds the `async` leader, which must run in the caller's own task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenuto._core import FlightGroup

T = TypeVar("T")


class SingleFlight:
    """Concurrent callers of one key share one call of the function.

    ``do(key, fn)`` for threads (waiters block with the GIL released), ``await
    ado(key, coro_fn)`` for tasks (waiters never block the loop); both share one map, so a
    thread and a task asking for the same key also share one call. Every waiter gets the
    result, or the exception raised again. Nothing is cached: the key is forgotten when
    the call ends. If the leader is cancelled (or interrupted), a waiter takes over.
    """

    __slots__ = ("_group",)

    def __init__(self) -> None:
        self._group = FlightGroup()

    def do(self, key: str, fn: Callable[[], T]) -> T:
        result: T = self._group.do(key, fn)
        return result

    async def ado(self, key: str, coro_fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            leader, flight = self._group.join(key)
            if leader:
                try:
                    value = await coro_fn()
                except Exception as exc:
                    flight.land_error(exc)
                    raise
                except BaseException:
                    flight.abandon()  # cancelled or interrupted: a waiter takes over
                    raise
                flight.land_value(value)
                return value
            kind, value = await flight.wait_async()
            if kind == "value":
                return value  # type: ignore[no-any-return]
            if kind == "error":
                raise value
            # "abandoned": the leader went away; loop to lead or follow the next flight.

    def in_flight(self, key: str) -> bool:
        return self._group.in_flight(key)

    def followers(self, key: str) -> int:
        """How many callers wait on the flight of `key` now (0 when none is in flight)."""
        return self._group.followers(key)

    def __len__(self) -> int:
        return len(self._group)

    def __repr__(self) -> str:
        return f"<SingleFlight, {len(self)} keys in flight>"
