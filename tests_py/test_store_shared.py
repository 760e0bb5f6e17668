"""Several processes on one SSD directory, and blobs put back by someone who can write to it:
versions decide what is current, a blob a store cannot verify is someone else's (a miss,
left in place), and a version older than one the store has seen is never served."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kvpack

MB = 1 << 20
ARGS = dict(policy="lru", bandwidths=[1e10, 1e9])


def version(v, tokens=64):
    """An entry whose every value is `v`: which version a get served shows in any value."""
    block = np.full((2, tokens, 32), float(v), np.float32)
    return [(block, block)]


def served(store, key):
    return float(store.get(key).kv[0][0][0, 0, 0])


PUT = textwrap.dedent(
    """
    import sys, numpy as np, kvpack
    directory, key, value, tokens = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    block = np.full((2, tokens, 32), value, np.float32)
    store = kvpack.TieredStore(0, directory, 1 << 26, policy="lru", bandwidths=[1e10, 1e9])
    store.put(key, [(block, block)])
    store.close()
    """
)


def put_from_another_process(directory, key, value, tokens):
    subprocess.run(
        [sys.executable, "-c", PUT, str(directory), key, str(value), str(tokens)],
        check=True,
        timeout=120,
    )


@pytest.mark.parametrize("tokens", [200, 16, 63], ids=["larger", "smaller", "same-stored-size"])
def test_another_process_overwriting_with_another_size_is_served_not_deleted(tmp_path, tokens):
    with kvpack.TieredStore(0, tmp_path, 64 * MB, **ARGS) as store:
        store.put("k", version(1))  # 64 tokens on record here
        put_from_another_process(tmp_path, "k", 2.0, tokens)
        got = store.get("k")  # the other process's newer version, whole
        assert got.kv[0][0].shape == (2, tokens, 32) and float(got.kv[0][0][0, 0, 0]) == 2.0
        assert store.stats()["corrupt"] == 0 and len(list(tmp_path.glob("*.kvb"))) == 1
        assert served(store, "k") == 2.0
    with kvpack.TieredStore(0, tmp_path, 64 * MB, **ARGS) as store:
        assert served(store, "k") == 2.0


def test_an_entry_another_process_put_after_this_one_opened_is_found(tmp_path):
    with kvpack.TieredStore(0, tmp_path, 64 * MB, **ARGS) as store:
        with pytest.raises(KeyError):
            store.get("k")
        put_from_another_process(tmp_path, "k", 5.0, 32)
        assert served(store, "k") == 5.0 and "k" in store  # its entry now


SLEEPER = "import time; time.sleep(120)"


def test_opening_a_store_leaves_a_live_writers_temporary_file(tmp_path):
    blob = kvpack.store.encode(version(1), "none", key="k")
    with kvpack.TieredStore(0, tmp_path, 64 * MB, **ARGS) as store:
        store.put("k", version(1))
    (final,) = tmp_path.glob("*.kvb")
    writer = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        in_flight = tmp_path / f"{final.name}.{writer.pid}.0.tmp"  # its put, not yet renamed
        in_flight.write_bytes(blob)
        with kvpack.TieredStore(0, tmp_path, 64 * MB, **ARGS) as store:
            assert served(store, "k") == 1.0
        assert in_flight.exists()
    finally:
        writer.kill()
        writer.wait()
    with kvpack.TieredStore(0, tmp_path, 64 * MB, **ARGS):  # the writer is gone: abandoned
        assert not in_flight.exists()


WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np, kvpack
    store = kvpack.TieredStore(0, sys.argv[1], 1 << 28, policy="lru", bandwidths=[1e10, 1e9])
    block = np.ones((2, 256, 64), np.float32)
    failed = done = 0
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            store.put(f"k{done % 8}", [(block, block)])
        except OSError:
            failed += 1
        done += 1
    print(done, failed)
    """
)


def test_puts_in_flight_survive_other_processes_opening_the_store(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "2.0"], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline:
        with kvpack.TieredStore(0, tmp_path, 1 << 28, **ARGS):
            pass
    out, _ = writer.communicate(timeout=60)
    done, failed = map(int, out.split())
    assert done > 0 and failed == 0


def _file_of(directory, key):
    (path,) = [p for p in directory.glob("*.kvb") if p.read_bytes()[64 : 64 + len(key)] == key]
    return path


def test_an_older_signed_blob_put_back_is_not_served(tmp_path):
    with kvpack.TieredStore(0, tmp_path, 64 * MB, secret="s", **ARGS) as store:
        store.put("k", version(1))
        path = _file_of(tmp_path, b"k")
        old = path.read_bytes()
        store.put("k", version(2))
        path.write_bytes(old)  # a replay: signed with the secret, for this key, but older
        with pytest.raises(KeyError):
            store.get("k")
        assert store.stats()["stale"] == 1 and path.read_bytes() == old  # left in place
        store.put("k", version(3))
        assert served(store, "k") == 3.0


def test_a_deleted_entry_put_back_does_not_return(tmp_path):
    with kvpack.TieredStore(0, tmp_path, 64 * MB, secret="s", **ARGS) as store:
        store.put("k", version(1))
        path = _file_of(tmp_path, b"k")
        old = path.read_bytes()
        assert store.delete("k") and not path.exists()
        path.write_bytes(old)
        with pytest.raises(KeyError):
            store.get("k")
        assert "k" not in store and store.stats()["stale"] >= 1


def test_a_store_with_another_secret_leaves_signed_files_in_place(tmp_path):
    with kvpack.TieredStore(0, tmp_path, 64 * MB, secret="right", **ARGS) as store:
        store.put("k", version(1))
    (path,) = tmp_path.glob("*.kvb")
    signed = path.read_bytes()
    for secret in ("wrong", "rotated"):
        with kvpack.TieredStore(0, tmp_path, 64 * MB, secret=secret, **ARGS) as store:
            with pytest.raises(KeyError):
                store.get("k")
            assert store.stats()["unauthenticated"] == 1
        assert path.read_bytes() == signed
    with kvpack.TieredStore(0, tmp_path, 64 * MB, secret="right", **ARGS) as store:
        assert served(store, "k") == 1.0


def test_overwrites_by_several_processes_are_never_served_stale(tmp_path):
    # Each process overwrites its own keys with rising values and reads everyone's: a get
    # never returns a value older than one that process has already seen for that key.
    script = textwrap.dedent(
        """
        import sys, time, numpy as np, kvpack
        me, n, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        store = kvpack.TieredStore(0, sys.argv[1], 1 << 28, policy="lru",
                                   bandwidths=[1e10, 1e9])
        seen, stale, reads, value = {}, 0, 0, 0
        r = np.random.default_rng(me)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value += 1
            own = f"p{me}-{value % 3}"
            tokens = 16 + int(r.integers(0, 64))  # sizes change between versions
            block = np.full((2, tokens, 32), float(value), np.float32)
            store.put(own, [(block, block)])
            seen[own] = value
            key = f"p{int(r.integers(0, n))}-{int(r.integers(0, 3))}"
            try:
                got = store.get(key).kv[0][0]
            except KeyError:
                continue
            reads += 1
            if not (got == got[0, 0, 0]).all() or got[0, 0, 0] < seen.get(key, 0):
                stale += 1
            seen[key] = max(seen.get(key, 0), float(got[0, 0, 0]))
        print(reads, stale, store.stats()["corrupt"])
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(i), "3", "2.0"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # processes, not threads, in parallel
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    results = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for reads, stale, corrupt in results:
        assert int(reads) > 0 and int(stale) == 0 and int(corrupt) == 0
