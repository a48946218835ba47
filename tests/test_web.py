"""Flask and FastAPI integrations through their test clients, and the example apps under
real servers (gunicorn --preload with 2 workers, uvicorn) on loopback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tenuto
from tenuto.testing import FakeClock, free_port

flask = pytest.importorskip("flask")
fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent


def make_flask_app(cache: tenuto.Cache):
    from tenuto.flask import Tenuto

    app = flask.Flask("t")
    allow = {"stats": True}
    Tenuto(app, cache=cache, stats_path="/stats", stats_guard=lambda: allow["stats"])

    @cache.cached(ttl=10, stale_ttl=100)
    def song(sid: str) -> dict:
        return {"id": sid}

    @app.get("/song/<sid>")
    def song_view(sid: str):
        return flask.jsonify(song(sid))

    @app.get("/two/<a>/<b>")
    def two_view(a: str, b: str):
        return flask.jsonify([song(a), song(b)])

    @app.get("/plain")
    def plain_view():
        return "no cache here"

    return app, allow, song


def test_flask_headers(clock: FakeClock) -> None:
    cache = tenuto.Cache(jitter=0.0, clock=clock)
    app, allow, song = make_flask_app(cache)
    client = app.test_client()
    first = client.get("/song/1")
    assert first.json == {"id": "1"} and first.headers["X-Cache"] == "miss"
    assert "X-Data-Stale" not in first.headers
    assert client.get("/song/1").headers["X-Cache"] == "hit"
    assert client.get("/two/1/2").headers["X-Cache"] == "miss", "miss outranks hit"
    assert "X-Cache" not in client.get("/plain").headers
    clock.advance(11)
    stale = client.get("/song/1")
    assert stale.headers["X-Cache"] == "stale" and stale.headers["X-Data-Stale"] == "1"
    song._settle(song.key("1"))  # let the refresh land


def test_flask_stats_view_is_guarded() -> None:
    cache = tenuto.Cache()
    app, allow, _ = make_flask_app(cache)
    client = app.test_client()
    client.get("/song/1")
    stats = client.get("/stats")
    assert stats.status_code == 200 and stats.json["misses"] == 1
    allow["stats"] = False
    assert client.get("/stats").status_code == 403


def test_flask_stats_needs_a_guard() -> None:
    from tenuto.flask import Tenuto

    with pytest.raises(ValueError, match="stats_guard"):
        Tenuto(flask.Flask("t"), cache=tenuto.Cache(), stats_path="/stats")


def make_fastapi_app(cache: tenuto.Cache):
    from tenuto.fastapi import TenutoMiddleware, stats_router

    app = fastapi.FastAPI()
    app.add_middleware(TenutoMiddleware)
    allow = {"stats": True}
    app.include_router(stats_router(cache, guard=lambda request: allow["stats"]))

    @cache.cached(ttl=10, stale_ttl=100)
    async def song(sid: str) -> dict:
        return {"id": sid}

    @cache.cached(ttl=10)
    def sync_song(sid: str) -> dict:
        return {"id": sid, "sync": True}

    @app.get("/song/{sid}")
    async def song_view(sid: str) -> dict:
        return await song(sid)

    @app.get("/sync/{sid}")
    def sync_view(sid: str) -> dict:  # runs in Starlette's thread pool
        return sync_song(sid)

    @app.get("/plain")
    async def plain_view() -> str:
        return "no cache here"

    return app, allow, song


def test_fastapi_headers(clock: FakeClock) -> None:
    from fastapi.testclient import TestClient

    cache = tenuto.Cache(jitter=0.0, clock=clock)
    app, allow, song = make_fastapi_app(cache)
    with TestClient(app) as client:
        first = client.get("/song/1")
        assert first.json() == {"id": "1"} and first.headers["x-cache"] == "miss"
        assert client.get("/song/1").headers["x-cache"] == "hit"
        assert client.get("/sync/1").headers["x-cache"] == "miss", "sync endpoints too"
        assert client.get("/sync/1").headers["x-cache"] == "hit"
        assert "x-cache" not in client.get("/plain").headers
        clock.advance(11)
        stale = client.get("/song/1")
        assert stale.headers["x-cache"] == "stale" and stale.headers["x-data-stale"] == "1"
        assert client.get("/stats").json()["stale_hits"] == 1
        allow["stats"] = False
        assert client.get("/stats").status_code == 403


def wait_for_http(url: str, proc: subprocess.Popen, output: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited:\n{output.read_text()}"
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)  # waiting for the server to listen, bounded by the deadline
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{output.read_text()}")


def start_server(args: list[str], env: dict[str, str], output: Path) -> subprocess.Popen:
    with output.open("w") as out:  # a file, not a pipe: a full pipe would stall the server
        return subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def example(name: str):
    """examples/{name}.py, loaded from its file (examples/ is not a package on sys.path)."""
    module_name = f"tenuto_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "examples" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def example_upstream(scale: float):
    """examples/upstream.py's simulated upstream, served from this process."""
    return example("upstream").Upstream(scale=scale)


