"""Reliability of the store and the blob decoder under hostile input, faults and load.

- The decoder fuzzer (tests_cpp/fuzz_decode.cpp, the sanitizer build's binary when there
  is one) over 1,000,000 mutated blobs, most of them re-checksummed: crashes, hangs and
  mutated blobs accepted under their old checksum.
- 100 writers killed with SIGKILL while they overwrite keys on an SSD tier: acknowledged
  versions lost and wrong data served after reopening.
- 16 threads for 60 s of put / get / prefetch / delete with overwrites: stale or wrong reads.
- A hung Redis server (SIGSTOP): each call against its timeout, then the back-off's calls;
  an overwriting put against its timeout, and whether it raised and kept the old entry.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

import kvpack

ROOT = Path(__file__).resolve().parent.parent
FUZZERS = [
    ROOT / "build" / name / "tests_cpp" / "kvpack_fuzz_decode" for name in ("sanitize", "tests")
]


def fuzz(inputs: int = 1_000_000, seed: int = 20261128) -> list[tuple[str, str, str]]:
    binary = next((path for path in FUZZERS if path.exists()), None)
    if binary is None:
        raise SystemExit(
            "reliability: build the decoder fuzzer first: cmake -S . -B build/sanitize -G Ninja "
            "-DKVPACK_SANITIZE=ON -DKVPACK_CUDA=OFF && cmake --build build/sanitize "
            "--target kvpack_fuzz_decode"
        )
    corpus = ROOT / "tests_cpp" / "fuzz_corpus"
    start = time.monotonic()
    try:
        run = subprocess.run(
            [str(binary), str(corpus), str(inputs), str(seed)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        hung, failed, output = 0, run.returncode != 0, run.stdout + run.stderr
    except subprocess.TimeoutExpired:
        hung, failed, output = 1, True, ""
    seconds = time.monotonic() - start
    accepted = int("passed its old checksum" in output)
    crashed = int(failed and not hung and not accepted)
    found = re.search(r"(\d+) passed the checksum, (\d+) decoded, (\d+) refused", output)
    detail = (
        f"{found.group(1)} re-checksummed and passed, {found.group(2)} decoded, "
        f"{found.group(3)} refused"
        if found
        else output.strip()[-200:]
    )
    sanitized = "ASan + UBSan" if binary == FUZZERS[0] else "no sanitizer"
    return [
        (
            f"{inputs:,} fuzzed blobs ({sanitized}): crashes + hangs + corrupt accepted",
            f"{crashed + hung + accepted} ({crashed} + {hung} + {accepted} in {seconds:.0f} s; "
            f"{detail})",
            "<= 0",
        )
    ]


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, kvpack
    store = kvpack.TieredStore(0, sys.argv[1], 1 << 30, policy="lru", bandwidths=[1e10, 1e9])
    version = int(sys.argv[2])
    while True:
        version += 1
        key = f"k{version % 8}"
        keys = np.full((2, 256, 64), float(version), np.float32)
        store.put(key, [(keys, keys + 0.5)])
        print(key, version, flush=True)
    """
)


def killed_writers(runs: int = 100, seed: int = 7) -> list[tuple[str, str, str]]:
    """Writers overwrite k0..k7 with ever newer versions and are killed at random; after
    each kill the store reopens and every key must hold its last acknowledged version or
    the one in flight, whole."""
    chooser = random.Random(seed)
    lost = wrong = checked = 0
    directory = Path(tempfile.mkdtemp(prefix="kvpack-kill-"))
    acknowledged: dict[str, int] = {}
    try:
        for _ in range(runs):
            start = max(acknowledged.values(), default=0)
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(directory), str(start)],
                stdout=subprocess.PIPE,
                text=True,
            )
            wanted = chooser.randint(1, 24)
            for count, line in enumerate(writer.stdout, 1):
                key, version = line.split()
                acknowledged[key] = int(version)
                if count == wanted:
                    time.sleep(chooser.random() * 0.01)  # somewhere inside a later put
                    break
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            writer.stdout.close()
            with kvpack.TieredStore(
                0, directory, 1 << 30, policy="lru", bandwidths=[1e10, 1e9]
            ) as store:
                for key, version in acknowledged.items():
                    checked += 1
                    try:
                        got = store.get(key)
                    except KeyError:
                        lost += 1
                        continue
                    keys, values = got.kv[0]
                    served = float(keys[0, 0, 0])
                    # the acknowledged version, or a later one written before the kill
                    whole = np.all(keys == served) and np.all(values == served + 0.5)
                    if not whole or served < version or int(served) % 8 != int(key[1:]):
                        wrong += 1
                    acknowledged[key] = int(served)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return [
        (
            f"kill -9 of an overwriting writer, {runs} runs: acknowledged versions lost",
            f"{lost} of {checked} checked",
            "<= 0",
        ),
        (
            f"kill -9 of an overwriting writer, {runs} runs: wrong data served",
            f"{wrong} of {checked} checked",
            "<= 0",
        ),
    ]


