"""The remote tier on real Redis servers started here (redis-server from Debian): one
server, and a Redis Cluster of six nodes on loopback ports."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import kvpack
from kvpack import _core

from redis_servers import REDIS, Cluster, Server, command, free_port, pipeline, start_redis

pytestmark = pytest.mark.skipif(REDIS is None, reason="needs redis-server (scripts/setup.sh)")


@pytest.fixture
def redis():
    server = Server()
    yield server.proc, server.url
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the tests that leave its masters running (each starts it empty)."""
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    yield running
    running.stop()


@pytest.fixture(params=["server", "cluster"])
def remote(request):
    """A Redis server or a Redis Cluster, empty: ``.url`` for the store, ``.command`` for
    the test's own hands on the values."""
    if request.param == "server":
        server = Server()
        yield server
        server.stop()
    else:
        running = request.getfixturevalue("cluster")
        running.wait_ok()
        running.flush()
        yield running


def context(seed, tokens=200):
    r = np.random.default_rng(seed)
    return [(r.standard_normal((2, tokens, 32)).astype(np.float16),) * 2 for _ in range(2)]


def test_remote_round_trip_and_sharing(remote):
    url = remote.url
    kv = context(0)
    with kvpack.TieredStore(0, redis_url=url, policy="lru", bandwidths=[1e10, 1e8]) as store:
        store.put("shared", kv)
        assert store.where("shared") == ("remote", "none")
        got = store.get("shared")
        assert got.tier == "remote"
        np.testing.assert_array_equal(got.kv[1][0], kv[1][0])
        # Another process sees the entry through the server.
        reader = textwrap.dedent(
            f"""
            import numpy as np, kvpack
            store = kvpack.TieredStore(0, redis_url="{url}", bandwidths=[1e10, 1e8])
            got = store.get("shared")
            r = np.random.default_rng(0)
            expected = r.standard_normal((2, 200, 32)).astype(np.float16)
            assert got.tier == "remote" and np.array_equal(got.kv[0][0], expected)
            print("ok")
            """
        )
        out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True)
        assert out.stdout.strip() == "ok", out.stderr
        assert store.delete("shared") and "shared" not in store


def test_remote_capacity_and_prefix(remote):
    url = remote.url
    kv = context(1)
    size = (len(kvpack.store.encode(kv, "none", key="a")) + 4095) // 4096 * 4096
    with kvpack.TieredStore(
        0, redis_url=url, redis_bytes=size, policy="lru", bandwidths=[1e10, 1e8]
    ) as store:
        store.put("a", kv)
        store.put("b", kv)  # only one fits: the older leaves, counted
        assert "a" not in store and "b" in store
        stats = store.stats()
        assert stats["evictions"] == 1
        assert stats["tiers"]["remote"]["bytes"] <= stats["tiers"]["remote"]["capacity"]
    with kvpack.TieredStore(
        0, redis_url=url, redis_prefix="other:", bandwidths=[1e10, 1e8]
    ) as other:
        assert "b" not in other


def test_server_going_away_gives_misses_not_hangs(redis):
    proc, url = redis
    kv = context(2)
    with kvpack.TieredStore(
        0, redis_url=url, policy="lru", bandwidths=[1e10, 1e8], timeout=0.5
    ) as store:
        store.put("a", kv)
        proc.kill()
        proc.wait()
        start = time.time()
        with pytest.raises(KeyError):
            store.get("a")
        with pytest.raises(ConnectionRefusedError, match="put: 'b' not stored: remote"):
            store.put("b", kv)
        assert "b" not in store
        with pytest.raises(KeyError):
            store.get("c")
        assert time.time() - start < 5.0
        stats = store.stats()
        assert stats["errors"] >= 1 and stats["misses"] >= 2


def test_unreachable_server_at_start():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with kvpack.TieredStore(0, redis_url=url, bandwidths=[1e10, 1e8], timeout=0.2) as store:
        with pytest.raises(OSError, match=r"remote: 127\.0\.0\.1"):
            store.put("a", context(3))
        assert "a" not in store
        assert store.stats()["errors"] >= 1


