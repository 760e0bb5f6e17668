"""ClusterKV decode step at 32k context against dense attention over the whole cache.

32768 tokens, budget 1024, 8 KV heads, 32 query heads, head_dim 128, float16. The step
includes appending the token, scoring the centroids, selecting, and attending the
selection (in place on the host; ``fast_tier=True`` copies the misses into a fast tier).
Target (issue: ClusterKV): >= 10x faster than dense attention. Quest's step is timed
the same way, as the page-level baseline.

Without locality (random keys, a fresh random query every step) a step's selection is
mostly new tokens, read from memory the cache has not seen: its floor is sparse
attention over the same selection with cold caches, timed in the same run. Target
(issue: end to end): >= 15x faster than dense attention.
"""

from __future__ import annotations

import time

import numpy as np

import kvpack
from kvpack.eval.data import synthetic_llama_cache

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
        recall = kvpack.RecallCache(budget=budget, method=method)
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
    rows += _from_codes(keys, values, cache, queries, budget)
    rows += _without_locality(tokens, budget, steps, dense)
    return rows


def _from_codes(keys, values, cache, queries, budget: int) -> list:
    """ClusterKV's step with the prompt held as 4-bit KIVI codes (``slow_bits=4``) against
    the same step over the float16 prompt, plain and refined (``refine=4``): the caches
    step in turn on the same queries, so load changes reach every one alike."""
    tokens, steps = keys.shape[1], len(queries)
    caches = {}
    for refine in (1, 4):
        for bits in (0, 4):
            caches[(refine, bits)] = kvpack.RecallCache(
                budget=budget, method="clusterkv", refine=refine, slow_bits=bits
            )
            caches[(refine, bits)].prefill(keys, values)
    times = {key: [] for key in caches}
    for s in range(steps):
        for key, recall in caches.items():
            t0 = time.perf_counter()
            recall.step(queries[s], cache.keys[:, tokens + s], cache.values[:, tokens + s])
            times[key].append(time.perf_counter() - t0)
    step = {key: float(np.median(t)) for key, t in times.items()}
    rows = []
    for refine in (1, 4):
        coded, exact = step[(refine, 4)], step[(refine, 0)]
        held = caches[(refine, 4)].nbytes
        rows.append(
            (
                f"clusterkv step from 4-bit codes / from float16, refine {refine} "
                f"(median of {steps})",
                f"{coded / exact:.2f} ({coded * 1e3:.3f} vs {exact * 1e3:.3f} ms; codes "
                f"{(held['codes'] + held['slow']) / (keys.nbytes + values.nbytes):.2f}x the "
                "float16 bytes)",
                "<= 1.0",
            )
        )
    return rows


def _without_locality(tokens: int, budget: int, steps: int, dense: float):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((8, tokens + steps, 128), dtype=np.float32).astype(np.float16)
    values = rng.standard_normal(keys.shape, dtype=np.float32).astype(np.float16)
    queries = rng.standard_normal((steps, 32, 128), dtype=np.float32)
    recall = kvpack.RecallCache(budget=budget)
    recall.prefill(np.ascontiguousarray(keys[:, :tokens]), np.ascontiguousarray(values[:, :tokens]))
    flush = np.ones(64 << 20, dtype=np.uint8)  # larger than the last-level cache
    times, cold = [], []
    for s in range(steps):
        flush += 1
        t0 = time.perf_counter()
        recall.step(queries[s], keys[:, tokens + s], values[:, tokens + s])
        times.append(time.perf_counter() - t0)
        selection = recall.last_selection  # token ids, all below tokens + s + 1
        flush += 1
        t0 = time.perf_counter()
        kvpack.attention(queries[s], keys, values, selection)
        cold.append(time.perf_counter() - t0)
    step, floor = float(np.median(times)), float(np.median(cold))
    return [
        (
            "no locality: clusterkv step, median (fresh query, cold caches)",
            f"{step * 1e3:.3f} ms, hit rate {recall.total['hit_rate']:.2f}",
            "",
        ),
        (
            "no locality: sparse attention over the step's selection, cold",
            f"{floor * 1e3:.3f} ms",
            "floor",
        ),
        ("no locality: dense / clusterkv step", f"{dense / step:.1f}x", ">= 15x"),
        ("no locality: dense / cold sparse attention (the limit)", f"{dense / floor:.1f}x", ""),
    ]