def concurrent(threads: int = 16, seconds: float = 60.0) -> list[tuple[str, str, str]]:
    """Each thread owns two keys it puts (ever newer versions) and deletes; every thread
    gets and prefetches every key. A get must return a whole version no older than the
    newest its owner had acknowledged when the get began, and nothing after a delete the
    owner had acknowledged, unless a put followed."""
    directory = Path(tempfile.mkdtemp(prefix="kvpack-threads-"))
    keys = [f"k{i}" for i in range(2 * threads)]
    state = {key: (0, True) for key in keys}  # (acknowledged version, deleted)
    counts = {"puts": 0, "gets": 0, "hits": 0, "prefetches": 0, "deletes": 0}
    problems = {"stale": 0, "wrong": 0, "errors": 0}
    stop = threading.Event()

    def content(key: str, version: int):
        block = np.full((2, 128, 32), float(version), np.float32)
        return [(block, block + int(key[1:]))]

    store = kvpack.TieredStore(
        1 << 20, directory, 64 << 20, policy="lru", bandwidths=[1e10, 1e9], io_threads=4
    )

    def worker(index: int) -> None:
        chooser = random.Random(index)
        own = keys[2 * index : 2 * index + 2]
        version = 0
        try:
            while not stop.is_set():
                action = chooser.random()
                if action < 0.3:
                    key = chooser.choice(own)
                    version += 1
                    store.put(key, content(key, version))
                    state[key] = (version, False)
                    counts["puts"] += 1
                elif action < 0.35:
                    key = chooser.choice(own)
                    store.delete(key)
                    state[key] = (state[key][0], True)
                    counts["deletes"] += 1
                elif action < 0.5:
                    store.prefetch(chooser.choice(keys))
                    counts["prefetches"] += 1
                else:
                    key = chooser.choice(keys)
                    newest, deleted = state[key]
                    counts["gets"] += 1
                    try:
                        got = store.get(key)
                    except KeyError:
                        continue
                    counts["hits"] += 1
                    block, values = got.kv[0]
                    served = float(block[0, 0, 0])
                    if not (np.all(block == served) and np.all(values == served + int(key[1:]))):
                        problems["wrong"] += 1
                    elif served < newest or (deleted and served <= newest):
                        problems["stale"] += 1
        except Exception:
            problems["errors"] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    corrupt = store.stats()["corrupt"]
    store.close()
    shutil.rmtree(directory, ignore_errors=True)
    done = ", ".join(f"{n:,} {name}" for name, n in counts.items())
    return [
        (
            f"{threads} threads x {seconds:.0f} s put/get/prefetch/delete: stale or wrong reads",
            f"{problems['stale'] + problems['wrong']} ({problems['stale']} stale, "
            f"{problems['wrong']} wrong; {done}; {problems['errors']} exceptions, "
            f"{corrupt} corrupt)",
            "<= 0",
        )
    ]


