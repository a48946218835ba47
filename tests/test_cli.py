"""`python -m tenuto` as a subprocess against a real redis-server: stats, invalidate, and
warm (including a warm killed with SIGKILL half-way and started again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tenuto

WARM_MODULE = r"""
import os, sys, threading, pathlib
import tenuto

cache = tenuto.Cache.from_env(namespace=os.environ["WARM_NS"])
LOG = pathlib.Path(os.environ["WARM_LOG"])
GATE = pathlib.Path(os.environ["WARM_GATE"])


def _call(i):
    with LOG.open("a") as f:
        f.write(f"{i}\n")
    sys.stderr.write(f"started {i}\n")
    sys.stderr.flush()
    if i >= 10 and not GATE.exists():
        threading.Event().wait()  # an upstream that never answers: killed or interrupted
    if i == "bad":
        raise ValueError("bad item")
    return {"id": i}


def plain(i):
    _call(i)


@cache.cached(ttl=600, name="warmmod.track")
def track(i):
    return _call(i)
"""


@pytest.fixture
def env(redis_server, namespace: str, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "warmmod.py").write_text(WARM_MODULE)
    out = {k: v for k, v in os.environ.items() if k not in ("TENUTO_URL", "REDIS_URL")}
    out.update(
        PYTHONPATH=str(tmp_path),
        WARM_NS=namespace,
        WARM_LOG=str(tmp_path / "calls.log"),
        WARM_GATE=str(tmp_path / "gate"),
        TENUTO_PROGRESS="0",
    )
    return out


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tenuto", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def items_file(tmp_path: Path, items: list) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["WARM_LOG"])
    return log.read_text().split() if log.exists() else []


def test_warm_stats_and_invalidate_a_cached_function(env, redis_server, tmp_path) -> None:
    ns = env["WARM_NS"]
    url = ["--url", redis_server.url, "--namespace", ns]
    items = items_file(tmp_path, [1, 2, 3, 4, 5])
    done = cli(env, "--url", redis_server.url, "warm", "warmmod:track", "--from", str(items))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["total"], report["done"], report["skipped"]) == (5, 5, 0)
    cache = tenuto.Cache(redis_server.url, namespace=ns)

    stats = cli(env, *url, "stats", "--json", "--function", "warmmod:track")
    assert stats.returncode == 0, stats.stderr
    out = json.loads(stats.stdout)
    assert out["keys"] == 5 and out["function_keys"] == 5  # no checkpoint left behind
    assert out["namespace"] == ns and out["url"] == redis_server.url

    # Fresh entries are skipped; REDIS_URL works like --url.
    again = cli(
        {**env, "REDIS_URL": redis_server.url}, "warm", "warmmod:track", "--from", str(items)
    )
    assert json.loads(again.stdout)["skipped"] == 5 and len(calls(env)) == 5

    cache.set("other:1", 1, ttl=60)
    dry = cli(env, *url, "invalidate", "--function", "warmmod.track", "--dry-run")
    assert dry.stdout.strip() == "would invalidate 5 keys of function warmmod.track"
    gone = cli(env, *url, "invalidate", "--function", "warmmod:track")
    assert gone.returncode == 0 and gone.stdout.strip() == (
        "invalidated 5 keys of function warmmod.track"
    )
    assert cache.get("other:1").state == "hit"
    text = cli(env, *url, "stats")
    assert "keys: 1" in text.stdout.splitlines()
    prefixed = cli(env, *url, "invalidate", "--prefix", "oth")
    assert prefixed.stdout.strip() == "invalidated 1 keys of prefix 'oth'"
    cache.set("a", 1, ttl=60)
    cache.set("b", 1, ttl=60)
    everything = cli(
        {**env, "TENUTO_URL": redis_server.url}, "--namespace", ns, "invalidate", "--all"
    )
    assert everything.stdout.strip() == f"invalidated 2 keys of namespace {ns}"
    assert cache.count() == 0


def test_warm_killed_half_way_redoes_only_what_was_in_flight(env, redis_server, tmp_path) -> None:
    items = items_file(tmp_path, list(range(20)))
    args = [sys.executable, "-m", "tenuto", "--url", redis_server.url, "--namespace"]
    args += [env["WARM_NS"], "warm", "warmmod:plain", "--from", str(items), "--concurrency", "2"]
    with subprocess.Popen(
        args, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stderr is not None
            started: set[str] = set()
            while not {"started 10", "started 11"} <= started:  # both workers stuck upstream
                line = proc.stderr.readline()
                assert line, "the warm ended before reaching item 11"
                started.add(line.strip())
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    first = calls(env)
    assert sorted(first, key=int) == [str(i) for i in range(12)]  # 0-9 done, 10-11 in flight
    Path(env["WARM_GATE"]).touch()
    rerun = cli(env, *args[3:])
    assert rerun.returncode == 0, rerun.stderr
    redone = calls(env)[len(first) :]
    assert sorted(redone, key=int) == [str(i) for i in range(10, 20)]  # only 10, 11 again
    report = json.loads(rerun.stdout)
    assert (report["resumed"], report["done"], report["errors"]) == (10, 10, 0)


def test_warm_interrupted_stops_within_a_second(env, redis_server, tmp_path) -> None:
    items = items_file(tmp_path, list(range(8, 30)))
    args = [sys.executable, "-m", "tenuto", "--url", redis_server.url, "warm", "warmmod:plain"]
    with subprocess.Popen(
        [*args, "--from", str(items)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            line = "start"
            while "started 11" not in line:
                line = proc.stderr.readline()
                assert line, "the warm ended before reaching item 11"
            os.kill(proc.pid, signal.SIGINT)
            sent = time.monotonic()
            out, _ = proc.communicate(timeout=10)
            assert time.monotonic() - sent < 1.0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130
    report = json.loads(out)
    assert report["cancelled"] is True and report["done"] == 2  # 8 and 9


def test_warm_counts_errors(env, redis_server, tmp_path) -> None:
    Path(env["WARM_GATE"]).touch()
    items = items_file(tmp_path, [1, "bad", 2])
    done = cli(env, "--url", redis_server.url, "warm", "warmmod:plain", "--from", str(items))
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert (report["done"], report["errors"]) == (2, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats"], "no Redis URL"),
        (["--url", "ftp://x", "stats"], "unsupported cache URL"),
        (["--url", "redis://127.0.0.1:1/0", "warm", "nomodule:f", "--from", "x"], "cannot import"),
        (["--url", "redis://127.0.0.1:1/0", "warm", "warmmod", "--from", "x"], "module:function"),
        (["--url", "redis://127.0.0.1:1/0", "warm", "warmmod:nope", "--from", "x"], "no nope"),
        (
            [
                "--url",
                "redis://127.0.0.1:1/0",
                "warm",
                "warmmod:plain",
                "--from",
                "-",
                "--concurrency",
                "0",
            ],
            "--concurrency",
        ),
        (
            ["--url", "redis://127.0.0.1:1/0", "invalidate", "--function", "warmmod:plain"],
            "not a tenuto-cached",
        ),
    ],
)
def test_usage_errors_exit_2(env, args: list[str], message: str) -> None:
    done = cli(env, *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_bad_jsonl_names_the_line(env, redis_server, tmp_path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('1\n\n{"a": \n')
    done = cli(env, "--url", redis_server.url, "warm", "warmmod:plain", "--from", str(path))
    assert done.returncode == 2 and "line 3: not JSON" in done.stderr


def test_unreachable_redis_exits_1(env) -> None:
    done = cli(env, "--url", "redis://127.0.0.1:1/0", "stats")
    assert done.returncode == 1 and "unavailable" in done.stderr.lower()


def test_invalidate_needs_one_target(env, redis_server) -> None:
    done = cli(env, "--url", redis_server.url, "invalidate")
    assert done.returncode == 2 and "one of the arguments" in done.stderr


def test_readme_cli_lines_parse() -> None:
    """Every `python -m tenuto` line in the README is accepted by the parser."""
    import re
    import shlex

    from tenuto.__main__ import parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    lines = [
        line
        for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
        for line in block.splitlines()
        if line.startswith("python -m tenuto")
    ]
    assert len(lines) >= 4
    for line in lines:
        args = parser().parse_args(shlex.split(line)[3:])
        assert callable(args.run)


def test_stats_and_invalidate_on_a_cluster(env, redis_cluster) -> None:
    ns = env["WARM_NS"]
    cache = tenuto.Cache(str(redis_cluster.url), namespace=ns, fail_open=False)
    for i in range(30):  # keys on every primary
        cache.set(f"song:{i}", i, ttl=60)
    cache.set("album:1", 1, ttl=60)
    url = ["--url", str(redis_cluster.url), "--namespace", ns]
    stats = cli(env, *url, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["keys"] == 31
    gone = cli(env, *url, "invalidate", "--prefix", "song:")
    assert gone.stdout.strip() == "invalidated 30 keys of prefix 'song:'"
    assert cache.count() == 1 and cache.get("album:1").state == "hit"
