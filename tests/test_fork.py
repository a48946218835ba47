"""A forked child (gunicorn --preload, multiprocessing, celery) gets its own runtime and
Redis connection: it must not hang or crash on the parent's."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time

import tenuto
from tenuto.testing import FakeClock

CHILD_DEADLINE = 15.0


def run_in_fork(child) -> dict:
    """Runs child() in a forked process; returns what it reported, or fails on a hang."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        try:
            report = {"ok": True, **child()}
        except BaseException as exc:  # report everything, exit without running pytest's atexit
            report = {"ok": False, "error": repr(exc)}
        os.write(write_fd, json.dumps(report).encode())
        os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + CHILD_DEADLINE
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("forked child hung")
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: status {status}"
    return json.loads(data)


def test_child_uses_redis_after_parent_did_sync_and_async(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, fail_open=False)
    cache.set("parent", "p", ttl=60)
    assert cache.get("parent").value == "p"

    async def parent_async() -> None:
        await cache.aset("parent-async", "pa", ttl=60)
        assert (await cache.aget("parent-async")).value == "pa"

    asyncio.run(parent_async())

    def child() -> dict:
        seen = cache.get("parent").value
        cache.set("child", "c", ttl=60)

        async def child_async():
            await cache.aset("child-async", "ca", ttl=60)
            return (await cache.aget("parent-async")).value

        seen_async = asyncio.run(child_async())
        return {"seen": seen, "seen_async": seen_async, "stats": cache.stats()}

    report = run_in_fork(child)
    assert report["ok"], report
    assert (report["seen"], report["seen_async"]) == ("p", "pa")
    assert report["stats"]["degraded"] is False, "the child reached Redis itself"
    # The parent still works, and sees what the child wrote.
    assert cache.get("child").value == "c"
    assert cache.get("child-async").value == "ca"


def _mp_child(url: str, namespace: str, queue) -> None:  # pragma: no cover - child process
    cache = tenuto.Cache(url, namespace=namespace, fail_open=False)
    cache.set("from-mp", os.getpid(), ttl=60)
    queue.put(cache.get("from-parent").value)


def test_multiprocessing_fork_children(redis_server, namespace) -> None:
    cache = tenuto.Cache(redis_server.url, namespace=namespace, fail_open=False)
    cache.set("from-parent", "hello", ttl=60)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_mp_child, args=(redis_server.url, namespace, queue)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(CHILD_DEADLINE)
        assert p.exitcode == 0, "child hung or failed"
    assert sorted(queue.get(timeout=5) for _ in procs) == ["hello"] * 3
    assert isinstance(cache.get("from-mp").value, int)


def test_memory_cache_survives_fork() -> None:
    cache = tenuto.Cache(jitter=0.0)
    cache.set("k", "parent value", ttl=60)

    def child() -> dict:
        cache.set("c", 1, ttl=60)
        return {"k": cache.get("k").value, "c": cache.get("c").value}

    report = run_in_fork(child)
    assert report == {"ok": True, "k": "parent value", "c": 1}
    assert cache.get("c").state == "miss", "the child's writes stay in the child"


def test_child_forks_during_a_load_and_loads_itself(backend: str, request) -> None:
    """A thread of the parent is inside a load when the process forks: the child's call
    of the same key must not wait for a leader that does not exist there."""
    import threading

    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    cache = tenuto.Cache(url, namespace=f"fork{os.getpid()}{time.monotonic_ns()}")
    inside, release = threading.Event(), threading.Event()

    @cache.cached(ttl=60, wait_timeout=1)
    def slow(x: str) -> str:
        if os.getpid() == parent:
            inside.set()
            assert release.wait(10)
            return "parent"
        return "child"

    parent = os.getpid()
    loader = threading.Thread(target=slow, args=("x",))
    loader.start()
    assert inside.wait(10)
    try:
        report = run_in_fork(lambda: {"value": slow("x")})
    finally:
        release.set()
        loader.join(10)
    assert report == {"ok": True, "value": "child"}


FRESH_PROCESS_FORK = """
import os, sys, threading, time
import tenuto

cache = tenuto.Cache()  # memory only: tenuto's runtime never starts in this process
inside, release = threading.Event(), threading.Event()

@cache.cached(ttl=60)
def slow(x):
    if os.getpid() == parent:
        inside.set()
        release.wait(10)
        return "parent"
    return "child"

parent = os.getpid()
loader = threading.Thread(target=slow, args=(1,))
loader.start()
inside.wait(10)
pid = os.fork()
if pid == 0:
    os.write(1, slow(1).encode())
    os._exit(0)
deadline = time.monotonic() + 10
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        sys.exit("child hung")
    time.sleep(0.01)
release.set()
loader.join()
"""


def test_fresh_process_forking_during_a_load_on_memory() -> None:
    """Fork safety must not depend on the runtime having started before the fork."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_FORK], capture_output=True, timeout=30, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "child"


class Upstream:
    """A cached function's upstream that, in the parent, blocks the calls it is told to
    until released, so the process can fork while a load or a refresh is in flight;
    in a child it answers at once."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        self.blocking: set[str] = set()
        self.inside = {key: threading.Event() for key in ("load", "stale")}
        self.release = threading.Event()

    def answer(self, key: str) -> str:
        if os.getpid() != self.parent:
            return "child"
        if key in self.blocking:
            self.inside[key].set()
            assert self.release.wait(CHILD_DEADLINE)
        return "parent"