def hung_redis(timeout: float = 0.5, calls: int = 10) -> list[tuple[str, str, str]]:
    """A real redis-server stopped with SIGSTOP: the first calls each wait one timeout,
    then (after 3 failures) calls return at once until the back-off expires."""
    server = shutil.which("redis-server")
    if server is None:
        return [("hung Redis", "redis-server not installed", "")]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        store = kvpack.TieredStore(
            0,
            redis_url=f"redis://127.0.0.1:{port}/0",
            policy="lru",
            bandwidths=[1e10, 1e8],
            timeout=timeout,
        )
        writer = kvpack.TieredStore(
            0,
            redis_url=f"redis://127.0.0.1:{port}/0",
            policy="lru",
            bandwidths=[1e10, 1e8],
            timeout=timeout,
        )
        block = np.ones((2, 64, 32), np.float32)
        for i in range(calls):
            store.put(f"k{i}", [(block, block)])
        writer.put("w", [(block, block)])
        os.kill(proc.pid, signal.SIGSTOP)
        # An overwrite while the server is stopped: one bound for the whole put, an error
        # raised, the entry it would replace kept.
        start = time.perf_counter()
        try:
            writer.put("w", [(block + 1, block + 1)])
            put_raised = False
        except OSError:
            put_raised = True
        put_seconds = time.perf_counter() - start
        put_kept = writer.where("w") is not None
        writer.close()
        seconds = []
        for i in range(calls):
            start = time.perf_counter()
            try:
                store.get(f"k{i}")
            except KeyError:
                pass
            seconds.append(time.perf_counter() - start)
        os.kill(proc.pid, signal.SIGCONT)
        store.close()
    finally:
        proc.kill()
        proc.wait()
    waited, fast = seconds[:3], seconds[3:]
    return [
        (
            f"hung Redis: an overwriting put / timeout ({timeout} s)",
            f"{put_seconds / timeout:.3f} ({put_seconds:.3f} s; "
            f"{'raised OSError' if put_raised else 'returned normally'}, "
            f"old entry {'kept' if put_kept else 'dropped'})",
            "<= 1.10, raised, kept",
        ),
        (
            f"hung Redis: the first 3 gets / timeout ({timeout} s)",
            f"{max(waited) / timeout:.3f} (each {', '.join(f'{s:.3f}' for s in waited)} s)",
            "<= 1.10",
        ),
        (
            f"hung Redis: the next {len(fast)} gets, during the back-off",
            f"{max(fast) * 1e3:.3f} ms at most",
            "< 1 ms",
        ),
    ]


def run() -> list[tuple[str, str, str]]:
    return fuzz() + killed_writers() + concurrent() + hung_redis() + run_cluster()


# ---- the remote tier on a Redis Cluster ------------------------------------------------

CLUSTER_WORKER = textwrap.dedent(
    """
    import json, os, sys, time, numpy as np, kvpack
    url, directory, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    me, n, seconds = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    K = 8  # keys per process
    size = 2 * 64 * 32 * 4 * 2 + 4096
    if directory:  # one entry in (private) DRAM, four on the shared SSD, the rest remote
        store = kvpack.TieredStore(size, directory, 4 * size, redis_url=url, policy="lru",
                                   bandwidths=[1e10, 1e9, 1e8], timeout=0.5)
    else:
        store = kvpack.TieredStore(0, redis_url=url, policy="lru", bandwidths=[1e10, 1e8],
                                   timeout=0.5)
    counts = dict(calls=0, puts=0, put_failures=0, gets=0, misses=0, missed_acknowledged=0,
                  others=0, wrong=0, stale=0)
    seen, value = {}, 0
    r = np.random.default_rng(me)
    print("ready", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop and os.path.exists(stop)):
        value += 1
        index = value % K
        own = f"p{me}-{index}"
        keys = np.full((2, 64, 32), float(value), np.float32)
        counts["calls"] += 2
        try:
            store.put(own, [(keys, keys + 1000 * (me * K + index))])
            counts["puts"] += 1
            seen[own] = value
        except OSError:
            counts["put_failures"] += 1
        owner, index = int(r.integers(0, n)), int(r.integers(0, K))
        key = f"p{owner}-{index}"
        counts["gets"] += 1
        try:
            got_keys, got_values = store.get(key).kv[0]
        except KeyError:
            counts["misses"] += 1
            counts["missed_acknowledged"] += key in seen
            continue
        v = float(got_keys[0, 0, 0])
        counts["others"] += owner != me
        if not (got_keys == v).all() or not (got_values == v + 1000 * (owner * K + index)).all():
            counts["wrong"] += 1
        elif v < seen.get(key, 0):
            counts["stale"] += 1
        seen[key] = max(seen.get(key, 0), v)
    counts["store_stale"] = store.stats()["stale"]
    print(json.dumps(counts), flush=True)
    """
)


