"""tenuto on a real Redis Cluster (3 primaries + 3 replicas on loopback): bulk registry
operations routed by slot, clear() on every primary, processes sharing single-flight and
a limiter through the cluster, and a primary killed under load.

The behaviour suite (tests parameterised by the ``backend`` fixture) also runs here."""

from __future__ import annotations

import gc
import multiprocessing
import re
import threading
import time

import pytest

import tenuto
from tenuto.testing import RedisCluster, companion_key

redis_py = pytest.importorskip("redis")
from redis.cluster import RedisCluster as PyCluster  # noqa: E402


def slot_of(raw: PyCluster, key: str) -> int:
    return int(raw.keyslot(key))


@pytest.fixture
def raw_cluster(redis_cluster: RedisCluster):
    node = redis_cluster.nodes[0]
    client = PyCluster(host="127.0.0.1", port=node.port)
    yield client
    client.close()


def command_calls(cluster: RedisCluster, command: str) -> dict[int, int]:
    """`INFO commandstats` calls of `command` on each running primary, by port."""
    out = {}
    for node in cluster.primaries():
        text = cluster.info(node, "info", "commandstats")
        found = re.search(rf"cmdstat_{command}:calls=(\d+)", text)
        out[node.port] = int(found.group(1)) if found else 0
    return out


def slot_owners(raw: PyCluster) -> list[tuple[int, int, int]]:
    """(first slot, last slot, port) of each primary's ranges."""
    return [(lo, hi, info["primary"][1]) for (lo, hi), info in raw.cluster_slots().items()]


def test_keys_hash_like_the_server(raw_cluster, namespace) -> None:
    """A cached call's lock and wake-up list share its value's slot, whatever the key."""
    for key in ["plain", "{tagged}x", "a}b", "{}", "é"]:
        value = f"{namespace}:{key}"
        for what in ("lock", "waiters", "done"):
            assert slot_of(raw_cluster, companion_key(value, what)) == slot_of(raw_cluster, value)


def test_bulk_registry_ops_batch_per_shard(redis_cluster, namespace) -> None:
    """1,000 IDs across slots: answers in order; each primary gets one pipeline of GETs
    for exactly the keys it serves (a cluster refuses multi-key commands across slots,
    even on one node, so one MGET per slot would be the alternative)."""
    cache = tenuto.Cache(redis_cluster.url, namespace=namespace, fail_open=False)
    reg = tenuto.IdRegistry(cache, name="rb")
    ids = [f"sp{i}" for i in range(1000)]
    reg.bulk_mark_validated({s: f"rb{s}" for s in ids})
    before = command_calls(redis_cluster, "get")
    mgets = command_calls(redis_cluster, "mget")
    got = reg.bulk_get(ids)
    after = command_calls(redis_cluster, "get")
    assert list(got) == ids and all(got[s] == f"rb{s}" for s in ids)
    assert command_calls(redis_cluster, "mget") == mgets, "no per-slot MGETs"
    raw = PyCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        owners = slot_owners(raw)
        slots = [slot_of(raw, f"{namespace}:rb:validated:{s}") for s in ids]
    finally:
        raw.close()
    for port in after:
        owned = [s for s in slots if any(lo <= s <= hi and p == port for lo, hi, p in owners)]
        assert after[port] - before[port] == len(owned) > 0, port


def test_clear_removes_one_namespace_on_every_primary(redis_cluster, raw_cluster) -> None:
    a = tenuto.Cache(redis_cluster.url, namespace="clear-a", fail_open=False)
    b = tenuto.Cache(redis_cluster.url, namespace="clear-b", fail_open=False)
    a.set_many({f"k{i}": i for i in range(200)}, ttl=60)
    b.set_many({f"k{i}": i for i in range(200)}, ttl=60)
    nodes_with_a = {raw_cluster.get_node_from_key(f"clear-a:k{i}").port for i in range(200)}
    assert len(nodes_with_a) == 3, "the namespace is spread over every primary"
    a.clear()
    assert all(v.state == "miss" for v in a.get_many([f"k{i}" for i in range(200)]).values())
    assert all(
        v.value == i for i, v in enumerate(b.get_many([f"k{i}" for i in range(200)]).values())
    )


