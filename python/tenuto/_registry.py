"""`tenuto.IdRegistry`: a bidirectional mapping between two ID spaces (e.g. Spotify ↔
RecoBeat) with known-missing marks, stored in a `tenuto.Cache` in the host app's format.

Storage and bulk operations are native (`_core.IdRegistryCore`, one round trip each);
this module adds the `resolve` workflow: look up what is known, skip known-missing IDs,
fetch the rest in batches (bounded concurrency, each ID fetched once even across
concurrent resolves), and record both outcomes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tenuto import _live
from tenuto._core import Flight, FlightGroup, IdRegistryCore, TenutoError

__all__ = ["IdRegistry", "ResolveError"]

Fetch = Callable[[list[str]], Mapping[str, Any]]
AsyncFetch = Callable[[list[str]], Awaitable[Mapping[str, Any]]]

NOT_RETURNED = "not returned by fetch"


class ResolveError(TenutoError):
    """Some batches of a `resolve` failed. Nothing was recorded for their IDs (neither
    validated nor missing); `partial` holds what did resolve (`{src: dst or None}`, input
    order), `failed` the IDs whose batches failed, `errors` the exceptions raised."""

    def __init__(
        self, partial: dict[str, str | None], failed: list[str], errors: list[BaseException]
    ):
        super().__init__(f"{len(errors)} batch(es) failed for {len(failed)} ID(s): {errors[0]!r}")
        self.partial = partial
        self.failed = failed
        self.errors = errors


def _abandon(batch: list[tuple[str, Flight]]) -> None:
    """Ends these flights without an answer; their waiters take over."""
    for _, flight in batch:
        flight.abandon()


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_sizes(batch_size: int, concurrency: int) -> None:
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _answers(batch: list[str], got: Any) -> dict[str, str]:
    """The pairs a fetch returned for its own batch (anything else it returned is
    ignored: recording IDs nobody asked about is how wrong mappings got persisted)."""
    if not isinstance(got, Mapping):
        raise TypeError(f"fetch must return a mapping {{src: dst}}, not {type(got).__name__}")
    pairs = {}
    for src in batch:
        dst = got.get(src)
        if dst is None:
            continue
        if not isinstance(dst, str) or not dst:
            raise TypeError(f"fetch returned {dst!r} for {src!r}; target IDs must be non-empty str")
        pairs[src] = dst
    return pairs


class IdRegistry(IdRegistryCore):
    """`IdRegistry(cache, name="reccobeat", source_field="spotify_id",
    target_field="reccobeat_id", validated_ttl=180 days, missing_ttl=14 days)`.

    Keys (under the cache namespace): `{name}:validated:{src}` and `{name}:reverse:{dst}`
    hold `{source_field: src, target_field: dst, "validated_at": ISO-8601}`;
    `{name}:missing:{src}` holds `{source_field: src, "marked_at": ..., "reason": ...}`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _live.registries.add(self)
        self._flights = FlightGroup()

    def resolve(
        self,
        ids: Iterable[str],
        fetch: Fetch | AsyncFetch,
        batch_size: int = 50,
        concurrency: int = 4,
    ) -> Any:
        """`{src: dst or None}` for `ids`, in input order. Known IDs come from the
        registry, known-missing ones are None without a fetch, and the rest go to
        `fetch(batch) -> {src: dst}` in batches of `batch_size`, at most `concurrency` at
        a time. Returned pairs are recorded as validated, IDs a fetch left out as missing.
        With an `async def` fetch this returns a coroutine (the same as `aresolve`).
        Raises `ResolveError` (with `.partial`) if a batch's fetch raised."""
        if inspect.iscoroutinefunction(fetch):
            return self.aresolve(ids, fetch, batch_size, concurrency)
        _check_sizes(batch_size, concurrency)
        ids = list(ids)
        known, missing = self._classify(ids)
        leading, following = self._join(ids, known, missing)
        failures: list[tuple[list[str], BaseException]] = []

        def run(batch: list[tuple[str, Flight]]) -> None:
            failure = self._fetch_batch(batch, fetch)  # type: ignore[arg-type]
            if failure is not None:
                failures.append(failure)

        batches = _batches(leading, batch_size)
        if concurrency == 1 or len(batches) <= 1:
            for batch in batches:
                run(batch)
        else:
            for _, flight in leading:
                flight.hand_off()
            with ThreadPoolExecutor(
                min(concurrency, len(batches)), thread_name_prefix="tenuto-resolve"
            ) as pool:
                list(pool.map(run, batches))
        resolved = {src: flight.wait() for src, flight in following.items()}
        return self._result(ids, known, leading, resolved, failures)

    async def aresolve(
        self,
        ids: Iterable[str],
        fetch: AsyncFetch,
        batch_size: int = 50,
        concurrency: int = 4,
    ) -> dict[str, str | None]:
        """`resolve` with an `async def` fetch; batches run as tasks, at most
        `concurrency` at a time."""
        _check_sizes(batch_size, concurrency)
        ids = list(ids)
        known, missing = await self._aclassify(ids)
        leading, following = self._join(ids, known, missing)
        failures: list[tuple[list[str], BaseException]] = []
        gate = asyncio.Semaphore(concurrency)

        async def run(batch: list[tuple[str, Flight]]) -> None:
            async with gate:
                failure = await self._afetch_batch(batch, fetch)
            if failure is not None:
                failures.append(failure)

        try:
            await asyncio.gather(*(run(b) for b in _batches(leading, batch_size)))
        except BaseException:  # cancelled: let the waiters of these IDs take over
            _abandon([(src, flight) for src, flight in leading if flight.is_leader])
            raise
        resolved = {src: await flight.wait_async() for src, flight in following.items()}
        return self._result(ids, known, leading, resolved, failures)

    def _join(
        self, ids: list[str], known: dict[str, str], missing: set[str]
    ) -> tuple[list[tuple[str, Flight]], dict[str, Flight]]:
        """Flights of the unknown IDs: the ones this call fetches, and the ones another
        concurrent resolve is already fetching."""
        leading: list[tuple[str, Flight]] = []
        following: dict[str, Flight] = {}
        seen: set[str] = set()
        for src in ids:
            if src in known or src in missing or src in seen:
                continue
            seen.add(src)
            leader, flight = self._flights.join(src)
            if leader:
                leading.append((src, flight))
            else:
                following[src] = flight
        return leading, following

    def _fetch_batch(
        self, batch: list[tuple[str, Flight]], fetch: Fetch
    ) -> tuple[list[str], BaseException] | None:
        srcs = [src for src, _ in batch]
        try:
            pairs = _answers(srcs, fetch(srcs))
            self.bulk_mark_validated(pairs)
            self.bulk_mark_missing([s for s in srcs if s not in pairs], NOT_RETURNED)
        except Exception as exc:
            return self._fail(batch, exc)
        except BaseException:
            _abandon(batch)
            raise
        self._succeed(batch, pairs)
        return None

    async def _afetch_batch(
        self, batch: list[tuple[str, Flight]], fetch: AsyncFetch
    ) -> tuple[list[str], BaseException] | None:
        srcs = [src for src, _ in batch]
        try:
            pairs = _answers(srcs, await fetch(srcs))
            await self.abulk_mark_validated(pairs)
            await self.abulk_mark_missing([s for s in srcs if s not in pairs], NOT_RETURNED)
        except Exception as exc:
            return self._fail(batch, exc)
        except BaseException:
            _abandon(batch)
            raise
        self._succeed(batch, pairs)
        return None

    def _succeed(self, batch: list[tuple[str, Flight]], pairs: dict[str, str]) -> None:
        self._count_fetch(len(batch))
        for src, flight in batch:
            flight.land_value(pairs.get(src))

    def _fail(
        self, batch: list[tuple[str, Flight]], exc: Exception
    ) -> tuple[list[str], BaseException]:
        self._count_fetch(len(batch), failed=True)
        for _, flight in batch:
            flight.land_error(exc)
        return [src for src, _ in batch], exc

    @staticmethod
    def _result(
        ids: list[str],
        known: dict[str, str],
        leading: list[tuple[str, Flight]],
        resolved: dict[str, tuple[str, Any]],
        failures: list[tuple[list[str], BaseException]],
    ) -> dict[str, str | None]:
        failed = {src for srcs, _ in failures for src in srcs}
        errors = [exc for _, exc in failures]
        outcome: dict[str, str | None] = dict(known)
        for src, flight in leading:
            if src not in failed:
                outcome[src] = flight.wait()[1]
        for src, (kind, value) in resolved.items():
            if kind == "value":
                outcome[src] = value
            else:  # the other resolve's batch failed (or was abandoned)
                failed.add(src)
                if kind == "error" and value not in errors:
                    errors.append(value)
        result = {src: outcome.get(src) for src in ids if src not in failed}
        if failed:
            raise ResolveError(result, [s for s in dict.fromkeys(ids) if s in failed], errors)
        return result
