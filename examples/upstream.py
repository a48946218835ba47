"""Simulated upstream APIs on loopback, for the demo and the example apps.

Two APIs in one threaded stdlib HTTP server:

- a recommendation API (RecoBeat-like, under /reco): recommendations take 20-70 s in real
  life (scaled down here by `scale`), the API admits 80 calls a minute (real time, not
  scaled) and answers 429 with Retry-After beyond that, does not know some Spotify IDs,
  resolves IDs in batches, and returns audio features with some fields missing, null or
  out of range;
- a YouTube-Music-like API (under /ytm): trending per country, the billboard, lyrics (none
  for some songs: 404), an artist's songs, and uploading a song.

Outages on demand (`upstream.outage(True)` or `POST /control/outage {"on": true}`: every
API call answers 503) and counters per endpoint of the calls received, the 429s sent and
the calls failed by an outage (`upstream.counters()` or `GET /control/counters`).

    python examples/upstream.py --port 8900      # prints its URL; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Real-life latencies in seconds (low, high), multiplied by `scale`.
LATENCY = {
    "reco.resolve": (1.0, 3.0),
    "reco.audio_features": (1.0, 3.0),
    "reco.recommendations": (20.0, 70.0),
    "ytm.trending": (1.0, 3.0),
    "ytm.billboard": (1.0, 3.0),
    "ytm.lyrics": (0.5, 1.5),
    "ytm.artist_songs": (0.5, 2.0),
    "ytm.add_song": (0.2, 0.5),
}
FEATURES = (
    "acousticness",
    "danceability",
    "energy",
    "instrumentalness",
    "key",
    "liveness",
    "loudness",
    "mode",
    "speechiness",
    "tempo",
    "valence",
    "popularity",
)
# Spotify IDs the recommendation API has never heard of.
UNKNOWN_IDS = frozenset(
    {"0unknownTrackAAAAAAAAA", "0unknownTrackBBBBBBBBB", "0unknownTrackCCCCCCCCC"}
)


def digest(text: str) -> int:
    """A stable number per string: the fake catalogue is the same in every run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def has_lyrics(song_id: str) -> bool:
    return digest("lyrics:" + song_id) % 3 != 0


def track(seed: str, i: int) -> dict[str, str]:
    n = digest(f"{seed}:{i}")
    return {"id": f"yt{n % 10**10:010d}", "title": f"Song {n % 997}", "artist": f"artist-{n % 50}"}


