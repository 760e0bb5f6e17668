"""The remote tier on a real Redis server, started here (redis-server from Debian)."""

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

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="needs redis-server (scripts/setup.sh)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port):
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture
def redis():
    port = free_port()
    proc = start_redis(port)
    yield proc, f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


def context(seed, tokens=200):
    r = np.random.default_rng(seed)
    return [(r.standard_normal((2, tokens, 32)).astype(np.float16),) * 2 for _ in range(2)]


def test_remote_round_trip_and_sharing(redis):
    _, url = redis
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


def test_remote_capacity_and_prefix(redis):
    _, url = redis
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


def test_secret_makes_entries_of_writers_without_it_misses(redis):
    _, url = redis
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


def command(url, *args):
    """One command to the server over a plain socket, binary-safe: the reply's bulk string
    (None for nil) or status line. A test's own hands on the values the store keeps."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    parts = [a if isinstance(a, bytes) else a.encode() for a in args]
    request = f"*{len(parts)}\r\n".encode() + b"".join(
        f"${len(a)}\r\n".encode() + a + b"\r\n" for a in parts
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        reply = b""
        while b"\r\n" not in reply:
            reply += s.recv(1 << 16)
        line, _, rest = reply.partition(b"\r\n")
        if not line.startswith(b"$"):
            return line
        length = int(line[1:])
        if length < 0:
            return None
        while len(rest) < length + 2:
            rest += s.recv(1 << 16)
        return rest[:length]


def versioned(v):
    block = np.full((2, 32, 16), float(v), np.float32)
    return [(block, block)]


def test_an_older_signed_value_put_back_is_not_served(redis):
    _, url = redis
    with kvpack.TieredStore(0, redis_url=url, secret="s", **ARGS) as store:
        store.put("k", versioned(1))
        old = command(url, "GET", "kvpack:k")
        store.put("k", versioned(2))
        command(url, "SET", "kvpack:k", old)  # a replay: signed, this key's, older
        with pytest.raises(KeyError):
            store.get("k")
        assert store.stats()["stale"] == 1
        assert command(url, "GET", "kvpack:k") == old  # left in place: not this store's to drop


def test_a_deleted_entry_put_back_in_redis_does_not_return(redis):
    _, url = redis
    with kvpack.TieredStore(0, redis_url=url, secret="s", **ARGS) as store:
        store.put("k", versioned(1))
        old = command(url, "GET", "kvpack:k")
        assert store.delete("k")
        command(url, "SET", "kvpack:k", old)
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