def _redis_servers():
    """tests_py/redis_servers.py: the cluster the tests start, started the same way here."""
    sys.path.insert(0, str(ROOT / "tests_py"))
    import redis_servers

    return redis_servers


def _workers(url: str, directory: str, processes: int, seconds: float, stop: str = ""):
    """Starts the trace's processes (on the cluster at `url`, sharing the SSD `directory`
    when given), waits until each has its store open, and starts them together; they end
    after `seconds` or once the file `stop` exists."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLUSTER_WORKER,
                url,
                directory,
                stop,
                str(i),
                str(processes),
                str(seconds),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def _counts(procs) -> dict:
    import json

    total: dict = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        for name, count in json.loads(out.strip().splitlines()[-1]).items():
            total[name] = total.get(name, 0) + count
    return total


def _trace_rows(name: str, counts: dict, seconds: float) -> list[tuple[str, str, str]]:
    return [
        (
            f"{name}: calls (puts + gets) in {seconds:.0f} s",
            f"{counts['calls']} ({counts['puts']} puts, {counts['put_failures']} failed; "
            f"{counts['gets']} gets, {counts['misses']} misses, "
            f"{counts['missed_acknowledged']} of entries seen)",
            "",
        ),
        (
            f"{name}: wrong + stale reads",
            f"{counts['wrong'] + counts['stale']} ({counts['wrong']} + {counts['stale']}; "
            f"{counts['others']} reads of other processes' entries, {counts['store_stale']} "
            "older versions refused by the stores)",
            "<= 0",
        ),
    ]


def cluster_kill_master(
    processes: int = 3, seconds: float = 20.0, node_timeout: int = 2000, timeout: float = 0.5
) -> list[tuple[str, str, str]]:
    """Processes put and get on a six-node cluster while one master is killed (kill -9):
    wrong or stale reads, and the time until its slots are served again (a put and get of a
    key in them, by a store opened before the kill) against 2x the node timeout plus one
    call timeout; the cluster's own failover time beside it."""
    servers = _redis_servers()
    if servers.REDIS is None:
        return [("cluster: kill a master", "redis-server not installed", "")]
    with tempfile.TemporaryDirectory() as directory:
        cluster = servers.Cluster(Path(directory), node_timeout=node_timeout)
        try:
            killed, _, ranges = cluster.masters()[0]
            probe_key = next(
                f"probe{i}"
                for i in range(100_000)
                if any(
                    a <= kvpack._core.cluster_slot(f"kvpack:probe{i}".encode()) <= b
                    for a, b in ranges
                )
            )
            probe = kvpack.TieredStore(
                0, redis_url=cluster.url, policy="lru", bandwidths=[1e10, 1e8], timeout=timeout
            )
            block = np.ones((2, 16, 16), np.float32)
            procs = _workers(cluster.url, "", processes, seconds)
            time.sleep(seconds / 4)
            os.kill(cluster.procs[killed].pid, signal.SIGKILL)
            killed_at = time.monotonic()
            recovered = failed_over = None
            while time.monotonic() - killed_at < 60 and (recovered is None or failed_over is None):
                if failed_over is None:
                    try:
                        if all(port != killed for port, _, _ in cluster.masters()) and any(
                            r == ranges for _, _, r in cluster.masters()
                        ):
                            failed_over = time.monotonic() - killed_at
                    except (OSError, ConnectionError):
                        pass
                if recovered is None:
                    try:
                        probe.put(probe_key, [(block, block)])
                        probe.get(probe_key)
                        recovered = time.monotonic() - killed_at
                    except (OSError, KeyError):
                        pass
                time.sleep(0.02)
            counts = _counts(procs)
            probe.close()
        finally:
            cluster.stop()
    bound = 2 * node_timeout / 1000 + timeout
    return [
        *_trace_rows(f"cluster, master killed ({processes} processes)", counts, seconds),
        (
            "cluster, master killed: its slots served again after",
            f"{recovered:.2f} s (cluster failover {failed_over:.2f} s; node timeout "
            f"{node_timeout / 1000:.1f} s, call timeout {timeout} s)"
            if recovered is not None and failed_over is not None
            else f"not within 60 s ({recovered}, {failed_over})",
            f"<= {bound:.1f} s",
        ),
    ]


