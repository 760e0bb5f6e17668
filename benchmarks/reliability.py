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
    return fuzz() + killed_writers() + concurrent() + hung_redis()
