"""A forked child (gunicorn --preload, multiprocessing, celery) gets its own runtime and
Redis connection: it must not hang or crash on the parent's."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import time

import tenuto

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
