"""Decode attention at Llama-3-8B scale: dense vs memcpy bandwidth, sparse vs dense.

32768 tokens, 8 KV heads, 32 query heads, head_dim 128, float16 (128 MiB of K+V).
Targets (issue: foundation): dense effective bandwidth >= 60% of same-run single-core
memcpy bandwidth on one thread, scaling with threads; sparse attention over 1024
indices >= 15x faster than dense on the same data.
"""

from __future__ import annotations

import numpy as np

import kvpack
from kvpack.eval.data import synthetic_llama_cache

from .common import best_seconds, memcpy_bandwidth


def run(tokens: int = 32768, budget: int = 1024, repeats: int = 9) -> list[tuple[str, str, str]]:
    cache = synthetic_llama_cache(tokens, dtype="float16", seed=0)
    k, v, q = cache.keys, cache.values, cache.query
    kv_bytes = k.nbytes + v.nbytes
    rng = np.random.default_rng(0)
    indices = np.ascontiguousarray(
        np.sort(
            np.stack([rng.choice(tokens, budget, replace=False) for _ in range(k.shape[0])]),
            axis=1,
        ),
        dtype=np.int32,
    )
    memcpy = memcpy_bandwidth(kv_bytes, repeats)

    threads_all = kvpack.get_num_threads()
    timings = {}
    try:
        for threads in sorted({1, threads_all}):
            kvpack.set_num_threads(threads)
            dense = best_seconds(lambda: kvpack.attention(q, k, v), repeats)
            sparse = best_seconds(lambda: kvpack.attention(q, k, v, indices), repeats * 5)
            timings[threads] = (dense, sparse)
    finally:
        kvpack.set_num_threads(threads_all)

    dense_1, sparse_1 = timings[1]
    bandwidth_1 = kv_bytes / dense_1
    rows = [
        ("memcpy bandwidth, 1 core (same run)", f"{memcpy / 1e9:.2f} GB/s", "reference"),
        ("dense attention, 1 thread", f"{dense_1 * 1e3:.2f} ms = {bandwidth_1 / 1e9:.2f} GB/s", ""),
        ("dense bandwidth / memcpy bandwidth, 1 thread", f"{bandwidth_1 / memcpy:.2f}", ">= 0.60"),
        (f"sparse attention over {budget} tokens, 1 thread", f"{sparse_1 * 1e6:.0f} us", ""),
        (f"dense / sparse({budget}) time, 1 thread", f"{dense_1 / sparse_1:.1f}x", ">= 15x"),
    ]
    if threads_all > 1:
        dense_n, sparse_n = timings[threads_all]
        rows += [
            (
                f"dense attention, {threads_all} threads",
                f"{dense_n * 1e3:.2f} ms = {kv_bytes / dense_n / 1e9:.2f} GB/s",
                "",
            ),
            (f"thread scaling 1 -> {threads_all}", f"{dense_1 / dense_n:.2f}x", "scales"),
            (
                f"dense / sparse({budget}) time, {threads_all} threads",
                f"{dense_n / sparse_n:.1f}x",
                ">= 15x",
            ),
        ]
    return rows