def test_flask_app_under_gunicorn_preload(redis_server, namespace, tmp_path) -> None:
    pytest.importorskip("gunicorn")
    port = free_port()
    with example_upstream(scale=0.1) as upstream:  # trending takes 0.1-0.3 s
        env = {"REDIS_URL": redis_server.url, "UPSTREAM_URL": upstream.url, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "--threads", "8"]
        args += ["-b", f"127.0.0.1:{port}", "examples.flask_app:app"]
        output = tmp_path / "gunicorn.log"
        proc = start_server(args, env, output)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for_http(f"{base}/health", proc, output)
            country = namespace.upper()  # a key no earlier run has cached
            url = f"{base}/trending?country={country}"
            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(lambda _: httpx.get(url, timeout=30), range(16)))
            assert all(r.status_code == 200 for r in responses)
            assert {r.json()["country"] for r in responses} == {country}
            calls = upstream.counters()["calls"]
            assert calls == {"ytm.trending": 1}, "one upstream call across both workers"
            assert httpx.get(url).headers["X-Cache"] == "hit"
            pids = {int(agent.rsplit("/", 1)[1]) for agent in upstream.user_agents}
            assert proc.pid not in pids, "the upstream ran in a forked worker, not the master"
        finally:
            stop_server(proc)


def test_fastapi_app_under_uvicorn(redis_server, namespace, tmp_path) -> None:
    pytest.importorskip("uvicorn")
    port = free_port()
    with example_upstream(scale=0.05) as upstream:  # recommendations take 1-3.5 s
        env = {"REDIS_URL": redis_server.url, "UPSTREAM_URL": upstream.url, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1"]
        args += ["--port", str(port)]
        output = tmp_path / "uvicorn.log"
        proc = start_server(args, env, output)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for_http(f"{base}/health", proc, output)
            url = f"{base}/recommendations?seeds={namespace}a,{namespace}b"
            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(lambda _: httpx.get(url, timeout=30), range(16)))
            assert all(r.status_code == 200 for r in responses)
            assert {r.headers["x-cache"] for r in responses} == {"miss"}
            again = httpx.get(url)
            assert again.headers["x-cache"] == "hit" and again.json() == responses[0].json()
            assert len(again.json()["tracks"]) == 10
            calls = upstream.counters()["calls"]
            assert calls == {"reco.resolve": 1, "reco.audio_features": 1, "reco.recommendations": 1}
        finally:
            stop_server(proc)


