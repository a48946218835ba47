"""The README's examples and the demo run here, so the docs cannot rot."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


# On Python 3.9, pytest-asyncio leaves its loop to be collected when a later test calls
# asyncio.run (as the README does): a ResourceWarning unrelated to tenuto.
py39_loop_warning = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning" if sys.version_info < (3, 10) else "error"
)


@py39_loop_warning
def test_readme_examples_run(redis_server, redis_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("REDIS_CLUSTER_URL", redis_cluster.url)
    monkeypatch.delenv("TENUTO_URL", raising=False)
    blocks = readme_blocks()
    assert len(blocks) >= 4
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    # The pytest-style example defines a test; run it with the plugin's fixtures.
    import tenuto
    from tenuto.testing import FakeClock

    clock = FakeClock(0)
    namespace["test_trending_expires"](tenuto.Cache(jitter=0.0, clock=clock), clock)  # type: ignore[operator]


@pytest.mark.parametrize(
    "doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")) if (ROOT / "docs").exists() else []
)
def test_docs_examples_run(doc: str, redis_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of docs/*.md runs on its own (a fresh namespace per block)."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, f"{doc} has no python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"{doc}[{i}]", "exec"), {"__name__": f"doc{i}"})


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_demo_runs(
    backend: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, request
) -> None:
    """The README's first command (on memory, and with REDIS_URL set): both apps, with and
    without tenuto, cold, warm and during an outage; the closing line's numbers are
    measured, so assert on them."""
    if backend == "redis":
        monkeypatch.setenv("REDIS_URL", request.getfixturevalue("redis_server").url)
    else:
        monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(sys, "argv", ["demo.py"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the demo puts examples/ first
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("upstream calls") >= 2, out  # one table per app
    assert ("cache on redis://" in out) == (backend == "redis"), out
    closing = out.strip().splitlines()[-1]
    found = re.fullmatch(
        r"warm run: (\d+)% fewer upstream calls, p50 ([\d.]+) ms \(was ([\d.]+) ms\),"
        r" (\d+) errors during the outage",
        closing,
    )
    assert found, out
    fewer, p50, p50_before, outage_errors = found.groups()
    assert int(fewer) >= 90, out
    assert int(outage_errors) == 0, out
    assert float(p50) < float(p50_before), out