def test_secret_makes_entries_of_writers_without_it_misses(remote):
    url = remote.url
    kv = [(np.ones((2, 16, 8), np.float32),) * 2]
    args = dict(redis_url=url, policy="lru", bandwidths=[1e10, 1e8])
    with kvpack.TieredStore(0, **args) as intruder:  # no secret: plants an unsigned blob
        intruder.put("shared", kv)
    with kvpack.TieredStore(0, secret="team", **args) as store:
        with pytest.raises(KeyError):
            store.get("shared")
        assert store.stats()["unauthenticated"] == 1
        store.put("shared", kv)  # signed now: the team's other stores read it
    with kvpack.TieredStore(0, secret="team", **args) as teammate:
        np.testing.assert_array_equal(teammate.get("shared").kv[0][0], kv[0][0])


class HungServer:
    """Accepts connections and reads commands, never answering: a Redis server stopped
    (SIGSTOP) or hung, as a TCP peer sees it. Counts the bytes it was sent."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection):
        while True:
            try:
                data = connection.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def close(self):
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_hung_server_costs_one_timeout_per_call_then_backs_off():
    server = HungServer()
    timeout = 0.4
    store = kvpack.TieredStore(
        0, redis_url=f"redis://127.0.0.1:{server.port}/0", bandwidths=[1e10, 1e8], timeout=timeout
    )
    try:
        # Each call returns (a miss) once its timeout is spent; how long that takes
        # against the timeout is the reliability suite's figure, not a test's.
        for key in "abc":
            with pytest.raises(KeyError):
                store.get(key)
        sent = server.received
        assert sent > 0
        for key in "defgh":  # three failures in a row: the server is left alone a while
            with pytest.raises(KeyError):
                store.get(key)
            assert key not in store
        assert server.received == sent
        assert store.stats()["errors"] >= 3 + 10
    finally:
        store.close()
        server.close()


def test_byte_counts_follow_a_server_restart(redis):
    proc, url = redis
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    args = dict(redis_url=url, policy="lru", bandwidths=[1e10, 1e8])
    with kvpack.TieredStore(0, **args) as store:
        store.put("a", context(5))
        store.put("b", context(6))
        assert store.stats()["tiers"]["remote"]["bytes"] > 0
        proc.kill()
        proc.wait()
        restarted = start_redis(port)  # no persistence: it comes back empty
        try:
            with pytest.raises(KeyError):
                store.get("a")
            # The reconnection checked what the server holds: neither entry counts now.
            assert store.stats()["tiers"]["remote"]["bytes"] == 0
            store.put("c", context(7))
            np.testing.assert_array_equal(store.get("c").kv[0][0], context(7)[0][0])
        finally:
            restarted.kill()
            restarted.wait()


def versioned(v):
    block = np.full((2, 32, 16), float(v), np.float32)
    return [(block, block)]


def test_an_older_signed_value_put_back_is_not_served(remote):
    with kvpack.TieredStore(0, redis_url=remote.url, secret="s", **ARGS) as store:
        store.put("k", versioned(1))
        old = remote.command("GET", "kvpack:k")
        store.put("k", versioned(2))
        remote.command("SET", "kvpack:k", old)  # a replay: signed, this key's, older
        with pytest.raises(KeyError):
            store.get("k")
        assert store.stats()["stale"] == 1
        assert remote.command("GET", "kvpack:k") == old  # left in place: not this store's


def test_a_deleted_entry_put_back_in_redis_does_not_return(remote):
    with kvpack.TieredStore(0, redis_url=remote.url, secret="s", **ARGS) as store:
        store.put("k", versioned(1))
        old = remote.command("GET", "kvpack:k")
        assert store.delete("k")
        remote.command("SET", "kvpack:k", old)
        with pytest.raises(KeyError):
            store.get("k")
        assert store.stats()["stale"] == 1


def test_put_to_a_stopped_server_raises_and_keeps_the_old_entry(redis):
    proc, url = redis
    with kvpack.TieredStore(0, redis_url=url, timeout=0.3, **ARGS) as store:
        store.put("k", versioned(1))
        errors = store.stats()["errors"]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(OSError, match="remote"):
                store.put("k", versioned(2))
            # One call tried, within one timeout; the entry it would replace is still held.
            assert store.stats()["errors"] == errors + 1
            assert store.where("k") == ("remote", "none")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Served again once the server answers: the old version, or the new one if the
        # server applied the write it had received.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                assert served(store, "k") in (1.0, 2.0)
                break
            except KeyError:
                time.sleep(0.2)
        else:
            raise AssertionError("the entry was not served again")


def served(store, key):
    return float(store.get(key).kv[0][0][0, 0, 0])


ARGS = dict(policy="lru", bandwidths=[1e10, 1e8])


# ---- Redis Cluster --------------------------------------------------------------------


def test_cluster_slots_match_cluster_keyslot(cluster):
    r = np.random.default_rng(28)
    keys = []
    for _ in range(10_000):
        key = bytes(r.integers(0, 256, int(r.integers(0, 40)), dtype=np.uint8))
        if r.random() < 0.3:  # hash tags: "{...}" somewhere, empty ones and unclosed ones too
            at = int(r.integers(0, len(key) + 1))
            key = key[:at] + b"{" + key[at : at + int(r.integers(0, 4))] + b"}" + key[at:]
        keys.append(key)
    expected = pipeline(cluster.live_ports()[0], [("CLUSTER", "KEYSLOT", k) for k in keys])
    assert [_core.cluster_slot(k) for k in keys] == expected


def test_cluster_spreads_entries_over_every_master(cluster):
    cluster.wait_ok()
    cluster.flush()
    kvs = {f"k{i}": versioned(i) for i in range(24)}
    with kvpack.TieredStore(0, redis_url=cluster.url, **ARGS) as store:
        for key, kv in kvs.items():
            store.put(key, kv)
        for key in kvs:
            assert served(store, key) == float(key[1:])
        held = [command(port, "DBSIZE") for port, _, _ in cluster.masters()]
        assert len(held) == 3 and all(n > 0 for n in held) and sum(held) == len(kvs)
        size = (len(kvpack.store.encode(kvs["k0"], key="k0")) + 4095) // 4096 * 4096
        assert store.stats()["tiers"]["remote"]["bytes"] == len(kvs) * size


def _migrate(cluster, slot, source, target, keys):
    """Moves `slot` from master `source` to `target` (ports, ids) step by step, as
    redis-cli --cluster reshard does: importing / migrating, then the keys, then the owner."""
    (source_port, source_id), (target_port, target_id) = source, target
    assert command(target_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id) == "OK"
    assert command(source_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id) == "OK"
    yield "migrating"
    for key in keys:
        command(source_port, "MIGRATE", "127.0.0.1", target_port, key, 0, 5000)
    yield "keys moved"
    for port, _, _ in cluster.masters():
        command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    yield "moved"


def test_cluster_follows_ask_during_a_migration_and_moved_after_it(cluster):
    cluster.wait_ok()
    cluster.flush()
    slot = _core.cluster_slot(b"kvpack:{tag}a")
    source = cluster.master_of(slot)
    target = next((p, i) for p, i, _ in cluster.masters() if p != source[0])
    with kvpack.TieredStore(0, redis_url=cluster.url, **ARGS) as store:
        store.put("{tag}a", versioned(1))  # the hash tag: one slot for both keys
        steps = _migrate(cluster, slot, source, target, [b"kvpack:{tag}a"])
        next(steps)
        store.put("{tag}b", versioned(2))  # a new key while the slot migrates
        next(steps)
        # The source answers ASK for the moved key: followed with ASKING, once.
        assert command(source[0], "GET", "kvpack:{tag}a").startswith("ASK ")
        assert served(store, "{tag}a") == 1.0 and served(store, "{tag}b") == 2.0
        next(steps)
        assert command(source[0], "GET", "kvpack:{tag}a").startswith("MOVED ")
        store.put("{tag}a", versioned(3))  # MOVED: the slot map follows
        assert served(store, "{tag}a") == 3.0 and served(store, "{tag}b") == 2.0
        assert command(target[0], "EXISTS", "kvpack:{tag}a", "kvpack:{tag}b") == 2
        assert store.stats()["errors"] == 0 and store.stats()["misses"] == 0
        size = (len(kvpack.store.encode(versioned(0), key="{tag}a")) + 4095) // 4096 * 4096
        assert store.stats()["tiers"]["remote"]["bytes"] == 2 * size  # each entry once


def test_cluster_reshard_while_serving_loses_nothing(cluster):
    cluster.wait_ok()
    cluster.flush()
    kvs = {f"k{i}": versioned(i) for i in range(60)}
    (source, source_id, _), (_, target_id, _) = cluster.masters()[:2]
    failures = []
    with kvpack.TieredStore(0, redis_url=cluster.url, timeout=5.0, **ARGS) as store:
        for key, kv in kvs.items():
            store.put(key, kv)
        reshard = subprocess.Popen(
            [
                *(shutil.which("redis-cli"), "--cluster", "reshard", f"127.0.0.1:{source}"),
                *("--cluster-from", source_id, "--cluster-to", target_id),
                *("--cluster-slots", "600", "--cluster-yes"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        calls, deadline = 0, time.monotonic() + 120
        while (reshard.poll() is None or calls < 200) and time.monotonic() < deadline:
            key = f"k{calls % 60}"
            try:
                if calls % 3 == 0:
                    store.put(key, kvs[key])
                elif served(store, key) != float(key[1:]):
                    failures.append(f"{key}: wrong value")
            except (KeyError, OSError) as error:
                failures.append(f"{key}: {error!r}")
            calls += 1
        assert reshard.wait(timeout=60) == 0
        assert failures == []
        for key in kvs:
            assert served(store, key) == float(key[1:])
        size = (len(kvpack.store.encode(kvs["k0"], key="k0")) + 4095) // 4096 * 4096
        assert store.stats()["tiers"]["remote"]["bytes"] == len(kvs) * size  # each once


def test_cluster_node_paused_misses_only_its_slots(cluster):
    cluster.wait_ok()
    cluster.flush()
    kvs = {f"k{i}": versioned(i) for i in range(24)}
    with kvpack.TieredStore(0, redis_url=cluster.url, timeout=0.2, **ARGS) as store:
        for key, kv in kvs.items():
            store.put(key, kv)
        paused, _, ranges = cluster.masters()[0]
        on_paused = {
            key
            for key in kvs
            if any(a <= _core.cluster_slot(b"kvpack:" + key.encode()) <= b for a, b in ranges)
        }
        assert 0 < len(on_paused) < len(kvs)
        os.kill(cluster.procs[paused].pid, signal.SIGSTOP)
        try:
            for key in kvs:
                if key in on_paused:
                    with pytest.raises(KeyError):
                        store.get(key)
                else:
                    assert served(store, key) == float(key[1:])
        finally:
            os.kill(cluster.procs[paused].pid, signal.SIGCONT)
        cluster.wait_ok()
        deadline = time.monotonic() + 60  # after the node's back-off, served again
        while time.monotonic() < deadline:
            try:
                assert all(served(store, key) == float(key[1:]) for key in kvs)
                break
            except KeyError:
                time.sleep(0.2)
        else:
            raise AssertionError("the paused node's entries were not served again")


def test_cluster_master_killed_fails_over_without_a_restart(tmp_path):
    running = Cluster(tmp_path, node_timeout=1000)
    try:
        kvs = {f"k{i}": versioned(i) for i in range(24)}
        with kvpack.TieredStore(0, redis_url=running.url, timeout=0.3, **ARGS) as store:
            for key, kv in kvs.items():
                store.put(key, kv)
            killed, _, ranges = running.masters()[0]
            on_killed = {
                k
                for k in kvs
                if any(a <= _core.cluster_slot(b"kvpack:" + k.encode()) <= b for a, b in ranges)
            }
            running.wait_replicated(killed)  # what was acknowledged is on the replica
            running.procs[killed].kill()  # kill -9
            running.procs[killed].wait()
            served_again = set()
            deadline = time.monotonic() + 60
            while len(served_again) < len(kvs) and time.monotonic() < deadline:
                for key in kvs:
                    try:
                        assert served(store, key) == float(key[1:])  # a miss, never wrong data
                        served_again.add(key)
                    except KeyError:
                        assert key in on_killed
                time.sleep(0.05)
            assert served_again == set(kvs)  # the replica took over: served by the same store
            store.put("after", versioned(99))
            assert served(store, "after") == 99.0
            # Byte accounting: what the cluster still holds, counted once.
            held = sum(running.command("EXISTS", f"kvpack:{k}") for k in [*kvs, "after"])
            size = (len(kvpack.store.encode(versioned(0), key="k0")) + 4095) // 4096 * 4096
            assert store.stats()["tiers"]["remote"]["bytes"] == held * size
    finally:
        running.stop()


SHARER = textwrap.dedent(
    """
    import sys, time, numpy as np, kvpack
    url, directory = sys.argv[1], sys.argv[2]
    me, n, rounds = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    # DRAM (private) for one entry, SSD (shared) for four, the cluster (shared) for the rest.
    size = 2 * 64 * 32 * 4 * 2 + 4096
    store = kvpack.TieredStore(size, directory, 4 * size, redis_url=url, policy="lru",
                               bandwidths=[1e10, 1e9, 1e8])
    seen, stale, reads, others, value = {}, 0, 0, 0, 0
    r = np.random.default_rng(me)
    print("ready", flush=True)
    sys.stdin.readline()  # all start together
    deadline = time.monotonic() + 60  # a bound, in case the machine crawls
    while value < rounds and time.monotonic() < deadline:
        value += 1
        own = f"p{me}-{value % 4}"
        block = np.full((2, 64, 32), float(value), np.float32)
        store.put(own, [(block, block)])
        seen[own] = value
        key = f"p{int(r.integers(0, n))}-{int(r.integers(0, 4))}"
        try:
            got = store.get(key).kv[0][0]
        except KeyError:
            continue
        reads += 1
        others += not key.startswith(f"p{me}-")
        if not (got == got[0, 0, 0]).all() or got[0, 0, 0] < seen.get(key, 0):
            stale += 1
        seen[key] = max(seen.get(key, 0), float(got[0, 0, 0]))
    print(reads, others, stale, store.stats()["corrupt"])
    """
)


def test_processes_sharing_an_ssd_directory_and_the_cluster(cluster, tmp_path):
    # Each process overwrites its own keys with rising values and reads everyone's: it sees
    # the others' puts, and never a value older than one it has seen for that key.
    cluster.wait_ok()
    cluster.flush()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARER, cluster.url, str(tmp_path), str(i), "3", "60"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # processes, not threads, in parallel
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for reads, others, stale, corrupt in results:
        assert int(reads) > 0 and int(others) > 0 and int(stale) == 0 and int(corrupt) == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis-cluster://",
        "redis-cluster://127.0.0.1",
        "redis-cluster://127.0.0.1:0",
        "redis-cluster://127.0.0.1:6379,:6380",
        "redis-cluster://127.0.0.1:99999",
        "redis-cluster://127.0.0.1:6379/1",
    ],
)
def test_cluster_url_errors(url):
    with pytest.raises(ValueError, match="redis_url: expected 'redis-cluster://host1:port1"):
        kvpack.TieredStore(0, redis_url=url, bandwidths=[1e10, 1e8])
