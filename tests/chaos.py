"""The fault suite's harness: a real app server on loopback, a bounded load of HTTP
clients, and the measurements each fault test reports.

The size of a run comes from the environment, so the same tests are the quick check in
`nox -s tests` and the soak in `nox -s chaos`:

- TENUTO_CHAOS_CLIENTS: concurrent clients (default 20)
- TENUTO_CHAOS_PACE: seconds between one client's requests (default 0.05)
- TENUTO_CHAOS_OUTAGE: seconds each outage (kill, pause) lasts (default 1.5)
- TENUTO_CHAOS_ROUNDS: kill/restart + pause/resume rounds per run (default 1)
- TENUTO_CHAOS_STEADY: seconds of undisturbed load around the faults (default 0.5)
- TENUTO_CHAOS_LOAD: seconds of load on a full or evicting Redis (default 2)
- TENUTO_CHAOS_MARGIN: seconds a request may take over the command timeout (default 0.1)
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tenuto
from tenuto.testing import free_port

TESTS = Path(__file__).resolve().parent

CLIENTS = int(os.environ.get("TENUTO_CHAOS_CLIENTS", "20"))
OUTAGE = float(os.environ.get("TENUTO_CHAOS_OUTAGE", "1.5"))
ROUNDS = int(os.environ.get("TENUTO_CHAOS_ROUNDS", "1"))
STEADY = float(os.environ.get("TENUTO_CHAOS_STEADY", "0.5"))
LOAD_SECONDS = float(os.environ.get("TENUTO_CHAOS_LOAD", "2"))
MARGIN = float(os.environ.get("TENUTO_CHAOS_MARGIN", "0.1"))

# The apps' Redis command timeout, and how long a simulated upstream call takes.
COMMAND_TIMEOUT = 0.5
UPSTREAM_SECONDS = 0.02
# Each client sends one request per PACE seconds: 20 clients make ~400 requests/s, a
# load the shared 2-core test machine serves without queueing, so a slow answer is
# tenuto's doing and not the scheduler's. (At ~650 requests/s one uvicorn process on
# that machine queues: p99 190 ms before any fault.)
PACE = float(os.environ.get("TENUTO_CHAOS_PACE", "0.05"))
HOT_KEYS = [f"h{i}" for i in range(12)]
BRIEF_KEYS = [f"b{i}" for i in range(4)]
# tenuto's reconnect backoff doubles from 50 ms up to 2 s, so a process retries at most
# 2 s after Redis is back; a probe round and a loaded scheduler get the rest.
RECOVERY_DEADLINE = 2.0 + COMMAND_TIMEOUT + 2.5


def wait_until(condition: Callable[[], bool], deadline: float, what: str) -> float:
    """Polls `condition` until it holds; returns the seconds it took, fails after
    `deadline` seconds naming `what`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > deadline:
            raise AssertionError(f"{what}: not within {deadline} s")
        time.sleep(0.02)  # polling interval of a condition with a deadline
    return time.monotonic() - start


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection (no keep-alive to go stale across a fault)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, body
    finally:
        conn.close()


class AppServer:
    """A gunicorn or uvicorn process serving one of the chaos apps, its output in a file
    (a full pipe would stall it), stopped (by its pid) however the test ends."""

    def __init__(self, kind: str, redis_url: str, namespace: str, tmp: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.upstream_log = tmp / "upstream.log"
        self.output = tmp / f"{kind}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "CHAOS_REDIS_URL": redis_url,
            "CHAOS_NAMESPACE": namespace,
            "CHAOS_COMMAND_TIMEOUT": str(COMMAND_TIMEOUT),
            "CHAOS_UPSTREAM_SECONDS": str(UPSTREAM_SECONDS),
            "CHAOS_UPSTREAM_LOG": str(self.upstream_log),
        }
        if kind == "gunicorn":
            self.args = [sys.executable, "-m", "gunicorn", "--preload", "-w", "4"]
            self.args += ["--threads", "8", "-b", f"127.0.0.1:{self.port}"]
            self.args += ["chaos_flask_app:app"]
            self.workers = 4
        else:
            self.args = [sys.executable, "-m", "uvicorn", "chaos_fastapi_app:app"]
            self.args += ["--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"]
            self.workers = 1
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float = 30.0) -> None:
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=TESTS, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_until(self._all_workers_answer, deadline, f"{self.kind} serving")

    def _all_workers_answer(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited:\n{self.output.read_text()}")
        try:
            get(self.port, "/health", timeout=2)
        except OSError:
            return False
        return len(self.worker_pids()) == self.workers

    def worker_pids(self) -> set[int]:
        """The processes that serve requests: gunicorn's workers, or uvicorn itself."""
        assert self.proc is not None
        if self.kind != "gunicorn":
            return {self.proc.pid}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(pid) for pid in children.read_text().split()}

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def upstream_calls(self) -> Counter[str]:
        if not self.upstream_log.exists():
            return Counter()
        return Counter(line.split()[1] for line in self.upstream_log.read_text().splitlines())

    def each_worker(self, path: str, deadline: float = 10.0) -> dict[int, dict]:
        """GETs `path` until every worker has answered; {pid: its JSON}."""
        answers: dict[int, dict] = {}
        pids = self.worker_pids()

        def round_() -> bool:
            with ThreadPoolExecutor(2 * self.workers) as pool:
                for status, _, body in pool.map(
                    lambda _: get(self.port, path), range(2 * self.workers)
                ):
                    assert status == 200, body
                    data = json.loads(body)
                    answers.setdefault(data["pid"], data)
            return pids <= answers.keys()

        wait_until(round_, deadline, f"every worker answering {path}")
        return answers

    def recovery(self, redis_url: str, namespace: str, tag: str) -> float:
        """Seconds until every worker reads from Redis a value written there now."""
        start = time.monotonic()
        writer = tenuto.Cache(redis_url, namespace=namespace, fail_open=False, jitter=0.0)
        writer.set(tag, tag, ttl=600)
        seen: set[int] = set()
        pids = self.worker_pids()

        def all_back() -> bool:
            with ThreadPoolExecutor(2 * self.workers) as pool:
                for status, _, body in pool.map(
                    lambda _: get(self.port, f"/probe/{tag}"), range(2 * self.workers)
                ):
                    data = json.loads(body)
                    if status == 200 and data["state"] == "hit" and data["value"] == tag:
                        seen.add(data["pid"])
            return pids <= seen

        wait_until(all_back, RECOVERY_DEADLINE, f"every {self.kind} worker back on Redis")
        return time.monotonic() - start


