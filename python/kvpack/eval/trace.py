"""A reuse trace for the tiered store, and its replay: the workload the store's policies
are compared on (``kvpack demo``, ``python -m benchmarks --only store_trace``).

:func:`zipf_trace` draws which context each request asks for and when it arrives;
:func:`replay` serves the requests from a :class:`kvpack.TieredStore`, recomputing a
context it does not hold, and reports delay, quality and where each request was served.
"""

from __future__ import annotations

import math

import numpy as np

from ..store import TieredStore

__all__ = ["replay", "zipf_trace"]


def zipf_trace(
    contexts: int, requests: int, *, exponent: float = 1.0, rate: float = 20.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A reuse trace: which context each request asks for and when it arrives.

    Popularity follows Zipf (rank ``r`` has weight ``r ** -exponent``, ranks shuffled
    over the contexts); arrivals are Poisson at ``rate`` per second.

    Returns
    -------
    requests : ndarray of int64, shape (requests,)
        Context index of each request.
    arrivals : ndarray of float64, shape (requests,)
        Arrival time in seconds.
    """
    if contexts < 1 or requests < 1:
        raise ValueError(f"contexts and requests must be positive, got {contexts}, {requests}")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, contexts + 1) ** exponent
    popularity = popularity[rng.permutation(contexts)]
    chosen = rng.choice(contexts, size=requests, p=popularity / popularity.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=requests))
    return chosen, arrivals


def replay(store: TieredStore, contexts, requests, progress=None, on_hit=None) -> dict:
    """Serve a trace from ``store``: a miss recomputes the context and puts it.

    Parameters
    ----------
    store : kvpack.TieredStore
    contexts : sequence of (kv, probe_queries, recompute_seconds[, quality])
        Each context's cache (a list of (keys, values) per layer), the queries its
        quality is measured on, what recomputing it costs when it is not stored and,
        optionally, its quality per codec name (e.g. the task score of an answer decoded
        from the entry that codec encodes), handed to the store instead of its own
        measure; it must name every codec of ``store.codecs`` and ``"none"`` (what a
        recomputed context scores).
    requests : sequence of int
        Context index per request (see :func:`zipf_trace`).
    progress : callable, optional
        Called with 1 after each request.
    on_hit : callable, optional
        Called as ``on_hit(index, stored)`` with each entry the store returns.

    Returns
    -------
    dict
        ``mean_delay``, ``p95_delay`` (seconds; a miss costs its recomputation, a hit
        its measured read and decode), ``quality`` (mean; a recomputed context scores 1,
        or its ``"none"`` quality), ``repeat_delay`` and ``repeat_quality`` (the same over
        requests for a context seen before: the loads a store can serve, without the first
        requests' prefill that every policy pays alike), ``served`` (requests per tier and
        ``miss``), ``evictions``, ``recompressions``.
    """
    delays, qualities, repeat = [], [], []
    served = {"dram": 0, "ssd": 0, "redis": 0, "miss": 0}
    seen = set()
    for index in requests:
        kv, probes, recompute, *given = contexts[index]
        by_codec = given[0] if given else None
        if by_codec is not None:
            missing = [c for c in {*store.codecs, "none"} if c not in by_codec]
            if missing:
                raise ValueError(
                    f"contexts: context {index}'s quality names no {', '.join(sorted(missing))}"
                )
        key = f"context-{index}"
        try:
            got = store.get(key)
            delay, quality = got.seconds, got.quality
            served[got.tier] += 1
            if on_hit:
                on_hit(index, got)
        except KeyError:
            given = None if by_codec is None else [by_codec[c] for c in store.codecs]
            store.put(key, kv, probe_queries=probes, quality=given)
            delay, quality = recompute, 1.0 if by_codec is None else by_codec["none"]
            served["miss"] += 1
        delays.append(delay)
        qualities.append(quality)
        repeat.append(index in seen)
        seen.add(index)
        if progress:
            progress(1)
    stats = store.stats()
    return {
        "mean_delay": float(np.mean(delays)),
        "p95_delay": float(np.quantile(delays, 0.95)),
        "repeat_delay": float(np.mean(np.compress(repeat, delays))) if any(repeat) else math.nan,
        "repeat_quality": float(np.mean(np.compress(repeat, qualities)))
        if any(repeat)
        else math.nan,
        "quality": float(np.mean(qualities)),
        "served": served,
        "evictions": stats["evictions"],
        "recompressions": stats["recompressions"],
    }
