"""ClusterKV decode step at 32k context against dense attention over the whole cache.

32768 tokens, budget 1024, 8 KV heads, 32 query heads, head_dim 128, float16. The step
includes appending the token, scoring the centroids, selecting, loading the fast tier's
misses and attending. Target (issue: ClusterKV): >= 10x faster than dense attention.
Quest's step is timed the same way, as the page-level baseline.
"""

from __future__ import annotations

import time

import numpy as np

import kvpack
from kvpack.data import synthetic_llama_cache

from .common import best_seconds


def run(tokens: int = 32768, budget: int = 1024, steps: int = 64) -> list[tuple[str, str, str]]:
    cache = synthetic_llama_cache(tokens + steps, dtype="float16", seed=0)
    keys = np.ascontiguousarray(cache.keys[:, :tokens])
    values = np.ascontiguousarray(cache.values[:, :tokens])
    rng = np.random.default_rng(0)
    queries = cache.query[None] + 0.1 * rng.standard_normal((steps, *cache.query.shape)).astype(
        np.float32
    )

    dense = best_seconds(lambda: kvpack.attention(cache.query, keys, values), 7)
    rows = [(f"dense attention over {tokens} tokens", f"{dense * 1e3:.2f} ms", "reference")]
    for method in ("clusterkv", "quest"):
        recall = kvpack.ClusterKV(budget=budget, method=method)
        start = time.perf_counter()
        recall.prefill(keys, values)
        prefill = time.perf_counter() - start
        times = []
        for s in range(steps):
            t0 = time.perf_counter()
            recall.step(queries[s], cache.keys[:, tokens + s], cache.values[:, tokens + s])
            times.append(time.perf_counter() - t0)
        step = float(np.median(times))
        total = recall.total
        rows += [
            (f"{method} prefill (index build)", f"{prefill * 1e3:.0f} ms", ""),
            (f"{method} decode step, median of {steps}", f"{step * 1e3:.3f} ms", ""),
            (
                f"dense / {method} step",
                f"{dense / step:.1f}x",
                ">= 10x" if method == "clusterkv" else "",
            ),
            (
                f"{method} fast-tier hit rate over {steps} steps",
                f"{total['hit_rate']:.3f}, {total['bytes_loaded'] / steps / 1e6:.2f} MB/step",
                "",
            ),
        ]
    return rows
