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


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "X-Cache: miss" in out and "X-Cache: hit" in out and "X-Cache: stale" in out
    assert "upstream calls: 3" in out