class Upstream:
    """Both APIs on `127.0.0.1:port` (0: a free port), served from a daemon thread.

    `scale` multiplies the real-life latencies; `rate_limit` calls per `rate_period`
    seconds are admitted on the recommendation API (a sliding window, as the real one)."""

    def __init__(
        self,
        port: int = 0,
        *,
        scale: float = 0.01,
        rate_limit: int = 80,
        rate_period: float = 60.0,
        seed: int = 13,
    ) -> None:
        self.scale = scale
        self.rate_limit = rate_limit
        self.rate_period = rate_period
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._down = False
        self._window: deque[float] = deque()
        self._calls: Counter[str] = Counter()
        self._throttled: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._uploads: dict[str, list[dict[str, str]]] = {}
        self.user_agents: Counter[str] = Counter()
        self._server = _Server(("127.0.0.1", port), _handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Upstream:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="upstream", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def outage(self, down: bool = True) -> None:
        """While down, every API call answers 503 (the control endpoints still work)."""
        with self._lock:
            self._down = down

    def counters(self) -> dict[str, dict[str, int]]:
        """Per endpoint: calls received, 429s sent, calls failed by an outage."""
        with self._lock:
            return {
                "calls": dict(self._calls),
                "throttled": dict(self._throttled),
                "failed": dict(self._failed),
            }

    # -- what one call does; runs on the server's threads --------------------------------

    def admit(self, endpoint: str, user_agent: str) -> tuple[int, float]:
        """Counts the call; returns (status, retry_after): 200, 503 (outage), 429 (limit)."""
        now = time.monotonic()
        with self._lock:
            self._calls[endpoint] += 1
            self.user_agents[user_agent] += 1
            if self._down:
                self._failed[endpoint] += 1
                return 503, 0.0
            if endpoint.startswith("reco."):
                while self._window and self._window[0] <= now - self.rate_period:
                    self._window.popleft()
                if len(self._window) >= self.rate_limit:
                    self._throttled[endpoint] += 1
                    return 429, self._window[0] + self.rate_period - now
                self._window.append(now)
            low, high = LATENCY[endpoint]
            delay = self._random.uniform(low, high) * self.scale
        time.sleep(delay)  # the upstream being slow
        return 200, 0.0

    def answer(self, endpoint: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        if endpoint == "reco.resolve":
            ids = [str(i) for i in body.get("ids", [])]
            found = {i: f"rb-{digest(i) % 10**8:08d}" for i in ids if i not in UNKNOWN_IDS}
            return 200, {"found": found}
        if endpoint == "reco.audio_features":
            return 200, {"features": {i: self.features(i) for i in params["ids"].split(",") if i}}
        if endpoint == "reco.recommendations":
            seeds = params["seeds"]
            size = int(params.get("size", 10))
            return 200, {
                "seeds": seeds.split(","),
                "tracks": [track(seeds, i) for i in range(size)],
            }
        if endpoint == "ytm.trending":
            country = params.get("country", "US")
            limit = int(params.get("limit", 20))
            return 200, {"country": country, "tracks": [track(country, i) for i in range(limit)]}
        if endpoint == "ytm.billboard":
            return 200, {"chart": [{"rank": i + 1, **track("billboard", i)} for i in range(100)]}
        if endpoint == "ytm.lyrics":
            song_id = params["id"]
            if not has_lyrics(song_id):
                return 404, {"error": f"no lyrics for {song_id}"}
            return 200, {"id": song_id, "lyrics": f"la la {song_id} la\n" * 8}
        if endpoint == "ytm.artist_songs":
            artist = params["id"]
            with self._lock:
                uploads = list(self._uploads.get(artist, []))
            songs = [track(artist, i) for i in range(10)] + uploads
            return 200, {"artist": artist, "songs": songs}
        if endpoint == "ytm.add_song":
            artist, title = str(body["artist"]), str(body["title"])
            song = {"id": f"yt{digest(artist + title) % 10**10:010d}", "title": title}
            with self._lock:
                self._uploads.setdefault(artist, []).append({**song, "artist": artist})
            return 201, {**song, "artist": artist}
        raise AssertionError(endpoint)

    def features(self, reco_id: str) -> dict[str, Any]:
        """Audio features as the real API returns them: some fields missing, some null,
        some out of range, for a stable subset of tracks."""
        n = digest("features:" + reco_id)
        features: dict[str, Any] = {
            name: round(((n >> (i * 4)) % 100) / 100, 2) for i, name in enumerate(FEATURES)
        }
        features.update(key=n % 12, mode=n % 2, tempo=60.0 + n % 120, loudness=-(n % 20) * 1.0)
        features["popularity"] = n % 101
        if n % 3 == 0:
            del features["valence"], features["tempo"]
        if n % 4 == 0:
            features["energy"] = None
        if n % 5 == 0:
            features["key"] = 14  # out of range: keys are 0-11
        return features


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections under concurrent clients


ROUTES = [
    ("POST", re.compile(r"/reco/resolve"), "reco.resolve"),
    ("GET", re.compile(r"/reco/audio-features"), "reco.audio_features"),
    ("GET", re.compile(r"/reco/recommendations"), "reco.recommendations"),
    ("GET", re.compile(r"/ytm/trending"), "ytm.trending"),
    ("GET", re.compile(r"/ytm/billboard"), "ytm.billboard"),
    ("GET", re.compile(r"/ytm/lyrics/(?P<id>[^/]+)"), "ytm.lyrics"),
    ("GET", re.compile(r"/ytm/artist/(?P<id>[^/]+)/songs"), "ytm.artist_songs"),
    ("POST", re.compile(r"/ytm/songs"), "ytm.add_song"),
]


def _handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.route("GET")

        def do_POST(self) -> None:
            self.route("POST")

        def route(self, method: str) -> None:
            parts = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            if parts.path == "/control/outage" and method == "POST":
                upstream.outage(bool(body.get("on", True)))
                return self.reply(200, {"down": bool(body.get("on", True))})
            if parts.path == "/control/counters" and method == "GET":
                return self.reply(200, upstream.counters())
            route = next(
                (
                    (name, match)
                    for verb, pattern, name in ROUTES
                    if verb == method and (match := pattern.fullmatch(parts.path))
                ),
                None,
            )
            if route is None:
                return self.reply(404, {"error": f"no route {method} {parts.path}"})
            endpoint, match = route
            status, retry_after = upstream.admit(endpoint, self.headers.get("User-Agent", ""))
            if status == 503:
                return self.reply(503, {"error": "upstream unavailable"})
            if status == 429:
                wait = max(1, math.ceil(retry_after))
                return self.reply(429, {"error": "rate limited"}, {"Retry-After": str(wait)})
            status, payload = upstream.answer(endpoint, {**params, **match.groupdict()}, body)
            self.reply(status, payload)

        def reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the counters say what happened; a line per call would drown the demo

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--scale", type=float, default=0.01, help="latency multiplier")
    args = parser.parse_args()
    upstream = Upstream(args.port, scale=args.scale)
    print(f"upstream on {upstream.url} (UPSTREAM_URL={upstream.url})", flush=True)
    try:
        upstream._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        upstream._server.server_close()


if __name__ == "__main__":
    main()
