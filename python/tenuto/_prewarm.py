"""`tenuto.Prewarmer`: keeps hot keys warm, warms long key lists, refreshes ahead.

A job is a function and its arguments, refreshed every interval: a cached function's
``refresh`` (a forced fetch and store, not a cached read), or any callable. On a Redis
cache each job takes a lease (``tenuto._core.Leases``) for one interval before it runs
and keeps it until it expires, so the fleet runs the job once per interval between all
its processes and hosts; the lease expiring is the schedule, and nothing is released
after a run. A failed run shortens the lease to the retry backoff, so the fleet retries
at that pace, not in a storm.

The worker is a daemon thread that waits on a condition until the next job is due (or
until ``stop()`` or ``register()`` wakes it); it starts only on ``start()``, never at
import, and a forked child has none until it calls ``start()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from tenuto import _live
from tenuto._cached import Backoff
from tenuto._core import Cache, CachedCall, Leases, _seconds, stable_key

__all__ = ["CancelToken", "Prewarmer"]

log = logging.getLogger("tenuto.prewarm")

# The first retry of a failed job comes after this many seconds (or its interval, when
# shorter), doubling per consecutive failure up to the interval.
RETRY_BASE = 30.0
# Checkpoints of a warm outlive a crash by this long (seconds).
CHECKPOINT_TTL = 7 * 86400
# The worker re-reads the clock at least this often, so a clock moved by hand (or a
# system clock step) is noticed.
MAX_WAIT = 60.0


def _clock_arg(clock: Any) -> Callable[[], float]:
    if clock is None:
        return time.time
    if not callable(clock):
        raise TypeError("clock must be a callable returning epoch seconds (e.g. FakeClock)")
    return clock  # type: ignore[no-any-return]


def _is_async(fn: Any) -> bool:
    if isinstance(fn, CachedCall):
        return bool(fn.is_async)
    # A callable object whose __call__ is `async def` is async too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _run_sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls fn from a thread with no event loop; awaits what it returns if awaitable."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _refresher(fn: Any) -> Callable[..., Any]:
    """What refreshes a job: a cached function's forced fetch-and-store, else fn itself."""
    if isinstance(fn, CachedCall):
        return fn.refresh  # type: ignore[attr-defined,no-any-return]
    return fn  # type: ignore[no-any-return]


def _name_of(fn: Any) -> str:
    if isinstance(fn, CachedCall):
        return str(fn.key_name)
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