def lookup_pair(found) -> list:
    return [found.state, found.value]


def cache_for(backend: str, request, clock) -> tenuto.Cache:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    name = f"fork{os.getpid()}x{time.monotonic_ns()}"
    return tenuto.Cache(url, namespace=name, jitter=0.0, clock=clock)


# What a child reports when the parent forked during a load of "load" and a background
# refresh of the stale "stale": it loads "load" itself; it serves the stale value it
# inherited at once, and its own refresh (it has no share in the parent's) stores its
# answer. On Redis the parent, still alive, holds the lock of "load": the child waits
# `wait_timeout` (1 s) for its write, then loads; `refresh()` does not wait.
CHILD_SEES = {"load": "child", "stale": "parent", "refreshed": "child", "after": ["hit", "child"]}


def test_child_forks_during_a_load_and_a_background_refresh(backend: str, request) -> None:
    clock = FakeClock(1_700_000_000)
    cache = cache_for(backend, request, clock)
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=1000, wait_timeout=1)
    def song(key: str) -> str:
        return upstream.answer(key)

    assert song("stale") == "parent"
    clock.advance(11)
    upstream.blocking |= {"load", "stale"}
    assert song("stale") == "parent"  # stale: served, refreshed on the pool
    loader = threading.Thread(target=song, args=("load",))
    loader.start()
    assert upstream.inside["stale"].wait(10) and upstream.inside["load"].wait(10)

    def child() -> dict:
        return {
            "load": song("load"),
            "stale": song("stale"),
            "refreshed": song.refresh("stale"),
            "after": lookup_pair(song.lookup("stale")),
        }

    try:
        report = run_in_fork(child)
    finally:
        upstream.release.set()
        loader.join(10)
        song._settle(song.key("stale"))
    assert report == {"ok": True, **CHILD_SEES}


async def test_child_forks_during_an_async_load_and_refresh(backend: str, request) -> None:
    """The same with `async def`: the parent's load and refresh are tasks on its loop,
    which the child does not have; the child runs its own."""
    clock = FakeClock(1_700_000_000)
    cache = cache_for(backend, request, clock)
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=1000, wait_timeout=1)
    async def song(key: str) -> str:
        if os.getpid() == upstream.parent and key in upstream.blocking:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, upstream.answer, key)
        return upstream.answer(key)

    assert await song("stale") == "parent"
    clock.advance(11)
    upstream.blocking |= {"load", "stale"}
    assert await song("stale") == "parent"  # stale: served, refreshed by a task
    load = asyncio.ensure_future(song("load"))
    loop = asyncio.get_running_loop()
    for key in ("load", "stale"):
        assert await loop.run_in_executor(None, upstream.inside[key].wait, 10)

    def child() -> dict:
        async def calls() -> dict:
            return {
                "load": await song("load"),
                "stale": await song("stale"),
                "refreshed": await song.refresh("stale"),
                "after": lookup_pair(await song.lookup("stale")),
            }

        return asyncio.run(calls())

    try:
        report = await loop.run_in_executor(None, run_in_fork, child)
    finally:
        upstream.release.set()
        assert await load == "parent"
        await song._asettle(song.key("stale"))
    assert report == {"ok": True, **CHILD_SEES}


_pool_song = None


def _pool_child(_: int) -> dict:  # pragma: no cover - runs in a multiprocessing child
    assert _pool_song is not None
    return {
        "load": _pool_song("load"),
        "stale": _pool_song("stale"),
        "refreshed": _pool_song.refresh("stale"),
        "after": lookup_pair(_pool_song.lookup("stale")),
    }


def test_multiprocessing_pool_forked_during_a_load_and_a_refresh(backend: str, request) -> None:
    """A `multiprocessing` pool (fork) started while a thread loads and a refresh runs:
    every child answers by itself, none waits for the parent's flights."""
    global _pool_song
    clock = FakeClock(1_700_000_000)
    cache = cache_for(backend, request, clock)
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=1000, wait_timeout=1)
    def song(key: str) -> str:
        return upstream.answer(key)

    _pool_song = song
    assert song("stale") == "parent"
    clock.advance(11)
    upstream.blocking |= {"load", "stale"}
    assert song("stale") == "parent"
    loader = threading.Thread(target=song, args=("load",))
    loader.start()
    assert upstream.inside["stale"].wait(10) and upstream.inside["load"].wait(10)
    try:
        with multiprocessing.get_context("fork").Pool(3, maxtasksperchild=1) as pool:
            reports = pool.map_async(_pool_child, range(3), 1).get(CHILD_DEADLINE)
    finally:
        _pool_song = None
        upstream.release.set()
        loader.join(10)
        song._settle(song.key("stale"))
    for report in reports:
        # On Redis a child may find the refresh another child stored: a hit on "child".
        assert report["stale"] in ("parent", "child")
        assert {**report, "stale": "?"} == {**CHILD_SEES, "stale": "?"}
