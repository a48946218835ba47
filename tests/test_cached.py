"""`@cache.cached` on both backends: states, keys, stale-while-revalidate, stale-if-error,
negative caching, and single-flight across threads and tasks. Time is a FakeClock."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time

import pytest

import tenuto


def settle(fn, *args, **kwargs) -> None:
    """Waits for the load or refresh of this call's key that is in flight, if any."""
    fn._settle(fn.key(*args, **kwargs))


async def asettle(fn, *args, **kwargs) -> None:
    await fn._asettle(fn.key(*args, **kwargs))


class Upstream:
    """A fake upstream that counts its calls and can be made to fail or to block."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None
        self.result = None

    def __call__(self, *args):
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        return self.result if self.result is not None else {"args": list(args), "call": self.calls}


def test_hit_stale_miss_with_background_refresh(cache: tenuto.Cache, clock) -> None:
    upstream = Upstream()

    @cache.cached(ttl=300, stale_ttl=3600)
    def trending(country: str, limit: int = 50) -> dict:
        return upstream(country, limit)

    first = trending("US")
    assert first == {"args": ["US", 50], "call": 1}
    assert trending("US") == first and upstream.calls == 1
    assert trending.lookup("US").state == "hit"

    clock.advance(301)
    stale = trending.lookup("US")
    assert (stale.state, stale.value) == ("stale", first), "stale value served at once"
    settle(trending, "US")
    assert upstream.calls == 2, "one background refresh"
    refreshed = trending.lookup("US")
    assert (refreshed.state, refreshed.value["call"]) == ("hit", 2)

    clock.advance(5000)
    missed = trending.lookup("US")
    assert (missed.state, missed.value["call"], missed.stale_fallback) == ("miss", 3, False)


def test_many_stale_hits_start_one_refresh(cache: tenuto.Cache, clock) -> None:
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=100)
    def f(x: int) -> dict:
        return upstream(x)

    f(1)
    clock.advance(11)
    upstream.gate = threading.Event()
    values = [f(1) for _ in range(20)]
    assert all(v["call"] == 1 for v in values), "all served the stale value"
    upstream.gate.set()
    settle(f, 1)
    assert upstream.calls == 2


def test_refresh_failure_keeps_the_stale_value(cache: tenuto.Cache, clock, caplog) -> None:
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=100)
    def f(x: int) -> dict:
        return upstream(x)

    good = f(1)
    clock.advance(11)
    upstream.fail = ConnectionError("503")
    with caplog.at_level(logging.WARNING, logger="tenuto"):
        assert f(1) == good
        settle(f, 1)
        # The refresh thread logs the failure just after the refresh lands (which is all
        # settle() waits for): under load the record can come a moment later.
        deadline = time.monotonic() + 5
        while not any("refresh" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the failed refresh was not logged"
            time.sleep(0.01)
    assert f.lookup(1).value == good, "a failed fetch never overwrites a good value"
    settle(f, 1)


def test_failed_load_with_a_stale_value_serves_it(cache: tenuto.Cache, clock) -> None:
    """What a load shares with its waiters when the fetch fails and a stale value exists
    (e.g. a miss that joined a failing background refresh): the stale value, flagged."""
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=100)
    def f(x: int) -> dict:
        return upstream(x)

    good = f(1)
    clock.advance(11)
    stale = cache.get(f.key(1))
    upstream.fail = ConnectionError("503")
    loaded = f._resolve(f.key(1), (1,), {}, True)  # a forced load that fails
    assert (loaded.value, loaded.stale_fallback) == (good, True)
    assert loaded.envelope == stale.envelope
    f.invalidate(1)
    with pytest.raises(ConnectionError):
        f._resolve(f.key(1), (1,), {}, True)


def test_miss_failure_raises_to_every_caller_and_caches_nothing(cache: tenuto.Cache) -> None:
    upstream = Upstream()
    upstream.fail = TimeoutError("upstream took 70 s")
    upstream.gate = threading.Event()

    @cache.cached(ttl=10)
    def f(x: int) -> dict:
        return upstream(x)

    errors: list[BaseException] = []

    def call() -> None:
        try:
            f(1)
        except TimeoutError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    key = f.key(1)
    while f._followers(key) < 7:
        threading.Event().wait(0.001)
    upstream.gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 8 and all(isinstance(e, TimeoutError) for e in errors)
    assert upstream.calls == 1
    upstream.fail, upstream.gate = None, None
    assert f(1)["call"] == upstream.calls, "the failure was not cached"


def test_32_threads_one_upstream_call(cache: tenuto.Cache) -> None:
    upstream = Upstream()
    upstream.gate = threading.Event()

    @cache.cached(ttl=60)
    def f(x: int) -> dict:
        return upstream(x)

    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(f(7))) for _ in range(32)]
    for t in threads:
        t.start()
    while f._followers(f.key(7)) < 31:
        threading.Event().wait(0.001)
    upstream.gate.set()
    for t in threads:
        t.join(10)
    assert upstream.calls == 1
    assert len(results) == 32 and all(r == results[0] for r in results)
    assert f._followers(f.key(7)) == 0


async def test_100_tasks_one_upstream_call(cache: tenuto.Cache) -> None:
    calls = 0
    release = asyncio.Event()

    @cache.cached(ttl=60)
    async def recommend(seed: str) -> list:
        nonlocal calls
        calls += 1
        await release.wait()
        return [seed, calls]

    tasks = [asyncio.ensure_future(recommend("song")) for _ in range(100)]
    while recommend._followers(recommend.key("song")) < 99:
        await asyncio.sleep(0.001)  # let every task reach the flight (Redis lookups first)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1 and all(r == ["song", 1] for r in results)
    assert await recommend("song") == ["song", 1]


async def test_async_stale_refreshes_as_a_task(cache: tenuto.Cache, clock) -> None:
    calls = 0

    @cache.cached(ttl=10, stale_ttl=100)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await f(1) == 1
    clock.advance(11)
    assert await f(1) == 1, "stale served at once"
    await asettle(f, 1)
    assert calls == 2 and await f(1) == 2
    assert (await f.lookup(1)).state == "hit"


async def test_cancelled_async_leader_does_not_strand_waiters(cache: tenuto.Cache) -> None:
    calls = 0
    started = asyncio.Event()
    release = asyncio.Event()

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return calls

    leader = asyncio.ensure_future(f(1))
    await started.wait()
    follower = asyncio.ensure_future(f(1))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    release.set()
    assert await follower == 2, "the waiter took over and fetched"


def test_keys_normalise_arguments_through_the_signature(cache: tenuto.Cache) -> None:
    @cache.cached(ttl=60, name="trending")
    def trending(country: str, limit: int = 50, *, explicit: bool = False) -> str:
        return country

    key = trending.key("US")
    assert key == trending.key("US", 50) == trending.key(country="US", limit=50)
    assert key == tenuto.stable_key("trending", {"country": "US", "limit": 50, "explicit": False})
    assert trending.key("US", 51) != key
    with pytest.raises(TypeError, match="unexpected keyword"):
        trending("US", colour="red")
    with pytest.raises(TypeError, match="missing required argument"):
        trending()
    with pytest.raises(TypeError, match="positional arguments"):
        trending("US", 1, True)
    with pytest.raises(TypeError, match="multiple values"):
        trending("US", country="FR")


def test_default_name_is_module_and_qualname(cache: tenuto.Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    assert f.key_name == f"{__name__}.test_default_name_is_module_and_qualname.<locals>.f"


def test_unkeyable_argument_names_itself(cache: tenuto.Cache) -> None:
    @cache.cached(ttl=60)
    def f(session: object, song: str) -> str:
        return song

    with pytest.raises(TypeError, match='argument "session" of .*cannot be part of a cache key'):
        f(object(), "x")


def test_key_callable_overrides(cache: tenuto.Cache) -> None:
    calls = []

    @cache.cached(ttl=60, key=lambda session, song: f"song:{song}")
    def by_str(session: object, song: str) -> str:
        calls.append(song)
        return song.upper()

    assert by_str(object(), "a") == by_str(object(), "a") == "A"
    assert calls == ["a"] and by_str.key(None, "a") == "song:a"
    assert cache.get("song:a").value == "A", "a str key is used as is"

    @cache.cached(ttl=60, name="s", key=lambda session, song: {"song": song})
    def by_data(session: object, song: str) -> str:
        return song

    assert by_data.key(None, "a") == tenuto.stable_key("s", {"song": "a"})


def test_variadic_signatures_bind_in_python(cache: tenuto.Cache) -> None:
    @cache.cached(ttl=60, name="v")
    def f(a: int, *rest: int, **opts: str) -> int:
        return a + sum(rest)

    assert f(1, 2, 3, x="y") == 6
    assert f.key(1, 2, 3, x="y") == tenuto.stable_key(
        "v", {"a": 1, "rest": [2, 3], "opts": {"x": "y"}}
    )


def test_wrapper_looks_like_the_function(cache: tenuto.Cache) -> None:
    def trending(country: str, limit: int = 50) -> dict:
        """Trending tracks."""
        return {}

    wrapped = cache.cached(ttl=60)(trending)
    assert wrapped.__name__ == "trending" and wrapped.__doc__ == "Trending tracks."
    assert wrapped.__wrapped__ is trending
    assert inspect.signature(wrapped) == inspect.signature(trending)


def test_methods_bind_self(cache: tenuto.Cache) -> None:
    class Client:
        def __init__(self) -> None:
            self.calls = 0

        @cache.cached(ttl=60, key=lambda self, song: f"song:{song}")
        def fetch(self, song: str) -> str:
            self.calls += 1
            return song * 2

    client = Client()
    assert client.fetch("a") == client.fetch("a") == "aa"
    assert client.calls == 1


def test_negative_results_back_off(cache: tenuto.Cache, clock) -> None:
    answers = [None, None, None, "lyrics", None]

    @cache.cached(ttl=3600, negative=tenuto.Backoff(base=60, factor=2, max=200))
    def lyrics(song: str):
        return answers.pop(0)

    assert lyrics("s") is None
    env = lyrics.lookup("s").envelope
    assert env.fresh_until - env.fetched_at == 60
    clock.advance(61)
    assert lyrics("s") is None
    env = lyrics.lookup("s").envelope
    assert env.fresh_until - env.fetched_at == 120
    clock.advance(121)
    assert lyrics("s") is None
    env = lyrics.lookup("s").envelope
    assert env.fresh_until - env.fetched_at == 200, "capped at max"
    clock.advance(201)
    assert lyrics("s") == "lyrics"
    assert lyrics.lookup("s").envelope.fresh_until - clock.now() == pytest.approx(3600, abs=1)
    clock.advance(3601)
    assert lyrics("s") is None
    env = lyrics.lookup("s").envelope
    assert env.fresh_until - env.fetched_at == 60, "a positive answer reset the streak"


def test_refresh_and_invalidate(cache: tenuto.Cache) -> None:
    upstream = Upstream()

    @cache.cached(ttl=60)
    def f(x: int) -> dict:
        return upstream(x)

    assert f(1)["call"] == 1
    assert f.refresh(1)["call"] == 2
    assert f(1)["call"] == 2
    assert f.invalidate(1) is True
    assert f.invalidate(1) is False
    assert f(1)["call"] == 3


async def test_async_helpers(cache: tenuto.Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await f(1) == 1
    assert (await f.alookup(1)).state == "hit"
    assert await f.arefresh(1) == 2
    assert await f.ainvalidate(1) is True
    assert await f(1) == 3


def test_current_state_combines_a_request(cache: tenuto.Cache, clock) -> None:
    @cache.cached(ttl=10, stale_ttl=100)
    def f(x: int) -> int:
        return x

    assert tenuto.current_state() is None
    with tenuto.request_scope():
        assert tenuto.current_state() is None
        f(1)
        assert tenuto.current_state() == "miss"
    with tenuto.request_scope():
        f(1)
        assert tenuto.current_state() == "hit"
        f(2)
        assert tenuto.current_state() == "miss"
    clock.advance(11)
    with tenuto.request_scope():
        f(1)
        assert tenuto.current_state() == "stale"
        f(3)
        assert tenuto.current_state() == "stale", "stale outranks miss"
    settle(f, 1)


class TestBadArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"ttl": 0}, ValueError),
            ({"ttl": "60"}, ValueError),
            ({"ttl": [60]}, TypeError),
            ({"ttl": 60, "stale_ttl": 30}, ValueError),
            ({"ttl": 60, "key": "not callable"}, TypeError),
            ({"ttl": 60, "negative": 60}, TypeError),
            ({"ttl": 60, "name": ""}, TypeError),
        ],
    )
    def test_rejected_at_decoration(self, kwargs, error) -> None:
        with pytest.raises(error):
            tenuto.Cache().cached(**kwargs)

    @pytest.mark.parametrize(
        "kwargs", [{"base": 0}, {"factor": 0.5}, {"base": 10, "max": 5}, {"when": 3}, {"base": "1"}]
    )
    def test_bad_backoff(self, kwargs) -> None:
        with pytest.raises((ValueError, TypeError)):
            tenuto.Backoff(**kwargs)


def test_open_breaker_serves_stale(cache: tenuto.Cache, clock) -> None:
    breaker = tenuto.CircuitBreaker(failures=1, reset_after=300, clock=clock)
    upstream = Upstream()

    @cache.cached(ttl=10, stale_ttl=1000, breaker=breaker)
    def f(x: int) -> dict:
        return upstream(x)

    good = f(1)
    upstream.fail = ConnectionError("503")
    with pytest.raises(ConnectionError):
        f(2)  # a miss with nothing stale: the error goes through, and the breaker opens
    assert breaker.state == "open"
    clock.advance(11)
    calls = upstream.calls
    stale = f._resolve(f.key(1), (1,), {}, True)
    assert (stale.value, stale.stale_fallback) == (good, True)
    assert upstream.calls == calls, "the open breaker kept the upstream from being called"
    with pytest.raises(tenuto.CircuitOpen):
        f(3)
