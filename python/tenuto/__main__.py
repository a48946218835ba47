"""`python -m tenuto`: the cache from a shell.

    python -m tenuto [--url URL] [--namespace NS] stats [--json]
    python -m tenuto [--url URL] [--namespace NS] invalidate --all | --function NAME | --prefix P
    python -m tenuto [--url URL] warm module:function --from items.jsonl [--concurrency N]

The Redis URL is ``--url``, else ``TENUTO_URL``, else ``REDIS_URL``. Keys are found with
SCAN, never KEYS. ``warm`` imports the function (a tenuto-cached function is refreshed,
skipping fresh entries; any other callable is called) and calls it once per line of a
JSON-lines file, one JSON value per line; it is resumable (run it again after a crash
and it redoes only what was in flight) and stops cleanly on Ctrl-C.
Exit status: 0 done, 1 some items or the backend failed, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from tenuto._core import Cache, CachedCall, TenutoError
from tenuto._prewarm import CancelToken, Prewarmer

INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments: exit status 2 with the message."""


def _url(args: argparse.Namespace, required: bool) -> str | None:
    url: str | None = args.url or os.environ.get("TENUTO_URL") or os.environ.get("REDIS_URL")
    if required and not url:
        raise UsageError("no Redis URL: pass --url or set TENUTO_URL or REDIS_URL")
    return url


def _cache(args: argparse.Namespace) -> Cache:
    url = _url(args, required=True)
    try:
        # fail_open=False: a CLI says the backend is down instead of answering from memory.
        return Cache(url, namespace=args.namespace or "app", fail_open=False)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _import(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected module:function, got {target!r}")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"{module_name} has no {attr}") from None
    if not callable(found):
        raise UsageError(f"{target} is not callable")
    return found


def _items(path: str) -> Iterator[Any]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for number, line in enumerate(stream, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise UsageError(f"{path}, line {number}: not JSON ({exc})") from None
    finally:
        if stream is not sys.stdin:
            stream.close()


def cmd_stats(args: argparse.Namespace) -> int:
    cache = _cache(args)
    keys = cache.count()  # one SCAN walk; raises when Redis is down
    stats = cache.stats()
    out = {
        "url": stats["url"],
        "namespace": stats["namespace"],
        "keys": keys,
        "maxmemory_policy": stats.get("maxmemory_policy"),
        "evicts_tenuto_state": stats.get("evicts_tenuto_state"),
    }
    if args.function:
        out["function"] = args.function
        out["function_keys"] = cache.count(_function_prefix(args.function))
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


def _function_prefix(name: str) -> str:
    """A cached function's key prefix: its key name (``module.qualname`` or ``name=``),
    or the function itself named as ``module:function``."""
    if ":" in name:
        fn = _import(name)
        if not isinstance(fn, CachedCall):
            raise UsageError(f"{name} is not a tenuto-cached function")
        name = fn.key_name
    return f"{name}:"


def cmd_invalidate(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if args.all:
        prefix, what = "", f"namespace {cache.namespace}"
    elif args.function:
        prefix = _function_prefix(args.function)
        what = f"function {prefix[:-1]}"
    else:
        prefix, what = args.prefix, f"prefix {args.prefix!r}"
    if args.dry_run:
        print(f"would invalidate {cache.count(prefix)} keys of {what}")
    else:
        print(f"invalidated {cache.clear(prefix=prefix)} keys of {what}")
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    url = _url(args, required=False)
    if url:
        # The module's own Cache.from_env() (or REDIS_URL reader) sees the same Redis.
        os.environ["TENUTO_URL"] = url
    fn = _import(args.target)
    items = list(_items(args.source))
    checkpoints = None
    if not isinstance(fn, CachedCall) and url:
        checkpoints = Cache(url, namespace=args.namespace or "app")
    token = CancelToken()

    async def run() -> dict[str, Any]:
        # The loop's own signal handling: a signal that lands on a worker thread still
        # wakes the loop (its wake-up fd), so Ctrl-C stops the warm within a second.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, token.cancel)
        return await Prewarmer(checkpoints).awarm(
            items,
            fn,
            concurrency=args.concurrency,
            skip_cached=args.skip_cached,
            progress=args.progress,
            cancel=token,
        )

    report = asyncio.run(run())
    print(json.dumps(report))
    if report["cancelled"]:
        return INTERRUPTED
    return 1 if report["errors"] else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m tenuto", description="tenuto's cache from a shell."
    )
    top.add_argument("--url", help="Redis URL (default: $TENUTO_URL, then $REDIS_URL)")
    top.add_argument("--namespace", help="cache namespace (default: app)")
    sub = top.add_subparsers(dest="command", required=True)

    stats = sub.add_parser("stats", help="where the cache lives and how many keys it holds")
    stats.add_argument("--function", help="also count one cached function's keys")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(run=cmd_stats)

    inv = sub.add_parser("invalidate", help="delete entries (SCAN + UNLINK, never KEYS)")
    which = inv.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every entry of the namespace")
    which.add_argument(
        "--function", help="a cached function's entries: its key name, or module:function"
    )
    which.add_argument("--prefix", help="entries whose keys start with PREFIX")
    inv.add_argument("--dry-run", action="store_true", help="count only, delete nothing")
    inv.set_defaults(run=cmd_invalidate)

    warm = sub.add_parser("warm", help="call a function once per item of a JSON-lines file")
    warm.add_argument("target", metavar="module:function")
    warm.add_argument(
        "--from", dest="source", required=True, help="JSON lines, one item each ('-': stdin)"
    )
    warm.add_argument("--concurrency", type=int, default=2, help="calls at once (default 2)")
    warm.add_argument(
        "--no-skip-cached",
        dest="skip_cached",
        action="store_false",
        help="refresh entries that are still fresh too",
    )
    warm.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal; TENUTO_PROGRESS=0/1 forces)",
    )
    warm.set_defaults(run=cmd_warm)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except UsageError as exc:
        print(f"python -m tenuto: {exc}", file=sys.stderr)
        return 2
    except (TenutoError, OSError) as exc:
        print(f"python -m tenuto: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    status = main()
    if status == INTERRUPTED:
        # Calls still in flight were abandoned (the checkpoint has them as not done): exit
        # now rather than wait at interpreter exit for threads stuck in them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