def test_flask_inbound_limit() -> None:
    from tenuto.flask import limit

    app = flask.Flask("t")

    @app.get("/hot")
    @limit("3/minute")
    def hot():
        return {"ok": True}

    @app.get("/proxied")
    @limit("1/minute", trust_proxy=1)
    def proxied():
        return "ok"

    client = app.test_client()
    responses = [client.get("/hot") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
    assert responses[0].headers["RateLimit-Limit"] == "3"
    refused = responses[3]
    assert (
        refused.json["error"].startswith("rate limit exceeded")
        and refused.headers["Retry-After"] == "60"
    )
    assert refused.headers["RateLimit-Reset"] == "60"
    # Behind one trusted proxy, clients are told apart by X-Forwarded-For.
    assert client.get("/proxied", headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 200
    assert client.get("/proxied", headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 200
    assert client.get("/proxied", headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 429
    with pytest.raises(ValueError, match="trust_proxy"):
        limit("1/minute", trust_proxy=-1)


def test_untrusted_forwarded_for_is_ignored() -> None:
    from tenuto.flask import limit

    app = flask.Flask("t")

    @app.get("/hot")
    @limit("1/minute")
    def hot():
        return "ok"

    client = app.test_client()
    assert client.get("/hot", headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 200
    assert client.get("/hot", headers={"X-Forwarded-For": "9.9.9.9"}).status_code == 429, (
        "a spoofed header does not buy a new quota"
    )


def test_fastapi_inbound_limit() -> None:
    from fastapi import Depends
    from fastapi.testclient import TestClient

    from tenuto.fastapi import RateLimit, RateLimitExceeded, rate_limit_handler

    app = fastapi.FastAPI()
    app.add_exception_handler(RateLimitExceeded, rate_limit_handler)

    @app.get("/hot", dependencies=[Depends(RateLimit("2/minute"))])
    async def hot() -> dict:
        return {"ok": True}

    per_user = RateLimit("1/minute", key=lambda request: request.headers.get("x-user", "anon"))

    @app.get("/mine", dependencies=[Depends(per_user)])
    def mine() -> str:
        return "ok"

    with TestClient(app) as client:
        responses = [client.get("/hot") for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert responses[0].headers["ratelimit-remaining"] == "1"
        assert responses[2].json()["error"].startswith("rate limit exceeded")
        assert responses[2].headers["retry-after"] == "60"
        assert client.get("/mine", headers={"x-user": "a"}).status_code == 200
        assert client.get("/mine", headers={"x-user": "b"}).status_code == 200
        assert client.get("/mine", headers={"x-user": "a"}).status_code == 429


def test_inbound_limit_shared_through_redis(redis_server, namespace) -> None:
    """Two apps (two workers) on one Redis share each client's budget."""
    from tenuto.flask import limit

    def make_app():
        app = flask.Flask("t")

        @app.get("/hot")
        @limit("3/minute", url=redis_server.url, name=namespace)
        def hot():
            return "ok"

        return app.test_client()

    first, second = make_app(), make_app()
    codes = [c.get("/hot").status_code for c in (first, second, first, second)]
    assert codes == [200, 200, 200, 429]
    refused = second.get("/hot")
    assert (
        refused.headers["RateLimit-Remaining"] == "0" and refused.headers["RateLimit-Limit"] == "3"
    )
    assert 58 <= int(refused.headers["RateLimit-Reset"]) <= 60


def test_fastapi_stats_router_needs_a_guard_like_flask() -> None:
    pytest.importorskip("fastapi")
    from tenuto.fastapi import stats_router

    with pytest.raises(ValueError, match="guard="):
        stats_router(tenuto.Cache())


def _flask_worker(cache, name: str):
    """One "worker": its own app and its own decorated view, as each gunicorn worker has."""
    from flask import Flask

    from tenuto.flask import Tenuto, limit

    app = Flask("worker")
    Tenuto(app, cache=cache)

    @app.get("/songs")
    @limit("3/minute", name=name)
    def songs():
        return {"ok": True}

    return app.test_client()


def test_flask_inbound_limits_are_per_app_on_the_apps_redis(redis_server, namespace) -> None:
    """Two workers of one app whose cache is on Redis: "3/minute" admits 3 in all, not 3
    per worker (the limiter takes the app cache's Redis unless told otherwise)."""
    cache = tenuto.Cache(redis_server.url, namespace=namespace)
    workers = [_flask_worker(cache, namespace), _flask_worker(cache, namespace)]
    codes = [workers[i % 2].get("/songs").status_code for i in range(6)]
    assert codes.count(200) == 3 and codes.count(429) == 3, codes
    # On memory each worker counts alone.
    alone = [_flask_worker(tenuto.Cache(namespace=namespace), namespace) for _ in range(2)]
    codes = [alone[i % 2].get("/songs").status_code for i in range(6)]
    assert codes.count(200) == 6


def test_fastapi_inbound_limits_are_per_app_on_the_apps_redis(redis_server, namespace) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from tenuto.fastapi import RateLimit, RateLimitExceeded, TenutoMiddleware, rate_limit_handler

    cache = tenuto.Cache(redis_server.url, namespace=namespace)

    def worker() -> TestClient:
        app = FastAPI()
        app.add_middleware(TenutoMiddleware, cache=cache)
        app.add_exception_handler(RateLimitExceeded, rate_limit_handler)

        @app.get("/songs", dependencies=[Depends(RateLimit("3/minute", name=namespace))])
        def songs() -> dict:
            return {"ok": True}

        return TestClient(app)

    workers = [worker(), worker()]
    codes = [workers[i % 2].get("/songs").status_code for i in range(6)]
    assert codes.count(200) == 3 and codes.count(429) == 3, codes


def test_example_flask_app_behaviour() -> None:
    """The demo's Flask app: negative cache for missing lyrics, uploads invalidate what
    they change, and the baseline (no tenuto) calls the upstream every time."""
    create_app = example("flask_app").create_app
    with example_upstream(scale=0.001) as upstream:
        has_lyrics = example("upstream").has_lyrics
        silent = next(f"song-{i}" for i in range(50) if not has_lyrics(f"song-{i}"))
        app = create_app(upstream.url, tenuto.Cache(namespace="example-flask"))
        client = app.test_client()
        first, second = client.get(f"/lyrics/{silent}"), client.get(f"/lyrics/{silent}")
        assert first.json == second.json == {"id": silent, "lyrics": None}
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
        assert client.get("/artist/a9/songs").headers["X-Cache"] == "miss"
        created = client.post("/songs", json={"artist": "a9", "title": "Fresh"})
        assert created.status_code == 201 and "X-Cache" not in created.headers
        after = client.get("/artist/a9/songs")
        assert after.headers["X-Cache"] == "miss" and after.json["songs"][-1]["title"] == "Fresh"
        assert upstream.counters()["calls"] == {
            "ytm.lyrics": 1,
            "ytm.artist_songs": 2,
            "ytm.add_song": 1,
        }
        baseline = create_app(upstream.url, use_tenuto=False).test_client()
        answers = [baseline.get("/billboard") for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200]
        assert "X-Cache" not in answers[0].headers
        assert upstream.counters()["calls"]["ytm.billboard"] == 2
        for flask_app in (app, baseline.application):
            flask_app.extensions["upstream"].close()


def test_example_fastapi_app_behaviour() -> None:
    """The demo's FastAPI app: unknown IDs recorded as missing, features completed with
    defaults in range, everything cached: the second request makes no upstream call."""
    from fastapi.testclient import TestClient

    create_app = example("fastapi_app").create_app
    with example_upstream(scale=0.001) as upstream:
        unknown = sorted(example("upstream").UNKNOWN_IDS)[0]
        app = create_app(upstream.url, tenuto.Cache(namespace="example-fastapi"))
        url = f"/recommendations?seeds=4uLU6hMCjMI75M1A2tKUQC,{unknown}&size=3"
        with TestClient(app) as client:
            first = client.get(url)
            assert first.status_code == 200 and first.headers["x-cache"] == "miss"
            body = first.json()
            assert body["seeds"][unknown] is None and body["seeds"]["4uLU6hMCjMI75M1A2tKUQC"]
            (features,) = body["features"].values()
            assert set(tenuto.AUDIO_FEATURE_DEFAULTS) <= set(features)
            assert 0 <= features["key"] <= 11 and features["energy"] is not None
            assert len(body["tracks"]) == 3
            calls = upstream.counters()["calls"]
            second = client.get(url)
            assert second.headers["x-cache"] == "hit" and second.json() == body
            assert upstream.counters()["calls"] == calls, "known, known-missing and cached"
            assert client.get("/health").json()["registry"]["fetches"] == 1