def _settled(servers, port: int, seconds: float = 60.0) -> None:
    """Waits until redis-cli --cluster check finds every node agreeing, no slot open."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check = subprocess.run(
            [servers.REDIS_CLI, "--cluster", "check", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode == 0 and "[ERR]" not in check.stdout:
            return
        time.sleep(0.2)
    raise RuntimeError("the cluster did not settle")


def cluster_reshard(
    processes: int = 3, slots: int = 4096, rounds: int = 2
) -> list[tuple[str, str, str]]:
    """Processes put and get while `slots` hash slots move between two masters and back
    (redis-cli --cluster reshard, `rounds` times): failed calls, entries lost, wrong or
    stale reads."""
    servers = _redis_servers()
    if servers.REDIS is None:
        return [("cluster: reshard", "redis-server not installed", "")]
    with tempfile.TemporaryDirectory() as directory:
        cluster = servers.Cluster(Path(directory), node_timeout=5000)
        try:
            (a, a_id, _), (_, b_id, _) = cluster.masters()[:2]
            stop = Path(directory) / "stop"
            procs = _workers(cluster.url, "", processes, 600.0, str(stop))
            start = time.monotonic()
            for step in range(2 * rounds):
                source, target = (a_id, b_id) if step % 2 == 0 else (b_id, a_id)
                # Every node agrees on the last move before the next one starts.
                cluster.wait_ok()
                _settled(servers, a)
                done = subprocess.run(
                    [
                        servers.REDIS_CLI,
                        "--cluster",
                        "reshard",
                        f"127.0.0.1:{a}",
                        "--cluster-from",
                        source,
                        "--cluster-to",
                        target,
                        "--cluster-slots",
                        str(slots),
                        "--cluster-yes",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"reshard failed: {done.stdout[-2000:]}")
            took = time.monotonic() - start
            stop.touch()  # the reshards are done: so is the trace
            counts = _counts(procs)
        finally:
            cluster.stop()
    return [
        *_trace_rows(
            f"cluster, {2 * rounds} reshards of {slots} slots ({processes} processes)", counts, took
        ),
        (
            "cluster, reshards: failed calls + acknowledged entries missed",
            f"{counts['put_failures'] + counts['missed_acknowledged']}",
            "<= 0",
        ),
    ]


def cluster_processes(processes: int = 4, seconds: float = 20.0) -> list[tuple[str, str, str]]:
    """Processes sharing one SSD directory and one cluster (each with its own DRAM tier)
    put and get each other's entries: reads of others' puts, wrong or stale reads."""
    servers = _redis_servers()
    if servers.REDIS is None:
        return [("cluster: processes", "redis-server not installed", "")]
    with tempfile.TemporaryDirectory() as directory:
        cluster = servers.Cluster(Path(directory) / "cluster", node_timeout=5000)
        try:
            (Path(directory) / "ssd").mkdir()
            procs = _workers(cluster.url, str(Path(directory) / "ssd"), processes, seconds)
            counts = _counts(procs)
        finally:
            cluster.stop()
    return _trace_rows(f"{processes} processes, one SSD directory + cluster", counts, seconds)


def run_cluster() -> list[tuple[str, str, str]]:
    return cluster_kill_master() + cluster_reshard() + cluster_processes()
