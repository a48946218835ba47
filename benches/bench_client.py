"""The upstream client against peers, in one run, on a local HTTP server (uvicorn in its
own process, small JSON): async `aget_json`, 1,000 requests at 100 concurrent, next to
aiohttp and httpx; sync `get_json` from 8 threads next to requests; a cached `get_json`
hit next to a `@cache.cached` hit. Prints requests per second (or ns per hit) and ratios.
A peer that is not installed, or fails, is reported as such, not skipped silently.
Usage: python benches/bench_client.py [--quick]
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tenuto

QUICK = "--quick" in sys.argv
REQUESTS = 1_000
CONCURRENCY = 100
THREADS = 8
PER_THREAD = 100 if QUICK else 250
REPEATS = 3 if QUICK else 5
HITS = 20_000 if QUICK else 100_000

SERVER = """
import sys, uvicorn
BODY = b'{"id":"4uLU6hMCjMI75M1A2tKUQC","name":"Never Gonna Give You Up","popularity":77}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error",
            access_log=False, backlog=4096)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def best_rate(run: Callable[[], float]) -> float:
    """Requests per second: the median of REPEATS runs (after one warm-up)."""
    run()
    return statistics.median(run() for _ in range(REPEATS))


def async_rate(one: Callable[[], Awaitable[Any]], setup: Any = None) -> float:
    async def batch() -> float:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def limited() -> None:
            async with sem:
                await one()

        start = time.perf_counter()
        await asyncio.gather(*(limited() for _ in range(REQUESTS)))
        return REQUESTS / (time.perf_counter() - start)

    async def runs() -> float:
        await batch()
        return statistics.median([await batch() for _ in range(REPEATS)])

    return asyncio.run(runs())


def bench_async(url: str) -> dict[str, float | str]:
    results: dict[str, float | str] = {}
    client = tenuto.Client(url, retries=0)
    results["tenuto aget_json"] = async_rate(lambda: client.aget_json("/track"))

    try:
        import aiohttp

        async def aiohttp_rate() -> float:
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def one() -> Any:
                    async with session.get(url + "/track") as response:
                        response.raise_for_status()
                        return await response.json()

                sem = asyncio.Semaphore(CONCURRENCY)

                async def limited() -> None:
                    async with sem:
                        await one()

                samples = []
                for _ in range(REPEATS + 1):
                    start = time.perf_counter()
                    await asyncio.gather(*(limited() for _ in range(REQUESTS)))
                    samples.append(REQUESTS / (time.perf_counter() - start))
                return statistics.median(samples[1:])

        results["aiohttp"] = asyncio.run(aiohttp_rate())
    except Exception as exc:  # report, do not hide
        results["aiohttp"] = f"failed: {exc!r}"

    try:
        import httpx

        async def httpx_rate() -> float:
            limits = httpx.Limits(max_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=url, limits=limits) as session:

                async def one() -> Any:
                    response = await session.get("/track")
                    response.raise_for_status()
                    return response.json()

                sem = asyncio.Semaphore(CONCURRENCY)

                async def limited() -> None:
                    async with sem:
                        await one()

                samples = []
                for _ in range(REPEATS + 1):
                    start = time.perf_counter()
                    await asyncio.gather(*(limited() for _ in range(REQUESTS)))
                    samples.append(REQUESTS / (time.perf_counter() - start))
                return statistics.median(samples[1:])

        results["httpx"] = asyncio.run(httpx_rate())
    except Exception as exc:
        results["httpx"] = f"failed: {exc!r}"
    return results


def threaded_rate(make_worker: Callable[[], Callable[[], Any]]) -> float:
    def run() -> float:
        workers = [make_worker() for _ in range(THREADS)]
        barrier = threading.Barrier(THREADS + 1)

        def loop(work: Callable[[], Any]) -> None:
            barrier.wait()
            for _ in range(PER_THREAD):
                work()

        threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        return THREADS * PER_THREAD / (time.perf_counter() - start)

    return best_rate(run)


def bench_sync(url: str) -> dict[str, float | str]:
    results: dict[str, float | str] = {}
    client = tenuto.Client(url, retries=0)
    results["tenuto get_json"] = threaded_rate(lambda: lambda: client.get_json("/track"))
    try:
        import requests

        def requests_worker() -> Callable[[], Any]:
            session = requests.Session()  # one per thread: Session is not thread-safe
            return lambda: session.get(url + "/track").json()

        results["requests"] = threaded_rate(requests_worker)
    except Exception as exc:
        results["requests"] = f"failed: {exc!r}"
    return results


def bench_hits(url: str) -> dict[str, float]:
    cache = tenuto.Cache()
    client = tenuto.Client(url, cache=cache)

    @cache.cached(ttl=300)
    def track(track_id: str) -> dict[str, Any]:
        return {"id": track_id}

    def per_call(fn: Callable[[], Any]) -> float:
        fn()
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter_ns()
            for _ in range(HITS):
                fn()
            samples.append((time.perf_counter_ns() - start) / HITS)
        return statistics.median(samples)

    return {
        "tenuto get_json(ttl=300) hit": per_call(lambda: client.get_json("/track", ttl=300)),
        "@cache.cached hit": per_call(lambda: track("4uLU6hMCjMI75M1A2tKUQC")),
    }


def show(title: str, results: dict[str, Any], unit: str, base: str, higher: bool) -> None:
    print(f"\n{title}")
    reference = results[base]
    for name, value in results.items():
        if isinstance(value, str):
            print(f"  {name:32} {value}")
            continue
        if higher:
            print(f"  {name:32} {value:12,.0f} {unit}   tenuto/this: {reference / value:5.2f}x")
        else:
            print(
                f"  {name:32} {value:12,.0f} {unit}   tenuto costs {reference / value:5.2f}x this"
            )


def main() -> None:
    proc, url = start_server()
    try:
        print(f"tenuto {tenuto.__version__}; server: uvicorn in its own process; {url}")
        show(
            f"async: {REQUESTS} GETs at {CONCURRENCY} concurrent",
            bench_async(url),
            "req/s",
            "tenuto aget_json",
            True,
        )
        show(
            f"sync: {THREADS} threads x {PER_THREAD} GETs",
            bench_sync(url),
            "req/s",
            "tenuto get_json",
            True,
        )
        hits = bench_hits(url)
        show("cached hit (memory)", hits, "ns/call", "tenuto get_json(ttl=300) hit", False)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
