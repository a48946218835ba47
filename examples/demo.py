"""tenuto demo on the embedded memory backend: a slow, flaky "upstream" behind an envelope
cache. Shows hit, stale (served at once while the value is past its freshness) and miss,
and stale-if-error when the upstream fails. Time is a FakeClock, so the demo is instant.

Run: python examples/demo.py   (or: nox -s demo)
"""

from __future__ import annotations

import time

import tenuto
from tenuto.testing import FakeClock

clock = FakeClock()
cache = tenuto.Cache(namespace="demo", jitter=0.0, clock=clock)  # memory:// by default
upstream_calls = 0
upstream_up = True


def fetch_trending(country: str) -> list[str]:
    """Stands in for a 20-70 s recommendation API call."""
    global upstream_calls
    upstream_calls += 1
    if not upstream_up:
        raise ConnectionError("upstream answered 503")
    time.sleep(0.05)
    return [f"{country}-track-{i}" for i in range(3)]


def trending(country: str) -> tuple[str, list[str]]:
    key = tenuto.stable_key("trending", {"country": country})
    found = cache.get(key)
    if found.state == "hit":
        return "hit", found.value
    try:
        value = fetch_trending(country)
    except ConnectionError:
        if found.state == "stale":  # stale-if-error: serve what we have
            return "stale (upstream down)", found.value
        raise
    cache.set(key, value, ttl=300, stale_ttl=3600)
    # A stale entry is served as it was; the refresh above is for the next caller.
    # (@cache.cached runs that refresh in the background instead.)
    return found.state, found.value if found.state == "stale" else value


def main() -> None:
    global upstream_up
    steps = [
        ("first request", 0),
        ("again, 10 s later", 10),
        ("6 minutes later (past ttl=300)", 350),
        ("right after the refresh", 1),
    ]
    for label, advance in steps:
        clock.advance(advance)
        state, value = trending("US")
        print(f"{label:<34} X-Cache: {state:<22} {value[0]}")
    upstream_up = False
    clock.advance(400)
    state, value = trending("US")
    print(f"{'upstream down, entry stale':<34} X-Cache: {state:<22} {value[0]}")
    print(f"upstream calls: {upstream_calls}; stats: {cache.stats()}")


if __name__ == "__main__":
    main()
