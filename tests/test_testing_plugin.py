"""The pytest plugin that host apps use for their own cached code."""

from tenuto.testing import FakeClock


def test_fixtures_drive_expiry_without_sleeping(tenuto_cache, tenuto_clock: FakeClock) -> None:
    tenuto_cache.set("trending:US", ["a", "b"], ttl=300, stale_ttl=600)
    assert tenuto_cache.get("trending:US").state == "hit"
    tenuto_clock.advance(301)
    assert tenuto_cache.get("trending:US").state == "stale"
    tenuto_clock.advance(300)
    assert tenuto_cache.get("trending:US").state == "miss"


def test_fake_clock_api() -> None:
    clock = FakeClock(100.5)
    assert clock() == clock.now() == 100.5
    assert clock.advance(0.25) == 100.75
    clock.set(5)
    assert clock.now() == 5.0
