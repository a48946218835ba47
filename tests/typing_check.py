"""Checked by `mypy --strict` in `nox -s lint` (not collected by pytest): the public API
as a user's type checker sees it."""

from __future__ import annotations

import tenuto
from tenuto.testing import FakeClock


def sync_use(cache: tenuto.Cache) -> int:
    env: tenuto.Envelope = cache.set("k", {"a": 1}, ttl=10, stale_ttl=20)
    lookup: tenuto.Lookup = cache.get("k")
    state: str = lookup.state
    many: dict[str, tenuto.Lookup] = cache.get_many(["k"])
    stats: dict[str, object] = cache.stats()
    removed: bool = cache.delete("k")
    return env.fresh_until + len(state) + len(many) + len(stats) + int(removed)


async def async_use(cache: tenuto.Cache) -> object:
    lookup = await cache.aget("k")
    env = await cache.aset("k", 1, ttl=1)
    return (lookup.value, env.payload, await cache.adelete("k"))


def construct() -> tenuto.Cache:
    return tenuto.Cache(None, namespace="x", clock=FakeClock(0))


key: str = tenuto.stable_key("name", {"a": 1})