class CancelToken:
    """Cancels a running ``warm``: ``cancel()`` from any thread; the warm returns within
    a second, its progress checkpointed. (From a signal handler, register it on the event
    loop with ``loop.add_signal_handler``, as ``python -m tenuto warm`` does: a signal
    that lands on a worker thread does not wake a plain Python handler.)"""

    __slots__ = ("_event", "_callbacks", "_lock")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], object]] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until cancelled (True) or until ``timeout`` passes (False)."""
        return self._event.wait(timeout)

    def _on_cancel(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Calls ``callback`` once when cancelled (now, if already); returns an unhook."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], object]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def __repr__(self) -> str:
        return f"<CancelToken cancelled={self.cancelled}>"


class _Job:
    __slots__ = (
        "name",
        "label",
        "call",
        "args",
        "kwargs",
        "interval",
        "leases",
        "runs",
        "failures",
        "errors",
        "last_run",
        "last_success",
        "last_error",
        "next_run",
        "lease_holder",
        "running",
    )

    def __init__(
        self,
        name: str,
        label: str,
        call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        interval: float,
        leases: Leases | None,
        now: float,
    ) -> None:
        self.name, self.label, self.call = name, label, call
        self.args, self.kwargs, self.interval, self.leases = args, kwargs, interval, leases
        self.runs = self.failures = self.errors = 0
        self.last_run: float | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.next_run = now
        self.lease_holder: str | None = None
        self.running = False


def _after_fork_in_child() -> None:
    # Prewarmers alive in this process: a forked child gets fresh locks and no worker.
    for warmer in list(_live.prewarmers):
        warmer._forget_worker()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Prewarmer:
    """Keeps cached functions (or any callables) warm on a background thread.

    ``Prewarmer(cache=None, *, clock=None, holder=None)``: ``cache`` holds the leases of
    jobs whose function has no cache of its own (a cached function's jobs lease on its
    own cache) and the checkpoints of ``warm``; ``clock`` (a ``FakeClock`` or any callable
    returning epoch seconds) schedules the jobs; ``holder`` names this process in leases
    (default ``host:pid:random``).
    """

    def __init__(
        self, cache: Cache | None = None, *, clock: Any = None, holder: str | None = None
    ) -> None:
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be a tenuto.Cache or None, not {type(cache).__name__}")
        if holder is not None and (not isinstance(holder, str) or not holder):
            raise TypeError("holder must be a non-empty str")
        self.cache = cache
        self._clock = _clock_arg(clock)
        self._holder = holder
        self._holder_pid = os.getpid()
        self._jobs: dict[str, _Job] = {}
        self._leases: dict[int, tuple[Cache, Leases]] = {}
        self._known: dict[str, dict[str, tuple[Any, ...]]] = {}
        self._forget_worker()
        _live.prewarmers.add(self)

    def _forget_worker(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._run_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        for job in getattr(self, "_jobs", {}).values():
            job.running = False

    @property
    def holder(self) -> str:
        """This process's name in leases (a forked child gets its own)."""
        if self._holder is not None and self._holder_pid == os.getpid():
            return self._holder
        self._holder_pid = os.getpid()
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        return self._holder

    @property
    def running(self) -> bool:
        """True while the worker thread runs in this process."""
        return self._thread is not None and self._thread.is_alive()

    def _leases_of(self, cache: Cache | None) -> Leases | None:
        if cache is None:
            return None
        entry = self._leases.get(id(cache))
        if entry is None:
            # The cache is kept with its leases, so its id is not reused meanwhile.
            entry = self._leases[id(cache)] = (cache, Leases(cache))
        return entry[1]

    # -- jobs -------------------------------------------------------------------------

    def register(
        self,
        fn: Callable[..., Any],
        *args: Any,
        interval: float | None = None,
        min_interval: float = 300,
        max_interval: float = 3600,
        **kwargs: Any,
    ) -> str:
        """Refreshes ``fn(*args, **kwargs)`` every ``interval`` seconds (default
        ``clamp(ttl * 0.5, min_interval, max_interval)`` for a cached function; other
        callables need ``interval``). Returns the job's name (its lease name)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        low = _seconds("min_interval", min_interval)
        high = _seconds("max_interval", max_interval)
        if low > high:
            raise ValueError(f"min_interval ({low}) must not exceed max_interval ({high})")
        ttl = getattr(fn, "_ttl", None) if isinstance(fn, CachedCall) else None
        if interval is not None:
            every = _seconds("interval", interval)
        elif ttl is not None:
            every = min(max(ttl * 0.5, low), high)
        else:
            raise ValueError(
                f"interval is required for {_name_of(fn)}: it has no cache TTL to derive it from"
            )
        if isinstance(fn, CachedCall):
            key = fn.key(*args, **kwargs)
            cache: Cache | None = getattr(fn, "_cache", None)
            cache = self.cache if cache is None else cache
            self._remember(fn, key, args)
        else:
            try:
                key = stable_key(_name_of(fn), [list(args), kwargs])
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"args of {_name_of(fn)} must be JSON values to name the job: {exc}"
                ) from None
            cache = self.cache
        name = f"prewarm:{key}"
        with self._cond:
            if name in self._jobs:
                raise ValueError(f"{name} is already registered")
            self._jobs[name] = _Job(
                name,
                _name_of(fn),
                _refresher(fn),
                args,
                kwargs,
                every,
                self._leases_of(cache),
                self._clock(),
            )
            self._cond.notify_all()
        return name

    def unregister(self, name: str) -> bool:
        """Stops refreshing a job; True if it was registered."""
        with self._cond:
            return self._jobs.pop(name, None) is not None

    def run_once(self) -> list[str]:
        """Runs the jobs due now (in this thread); returns the names of those that ran.
        A job whose lease another process holds is skipped until that lease expires."""
        with self._run_lock:  # the worker and a caller never run a job twice at once
            with self._cond:
                now = self._clock()
                due = [job for job in self._jobs.values() if job.next_run <= now]
            return [job.name for job in due if self._run(job)]

    def _run(self, job: _Job) -> bool:
        now = self._clock()
        if job.leases is not None:
            try:
                acquired, holder, left = job.leases.acquire(job.name, self.holder, job.interval)
            except Exception as exc:  # a cache that does not fail open: try again later
                log.warning("prewarm %s: lease not available (%r)", job.label, exc)
                job.next_run = now + min(job.interval, RETRY_BASE)
                return False
            job.lease_holder = holder
            if not acquired:
                # Another process runs it this interval: look again when its lease ends.
                job.next_run = now + max(left, 0.001)
                return False
        job.running = True
        job.runs += 1
        job.last_run = now
        try:
            _run_sync(job.call, *job.args, **job.kwargs)
        except Exception as exc:
            job.failures += 1
            job.errors += 1
            job.last_error = f"{type(exc).__name__}: {exc}"
            retry = Backoff(min(RETRY_BASE, job.interval), 2.0, job.interval).seconds(job.failures)
            job.next_run = self._clock() + retry
            log.warning(
                "prewarm %s failed (%d in a row), next try in %.0f s: %r",
                job.label,
                job.failures,
                retry,
                exc,
            )
            if job.leases is not None:
                try:
                    job.leases.renew(job.name, self.holder, retry)
                except Exception:  # the lease expires on its own
                    pass
        else:
            job.failures = 0
            job.last_success = self._clock()
            job.next_run = now + job.interval
        finally:
            job.running = False
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per job: function, interval, runs, last run, last success, last error,
        failures in a row, errors in all, next run (epoch seconds), and the lease holder
        (who runs it this interval: this or another process) — for a health endpoint."""
        with self._cond:
            jobs = list(self._jobs.values())
        out: dict[str, dict[str, Any]] = {}
        for job in jobs:
            holder, lease_left = job.lease_holder, None
            if job.leases is not None:
                try:
                    _, holder, lease_left = job.leases.holder(job.name)
                except Exception:  # the last holder seen stands
                    pass
            out[job.name] = {
                "function": job.label,
                "interval": job.interval,
                "runs": job.runs,
                "last_run": job.last_run,
                "last_success": job.last_success,
                "last_error": job.last_error,
                "failures": job.failures,
                "errors": job.errors,
                "next_run": job.next_run,
                "running": job.running,
                "lease_holder": holder,
                "lease_expires_in": lease_left,
                "held_here": holder is not None and holder == self.holder,
            }
        return out

    # -- the worker -------------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker thread (once per process; again after ``stop()``)."""
        with self._cond:
            if self.running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="tenuto-prewarm", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stops the worker, waiting up to ``timeout`` s for a job in progress to end;
        True when it has stopped."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not math.isfinite(timeout) or timeout < 0:
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout}")
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    due = min((job.next_run for job in self._jobs.values()), default=math.inf)
                    if due <= now:
                        break
                    self._cond.wait(min(due - now, MAX_WAIT))
                if self._stopping:
                    return
            try:
                self.run_once()
            except Exception:  # never let one bad job end the worker
                log.exception("prewarm worker: unexpected error")

    # -- warming lists ----------------------------------------------------------------

    def _remember(self, fn: Any, key: str, args: tuple[Any, ...]) -> None:
        known = self._known.setdefault(fn.key_name, {})
        if len(known) < KNOWN_MAX or key in known:
            known[key] = args

    def warm(
        self,
        items: Iterable[Any],
        fn: Callable[..., Any],
        concurrency: int = 2,
        skip_cached: bool = True,
        progress: Any = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, Any]:
        """Calls ``fn(item)`` for each item (see ``awarm``) from a thread with no event
        loop running; returns the report."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.awarm(items, fn, concurrency, skip_cached, progress, cancel))
        raise RuntimeError("warm() blocks: inside an event loop, use await prewarmer.awarm(...)")

    async def awarm(
        self,
        items: Iterable[Any],
        fn: Callable[..., Any],
        concurrency: int = 2,
        skip_cached: bool = True,
        progress: Any = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, Any]:
        """Warms ``fn(item)`` for every item, ``concurrency`` at a time (sync functions on
        that many threads, ``async def`` as that many tasks), at the pace of any limiter
        ``fn`` goes through. A cached function is refreshed (fetch and store), skipping
        items whose entry is fresh (``skip_cached``). Progress is checkpointed in the
        cache, so a warm killed half-way and started again with the same items redoes
        only what was in flight. ``cancel`` (a ``CancelToken``) or cancelling the task
        stops it within a second. Returns ``{total, done, skipped, errors, elapsed, rate,
        resumed, cancelled}``."""
        return await _Warm(self, items, fn, concurrency, skip_cached, progress, cancel).run()

    def refresh_expiring(
        self,
        fn: Callable[..., Any],
        within: float,
        limit: int | None = None,
        candidates: Iterable[Any] | None = None,
    ) -> dict[str, Any]:
        """Refresh-ahead: refreshes the entries of cached function ``fn`` that are stale
        or turn stale within ``within`` seconds, soonest first, at most ``limit``.
        Candidates are the calls this prewarmer knows for ``fn`` (registered jobs and
        warmed items), or ``candidates`` (one argument per call, as for ``warm``)."""
        if not isinstance(fn, CachedCall):
            raise TypeError("fn must be a tenuto-cached function")
        window = _seconds("within", within)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if candidates is None:
            calls = dict(self._known.get(fn.key_name, {}))
        else:
            calls = {fn.key(item): (item,) for item in candidates}
        cache: Cache = fn._cache  # type: ignore[attr-defined]
        found = cache.get_many(list(calls))
        now = cache.now()
        expiring = sorted(
            (lookup.envelope.fresh_until, key)
            for key, lookup in found.items()
            if lookup.envelope is not None and lookup.envelope.fresh_until - now <= window
        )
        chosen = expiring[:limit] if limit is not None else expiring
        refreshed = errors = 0
        for _, key in chosen:
            try:
                _run_sync(fn.refresh, *calls[key])  # type: ignore[attr-defined]
                refreshed += 1
            except Exception as exc:
                errors += 1
                log.warning("refresh-ahead of %s failed: %r", key, exc)
        return {
            "candidates": len(calls),
            "expiring": len(expiring),
            "refreshed": refreshed,
            "errors": errors,
        }


# Calls remembered per cached function for refresh_expiring.
KNOWN_MAX = 100_000


def _digest(items: list[Any]) -> str:
    h = hashlib.sha256()
    for item in items:
        try:
            h.update(json.dumps(item, sort_keys=True, separators=(",", ":")).encode())
        except (TypeError, ValueError):
            h.update(repr(item).encode())
        h.update(b"\n")
    return h.hexdigest()


class _Progress:
    """Progress output: a callback, a bar on a terminal (tqdm, else rich, else one
    rewritten line on stderr), or nothing when not a terminal. ``TENUTO_PROGRESS=0/1``
    forces it off or on."""

    def __init__(self, progress: Any, total: int) -> None:
        self.callback: Callable[[dict[str, Any]], None] | None = None
        self.bar: Any = None
        self.line = False
        self.rich: Any = None
        if callable(progress):
            self.callback = progress
            return
        if progress is not None and not isinstance(progress, bool):
            raise TypeError("progress must be None, a bool or a callable taking a report dict")
        env = os.environ.get("TENUTO_PROGRESS")
        if progress is None:
            progress = env == "1" if env in ("0", "1") else sys.stderr.isatty()
        if not progress:
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

            self.bar = tqdm(total=total, desc="warm", unit="item", file=sys.stderr)
            return
        except ImportError:
            pass
        try:
            from rich.progress import Progress  # type: ignore[import-not-found,unused-ignore]

            self.rich = Progress(transient=False)
            self.rich.start()
            self.task = self.rich.add_task("warm", total=total)
            return
        except ImportError:
            pass
        self.line = True

    def update(self, report: dict[str, Any], advanced: int) -> None:
        if self.callback is not None:
            self.callback(report)
        elif self.bar is not None:
            self.bar.update(advanced)
        elif self.rich is not None:
            self.rich.update(self.task, advance=advanced)
        elif self.line:
            eta = report["eta"]
            sys.stderr.write(
                f"\rwarm {report['done'] + report['skipped'] + report['errors']}/"
                f"{report['total']} ({report['skipped']} skipped, {report['errors']} errors) "
                f"{report['rate']:.1f}/s" + (f" ETA {eta:.0f}s" if eta is not None else "")
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.rich is not None:
            self.rich.stop()
        elif self.line:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Warm:
    """One run of ``Prewarmer.awarm``."""

    def __init__(
        self,
        owner: Prewarmer,
        items: Iterable[Any],
        fn: Callable[..., Any],
        concurrency: int,
        skip_cached: bool,
        progress: Any,
        cancel: CancelToken | None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError(f"concurrency must be an int, not {type(concurrency).__name__}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if cancel is not None and not isinstance(cancel, CancelToken):
            raise TypeError("cancel must be a tenuto.CancelToken or None")
        if isinstance(items, (str, bytes)):
            raise TypeError("items must be an iterable of items, not a single str")
        self.owner, self.fn, self.concurrency = owner, fn, concurrency
        self.items = list(items)
        self.cached = isinstance(fn, CachedCall)
        self.skip_cached = bool(skip_cached) and self.cached
        self.is_async = _is_async(fn)
        self.call = _refresher(fn)
        self.cancel = cancel
        self.cache: Cache | None = getattr(fn, "_cache", None) if self.cached else owner.cache
        self.keys: list[str] | None = None
        if self.cached:
            self.keys = [fn.key(item) for item in self.items]  # type: ignore[attr-defined]
            for key, item in zip(self.keys, self.items):
                owner._remember(fn, key, (item,))
        self.checkpoint_key = (
            "tenuto.warm:"
            + hashlib.sha256(f"{_name_of(fn)}\n{_digest(self.items)}".encode()).hexdigest()
        )
        self.progress = _Progress(progress, len(self.items))
        self.done = self.skipped = self.errors = self.resumed = 0
        self.finished: set[int] = set()
        self.upto = 0  # every index below this is finished
        self.started = time.monotonic()

    def report(self, cancelled: bool = False) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        processed = self.done + self.skipped + self.errors
        rate = processed / elapsed if elapsed > 0 else 0.0
        left = len(self.items) - processed
        return {
            "total": len(self.items),
            "done": self.done,
            "skipped": self.skipped,
            "errors": self.errors,
            "resumed": self.resumed,
            "elapsed": elapsed,
            "rate": rate,
            "eta": left / rate if rate > 0 else None,
            "cancelled": cancelled,
        }

    async def load_checkpoint(self) -> None:
        if self.cache is None:
            return
        found = (await self.cache.aget(self.checkpoint_key)).value
        if not isinstance(found, dict) or found.get("total") != len(self.items):
            return
        upto = found.get("upto", 0)
        extra = found.get("done", [])
        if isinstance(upto, int) and isinstance(extra, list):
            self.finished = set(range(min(upto, len(self.items)))) | {
                i for i in extra if isinstance(i, int) and 0 <= i < len(self.items)
            }
            self.advance_upto()

    def advance_upto(self) -> None:
        while self.upto in self.finished:
            self.finished.discard(self.upto)
            self.upto += 1

    def is_finished(self, index: int) -> bool:
        return index < self.upto or index in self.finished

    async def save_checkpoint(self) -> None:
        if self.cache is None:
            return
        state = {"total": len(self.items), "upto": self.upto, "done": sorted(self.finished)}
        try:
            await self.cache.aset(self.checkpoint_key, state, ttl=CHECKPOINT_TTL)
        except Exception as exc:  # the warm goes on; a restart would redo more
            log.warning("warm checkpoint not saved: %r", exc)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        await self.load_checkpoint()
        queue: list[int] = []
        for index in range(len(self.items)):
            if self.is_finished(index):
                self.resumed += 1
                self.skipped += 1
            else:
                queue.append(index)
        if self.skip_cached and queue:
            assert self.keys is not None and self.cache is not None
            found = await self.cache.aget_many([self.keys[i] for i in queue])
            fresh = [i for i in queue if found[self.keys[i]].state == "hit"]
            self.skipped += len(fresh)
            fresh_set = set(fresh)
            queue = [i for i in queue if i not in fresh_set]
            for i in fresh:
                self.finished.add(i)
            self.advance_upto()
        self.progress.update(self.report(), len(self.items) - len(queue))
        executor = None
        if not self.is_async:
            executor = concurrent.futures.ThreadPoolExecutor(
                self.concurrency, thread_name_prefix="tenuto-warm"
            )
        cancelled = asyncio.Event()
        unhook = (
            self.cancel._on_cancel(lambda: loop.call_soon_threadsafe(cancelled.set))
            if self.cancel is not None
            else (lambda: None)
        )
        saving = asyncio.Lock()
        pending = iter(queue)

        async def worker() -> None:
            for index in pending:
                if cancelled.is_set():
                    return
                item = self.items[index]
                try:
                    if self.is_async:
                        await self.call(item)
                    else:
                        await loop.run_in_executor(executor, _run_sync, self.call, item)
                except Exception as exc:
                    self.errors += 1
                    log.warning("warm %s failed: %r", _name_of(self.fn), exc)
                else:
                    self.done += 1
                    self.finished.add(index)
                    self.advance_upto()
                    async with saving:  # one write at a time: a later state never lost
                        await self.save_checkpoint()
                self.progress.update(self.report(), 1)

        tasks = [loop.create_task(worker()) for _ in range(self.concurrency)]
        stopper = loop.create_task(cancelled.wait())
        try:
            await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            while not stopper.done() and not all(t.done() for t in tasks):
                await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            was_cancelled = cancelled.is_set()
            if not was_cancelled:
                for task in tasks:
                    task.result()  # a bug in the warm itself surfaces here
                if self.cache is not None and self.errors == 0:
                    # Kept after errors: a rerun retries only the failed items.
                    await self.cache.adelete(self.checkpoint_key)
            return self.report(cancelled=was_cancelled)
        finally:
            unhook()
            everything: list[asyncio.Task[Any]] = [*tasks, stopper]
            for each in everything:
                each.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
            if executor is not None:
                # Sync calls already running finish in the background; nothing new starts.
                executor.shutdown(wait=False, cancel_futures=True)
            self.progress.close()