@contextmanager
def app_server(kind: str, redis_url: str, namespace: str, tmp: Path) -> Iterator[AppServer]:
    server = AppServer(kind, redis_url, namespace, tmp)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Sample:
    at: float  # seconds since the load started
    seconds: float  # as the client saw it
    server_seconds: float  # inside the app (nan when there was no answer)
    error: str | None
    cache_state: str | None
    phase: str  # what the test was doing to Redis when the request started


@dataclass
class Load:
    """CLIENTS threads, each sending one GET per PACE seconds to a random hot or brief key
    until stopped; every answer is checked (status 200, the JSON of the key asked for)."""

    port: int
    clients: int = CLIENTS
    samples: list[Sample] = field(default_factory=list)
    phase: str = "steady"
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.elapsed = time.monotonic() - self.started

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        next_at = time.monotonic()
        while not self._stop.is_set():
            route, keys = rng.choice((("hot", HOT_KEYS), ("hot", HOT_KEYS), ("brief", BRIEF_KEYS)))
            key = rng.choice(keys)
            start, phase = time.monotonic(), self.phase
            error, server_seconds, state = None, float("nan"), None
            try:
                status, headers, body = get(self.port, f"/{route}/{key}")
                server_seconds = float(headers.get("x-server-seconds", "nan"))
                state = headers.get("x-cache")
                if status != 200:
                    error = f"HTTP {status}: {body[:200]!r}"
                elif json.loads(body).get("key") != key:
                    error = f"wrong value for {key}: {body[:200]!r}"
            except Exception as exc:  # every failure is a client error, counted
                error = repr(exc)
            self.samples.append(
                Sample(
                    start - self.started,
                    time.monotonic() - start,
                    server_seconds,
                    error,
                    state,
                    phase,
                )
            )
            next_at = max(next_at + PACE, time.monotonic())
            self._stop.wait(next_at - time.monotonic())  # the pace of one client

    def steady(self, seconds: float) -> None:
        """Lets the load run undisturbed for `seconds` (the load is the thing measured)."""
        self._stop.wait(seconds)

    def worst_by_phase(self) -> dict[str, float]:
        worst: dict[str, float] = {}
        for s in self.samples:
            worst[s.phase] = max(worst.get(s.phase, 0.0), s.seconds)
        return worst


class Report:
    """What a run counted: the load's samples, the app's upstream calls, recoveries."""

    def __init__(
        self, name: str, load: Load, app: AppServer, recoveries: list[float] | None = None
    ) -> None:
        self.name = name
        self.samples = list(load.samples)
        self.upstream = app.upstream_calls()
        self.recoveries = recoveries or []
        self.states = Counter(s.cache_state for s in self.samples)
        self.worst_by_phase = load.worst_by_phase()

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error is not None]

    @property
    def worst(self) -> float:
        return max(s.seconds for s in self.samples)

    @property
    def worst_server(self) -> float:
        return max((s.server_seconds for s in self.samples if s.server_seconds >= 0), default=0)

    def quantile(self, q: float) -> float:
        ordered = sorted(s.seconds for s in self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def over(self, seconds: float) -> int:
        """Requests that took longer than `seconds`, as the client saw them."""
        return sum(s.seconds > seconds for s in self.samples)

    def upstream_calls(self, prefix: str = "") -> int:
        return sum(n for key, n in self.upstream.items() if key.startswith(prefix))

    def print(self) -> None:
        print(
            f"\n[chaos] {self.name}: {len(self.samples)} requests from {CLIENTS} clients, "
            f"{len(self.errors)} client errors, upstream calls {self.upstream_calls()} "
            f"(hot {self.upstream_calls('hot:')}, brief {self.upstream_calls('brief:')}), "
            f"worst latency {self.worst * 1000:.0f} ms (in the app "
            f"{self.worst_server * 1000:.0f} ms), p99 {self.quantile(0.99) * 1000:.0f} ms, "
            f"{self.over(COMMAND_TIMEOUT)} over the command timeout, recovery "
            f"{', '.join(f'{r:.2f} s' for r in self.recoveries) or '-'}, "
            f"X-Cache {dict(self.states)}, worst by phase "
            f"{ {phase: round(s * 1000) for phase, s in self.worst_by_phase.items()} } ms"
        )
