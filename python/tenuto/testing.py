"""Test helpers for apps that use tenuto: a fake clock, and a pytest plugin.

The plugin is registered through the ``pytest11`` entry point, so its fixtures are
available in any pytest run where tenuto is installed:

- ``tenuto_clock``: a :class:`FakeClock` starting at a fixed epoch time.
- ``tenuto_cache``: a fresh memory :class:`tenuto.Cache` on that clock, without jitter.

Expiry then happens when the test says so (``tenuto_clock.advance(301)``), never by
sleeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenuto._core import Cache, FakeClock

__all__ = ["FakeClock", "tenuto_cache", "tenuto_clock"]

try:
    import pytest
except ImportError:  # pragma: no cover - only the fixtures need pytest
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING or pytest is not None:

    @pytest.fixture
    def tenuto_clock() -> FakeClock:
        """A fake clock at 2023-11-14T22:13:20Z that moves only when told to."""
        return FakeClock(1_700_000_000)

    @pytest.fixture
    def tenuto_cache(tenuto_clock: FakeClock) -> Cache:
        """A fresh memory cache on ``tenuto_clock``, without jitter."""
        return Cache(namespace="test", jitter=0.0, clock=tenuto_clock)
