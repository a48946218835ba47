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


def decorated(cache: tenuto.Cache) -> None:
    @cache.cached(ttl=60)
    def trending(country: str, limit: int = 50) -> list[str]:
        return [country] * limit

    @cache.cached(ttl=60, negative=tenuto.Backoff())
    async def lyrics(song: str) -> str | None:
        return None

    tracks: list[str] = trending("US", limit=3)
    lookup: tenuto.Lookup = trending.lookup("US")
    key: str = trending.key("US")
    gone: bool = trending.invalidate("US")
    coro = lyrics("s")
    print(tracks, lookup, key, gone, coro)


async def decorated_async(cache: tenuto.Cache) -> str | None:
    @cache.cached(ttl=60)
    async def lyrics(song: str) -> str | None:
        return None

    found = await lyrics.lookup("s")
    return (await lyrics("s")) or found.state


def singleflight() -> int:
    sf = tenuto.SingleFlight()
    return sf.do("k", lambda: 1) + len(sf)


def registry(cache: tenuto.Cache) -> dict[str, str]:
    reg = tenuto.IdRegistry(cache, name="reccobeat")
    reg.mark_validated("s1", "r1")
    to_check, known_missing = reg.bulk_check_missing(["s1", "s2"])
    defaults = tenuto.Defaults(tenuto.AUDIO_FEATURE_DEFAULTS, tenuto.AUDIO_FEATURE_RANGES)
    record: dict[str, object] = defaults.complete({"tempo": 120.0}, None)
    print(to_check, known_missing, record, defaults.summary())
    return reg.bulk_get(["s1"])


def prewarm(cache: tenuto.Cache) -> dict[str, object]:
    @cache.cached(ttl=600)
    def trending(country: str) -> list[str]:
        return [country]

    warmer = tenuto.Prewarmer(cache)
    job: str = warmer.register(trending, "US", min_interval=60)
    ran: list[str] = warmer.run_once()
    token = tenuto.CancelToken()
    report: dict[str, object] = warmer.warm(["FR", "DE"], trending, concurrency=2, cancel=token)
    stopped: bool = warmer.stop(timeout=1.0)
    removed: int = cache.clear(prefix="trending")
    print(job, ran, warmer.snapshot()[job]["last_run"], stopped, removed, cache.count())
    return report


async def client(cache: tenuto.Cache) -> int:
    api = tenuto.Client(
        "https://api.example.com/v1",
        headers={"Authorization": "Bearer x"},
        limiter=tenuto.RateLimiter("80/minute"),
        breaker=tenuto.CircuitBreaker(),
        cache=cache,
    )
    data: object = api.get_json("tracks", params={"ids": "a"}, ttl=60)
    posted: object = await api.apost_json("recommend", json={"seeds": ["a"]})
    response: tenuto.Response = await api.arequest("GET", "tracks", timeout=5.0)
    try:
        api.post_json("x", json=[1])
    except tenuto.UpstreamError as err:
        print(err.status, err.url, err.body)
    print(data, posted, response.json(), api.stats()["requests"])
    return response.status
