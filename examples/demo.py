"""tenuto in front of slow, rate-limited, flaky upstreams: the same workload against the
same two apps, with tenuto and without.

Starts on loopback a simulated upstream (examples/upstream.py: a recommendation API whose
20-70 s calls are scaled down, with an 80/minute limit, and a YouTube-Music-like API),
the Flask app (examples/flask_app.py) and the FastAPI app (examples/fastapi_app.py). Each
app runs twice, with tenuto and as it would be without (every request calls the
upstream), against its own fresh upstream. Concurrent clients send the same requests
three times: cold, warm, and during an upstream outage (the cache's clock first moves
past every TTL, so what is served then is stale). Prints one table per app and a closing
line measured from the runs.

    python3 examples/demo.py          # memory backend; REDIS_URL=redis://... for Redis
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fastapi  # noqa: F401
    import flask  # noqa: F401
    import httpx
    import uvicorn
except ImportError as missing:  # installed without the extra
    sys.exit(f"the demo's apps need {missing.name}: python3 -m pip install '.[demo]'")

# Run as a script or by runpy: the sibling modules are imported from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastapi_app  # noqa: E402
import flask_app  # noqa: E402
from upstream import UNKNOWN_IDS, Upstream, has_lyrics  # noqa: E402

import tenuto  # noqa: E402

SCALE = 0.01  # upstream latency: the recommendation API's 20-70 s become 0.2-0.7 s
# How far the cache clock moves before the outage: past every TTL of the app, inside
# every stale window (Flask: TTLs up to 6 h, stale for a day; FastAPI: 90 days, 180).
STALE_SKIP = {"flask": 7 * 3600, "fastapi": 100 * 86400}
PHASES = ("cold", "warm", "outage")


# -- the workload ------------------------------------------------------------------------

Request = tuple[str, str, Any]  # method, path, JSON body


def flask_workload() -> tuple[list[Request], list[Request]]:
    """(writes, reads): two uploads, then 27 distinct reads asked 4 times each."""
    songs = [f"song-{i}" for i in range(20)]
    with_lyrics = [s for s in songs if has_lyrics(s)][:8]
    without = [s for s in songs if not has_lyrics(s)][:4]
    reads = [("GET", f"/trending?country={c}", None) for c in "US GB DE FR JP BR IN MX".split()]
    reads += [("GET", "/billboard", None)]
    reads += [("GET", f"/lyrics/{s}", None) for s in with_lyrics + without]
    reads += [("GET", f"/artist/artist-{i}/songs", None) for i in range(6)]
    writes = [("POST", "/songs", {"artist": f"artist-{i}", "title": "New single"}) for i in (1, 2)]
    return writes, reads * 4


def fastapi_workload() -> tuple[list[Request], list[Request]]:
    """8 playlists of 3-5 Spotify IDs (some unknown to the upstream), each asked 3 times."""
    rng = random.Random(7)
    known = [f"{i:02d}" + "".join(rng.choices("abcdefXYZ0123456789", k=20)) for i in range(16)]
    unknown = sorted(UNKNOWN_IDS)
    reads = []
    for i in range(8):
        seeds = rng.sample(known, rng.randint(3, 4)) + ([unknown[i % 3]] if i % 2 else [])
        reads.append(("GET", "/recommendations?seeds=" + ",".join(seeds), None))
    return [], reads * 3


# -- one run -----------------------------------------------------------------------------


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)  # ms, answered requests (2xx)
    states: list[str] = field(default_factory=list)  # X-Cache of the reads ("" without)
    errors: int = 0
    upstream_calls: int = 0
    throttled: int = 0

    @property
    def served_stale(self) -> int:
        return self.states.count("stale")

    def percentile(self, q: int) -> float | None:
        if not self.latencies:
            return None
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]

    @property
    def hit_rate(self) -> float | None:
        with_header = [s for s in self.states if s]
        return with_header.count("hit") / len(with_header) if with_header else None


class DemoClock:
    """The cache's clock: real time, plus however far the demo has moved it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def drive(base_url: str, requests: list[Request], clients: int, phase: Phase) -> None:
    """Sends `requests` from `clients` concurrent clients (one API key each)."""
    lock = threading.Lock()

    def client(index: int) -> None:
        headers = {"X-Api-Key": f"user-{index}"}
        with httpx.Client(base_url=base_url, timeout=30, headers=headers) as http:
            for method, path, body in requests[index::clients]:
                started = time.perf_counter()
                response = http.request(method, path, json=body)
                elapsed = (time.perf_counter() - started) * 1000
                ok = response.status_code in (200, 201)
                with lock:
                    if ok:
                        phase.latencies.append(elapsed)
                    else:
                        phase.errors += 1
                    if method == "GET":
                        phase.states.append(response.headers.get("X-Cache", ""))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))