def _cached_worker(url: str, namespace: str, calls, barrier, results) -> None:  # pragma: no cover
    cache = tenuto.Cache(url, namespace=namespace, fail_open=False)

    @cache.cached(ttl=60, name="cold")
    def cold(song: str) -> str:
        with calls.get_lock():
            calls.value += 1
        time.sleep(0.5)  # the upstream's latency, so every caller arrives during the call
        return f"features of {song}"

    out: list[str] = []
    barrier.wait(30)
    threads = [threading.Thread(target=lambda: out.append(cold("s1"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results.put(out)


def test_four_processes_one_upstream_call(redis_cluster, namespace) -> None:
    ctx = multiprocessing.get_context("fork")
    calls = ctx.Value("i", 0)
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    args = (redis_cluster.url, namespace, calls, barrier, results)
    procs = [ctx.Process(target=_cached_worker, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    outputs = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [len(o) for o in outputs] == [4] * 4
    assert {v for o in outputs for v in o} == {"features of s1"}
    assert calls.value == 1


def _limited_worker(url: str, name: str, barrier, results) -> None:  # pragma: no cover
    lim = tenuto.RateLimiter("20/10seconds", url=url, name=name, mode="inbound")
    barrier.wait(30)
    admitted = []
    for _ in range(30):
        if lim.try_acquire()[0]:
            admitted.append(time.time())
    results.put((admitted, lim.stats()["admitted_unchecked"]))


def test_four_processes_share_a_limit(redis_cluster, namespace) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    args = (redis_cluster.url, namespace, barrier, results)
    procs = [ctx.Process(target=_limited_worker, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert [unchecked for _, unchecked in outcomes] == [0] * 4, "the cluster answered every call"
    times = sorted(t for admitted, _ in outcomes for t in admitted)
    assert len(times) == 20, len(times)
    assert all(b - a < 10 for a, b in zip(times, times[1:])), "one window: never over 20"


def test_a_primary_killed_under_load(namespace) -> None:
    """A primary dies while 8 threads read and write: no caller sees an error (memory
    serves meanwhile); once its replica is promoted, writes reach the cluster again."""
    with RedisCluster(node_timeout=1000) as cluster:
        cache = tenuto.Cache(cluster.url, namespace=namespace, command_timeout=1.0)
        calls = []

        @cache.cached(ttl=60)
        def song(i: int) -> dict:
            calls.append(i)
            return {"id": i}

        errors: list[BaseException] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                try:
                    assert song(i % 50) == {"id": i % 50}
                    cache.set(f"w{i % 50}", i, ttl=60)
                    batch = {f"b{(i + j) % 50}": j for j in range(10)}
                    cache.set_many(batch, ttl=60)
                    assert len(cache.get_many(list(batch))) == 10
                except BaseException as err:  # noqa: BLE001 - every error counts
                    errors.append(err)
                i += 1

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            victim = cluster.primaries()[0]
            victim.stop()
            killed_at = time.monotonic()
            # The cluster's own failover: a replica is promoted in the victim's place.
            deadline = killed_at + 30
            while len(cluster.primaries()) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)  # polling the cluster's roles, bounded by the deadline
            cluster.wait_healthy(30)
            healthy_at = time.monotonic()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        # Back to normal: writes to keys on every primary reach the cluster.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cache.set_many({f"after{i}": i for i in range(30)}, ttl=60)
            if not cache.stats()["degraded"]:
                break
            time.sleep(0.1)  # waiting for the reconnect, bounded by the deadline
        recovered_at = time.monotonic()
        print(
            f"\nfailover: cluster healthy after {healthy_at - killed_at:.2f} s, "
            f"tenuto back on the cluster after {recovered_at - killed_at:.2f} s, "
            f"{len(errors)} client errors"
        )
        assert errors == []
        assert not cache.stats()["degraded"], cache.stats()
        raw = PyCluster(host="127.0.0.1", port=cluster.primaries()[0].port)
        try:
            assert all(raw.get(f"{namespace}:after{i}") is not None for i in range(30))
        finally:
            raw.close()
        # Close the cache's connections before its cluster stops, so no client keeps
        # reconnecting to dead nodes on the shared runtime after the test.
        threads.clear()
        del load
        song = cache = None  # noqa: F811, F841 - drops the last references
        gc.collect()


def test_stats_name_every_primary(redis_cluster, namespace) -> None:
    cache = tenuto.Cache(redis_cluster.url, namespace=namespace)
    cache.set("k", 1, ttl=60)
    nodes = cache.stats()["nodes"]
    assert len(nodes) == 3 and all(n["reachable"] for n in nodes)
    assert sum(n["slots"] for n in nodes) == 16384
    assert {n["address"] for n in nodes} == {
        f"127.0.0.1:{p.port}" for p in redis_cluster.primaries()
    }