@contextmanager
def serving(kind: str, app: Any) -> Iterator[str]:
    """The app on a free loopback port, in a thread; yields its base URL."""
    if kind == "flask":
        from werkzeug.serving import make_server

        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
            app.extensions["upstream"].close()
        return
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Connections accepted on a socket handed to uvicorn do not get TCP_NODELAY from
    # asyncio; they inherit it from here (without it a keep-alive request waits ~40 ms
    # for a delayed ACK).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", ws="none", http="h11"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def run(kind: str, use_tenuto: bool, redis_url: str | None) -> dict[str, Phase]:
    """One app, with or without tenuto, against its own fresh upstream: the three phases."""
    writes, reads = flask_workload() if kind == "flask" else fastapi_workload()
    random.Random(1).shuffle(reads)
    clients = 4 if kind == "flask" else 6
    module = flask_app if kind == "flask" else fastapi_app
    clock = DemoClock()
    cache = None
    if use_tenuto:
        namespace = f"demo-{kind}-{uuid.uuid4().hex[:8]}"
        cache = tenuto.Cache(redis_url, namespace=namespace, clock=clock)
    phases = {name: Phase() for name in PHASES}
    with Upstream(scale=SCALE) as upstream:
        if kind == "fastapi":
            app = module.create_app(upstream.url, cache, use_tenuto, limits_url=redis_url)
        else:
            app = module.create_app(upstream.url, cache, use_tenuto)
        with serving(kind, app) as base_url:
            for name, phase in phases.items():
                before = upstream.counters()
                if name == "outage":
                    clock.offset += STALE_SKIP[kind]  # every cached entry is stale now
                    upstream.outage(True)
                else:
                    drive(base_url, writes, 1, phase)  # writes first; they need the upstream
                drive(base_url, reads, clients, phase)
                upstream.outage(False)
                after = upstream.counters()
                phase.upstream_calls = total(after["calls"]) - total(before["calls"])
                phase.throttled = total(after["throttled"]) - total(before["throttled"])
    if cache is not None and redis_url:
        cache.clear()
    return phases


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


# -- the report --------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(title: str, runs: dict[str, dict[str, Phase]]) -> str:
    header = ("run", "phase", "upstream calls", "p50 ms", "p95 ms", "hit rate", "stale served")
    header += ("429s from upstream", "client errors")
    rows = [header]
    for label, phases in runs.items():
        for name, phase in phases.items():
            rate = phase.hit_rate
            rows.append(
                (
                    label,
                    name,
                    str(phase.upstream_calls),
                    ms(phase.percentile(50)),
                    ms(phase.percentile(95)),
                    "-" if rate is None else f"{rate:.0%}",
                    str(phase.served_stale),
                    str(phase.throttled),
                    str(phase.errors),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [title]
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="tenuto demo: the same workload with and without tenuto"
    )
    parser.parse_args(argv)
    # The outage makes every background refresh fail and tenuto logs each one (a warning);
    # the tables count them instead. Levels are put back after (runpy: the tests go on).
    quiet = [logging.getLogger(name) for name in ("tenuto", "werkzeug")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        report()
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def report() -> None:
    redis_url = os.environ.get("REDIS_URL")
    backend = redis_url.split("@")[-1] if redis_url else "memory (set REDIS_URL for Redis)"
    started = time.monotonic()
    print(f"tenuto demo: cache on {backend}; upstream latency x{SCALE} (real limits: 80/minute)")
    results: dict[str, dict[str, dict[str, Phase]]] = {}
    titles = {
        "flask": "Flask app: trending, billboard, lyrics, artist songs (YouTube-Music-like API)",
        "fastapi": "FastAPI app: ID registry, audio features, recommendations (RecoBeat-like API)",
    }
    for kind in ("flask", "fastapi"):
        results[kind] = {
            "tenuto": run(kind, True, redis_url),
            "no tenuto": run(kind, False, redis_url),
        }
        print()
        print(table(titles[kind], results[kind]))
    warm = [r["tenuto"]["warm"] for r in results.values()]
    warm_base = [r["no tenuto"]["warm"] for r in results.values()]
    calls = sum(p.upstream_calls for p in warm)
    calls_base = sum(p.upstream_calls for p in warm_base)
    fewer = 100 * (1 - calls / calls_base) if calls_base else 0.0
    p50 = statistics.median([x for p in warm for x in p.latencies])
    p50_base = statistics.median([x for p in warm_base for x in p.latencies])
    outage_errors = sum(r["tenuto"]["outage"].errors for r in results.values())
    note = (
        "Latencies are of answered requests; errors are all other answers. Before the outage"
        " the cache clock moves past every TTL (Flask 7 h, FastAPI 100 days), so what the"
        " outage run serves is stale; it sends the reads only (the uploads need the upstream)."
        f" Ran in {time.monotonic() - started:.0f} s."
    )
    print()
    print(textwrap.fill(note, width=100))
    print(
        f"warm run: {fewer:.0f}% fewer upstream calls, p50 {p50:.1f} ms (was {p50_base:.1f} ms),"
        f" {outage_errors} errors during the outage"
    )


if __name__ == "__main__":
    main()
