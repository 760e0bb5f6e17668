"""GPU benchmarks for the issue's targets, all on one card in one run (ratios, not times).

- Cosine k-means, 8 heads x 32768 keys x d=128 (keys in GPU memory), 400 clusters, 20
  iterations. Target: at most 10 ms per layer.
- ClusterKV decode step at 32k tokens, budget 1024, 8 KV / 32 query heads, d=128, float16,
  against torch SDPA over the full cache on the same GPU. Target: at least 5x faster. The
  step here is centroid scoring + selection by kvpack.ClusterIndex (host) and sparse
  attention over the selection on the GPU; the GPU twins of scoring, top-k and gather are
  left for the GPU session, so the row says what it times.
- Dense decode attention over the 32k cache in GPU memory against the card's measured
  device-to-device copy bandwidth. Target: at least 70%.

Needs torch with CUDA and kvpack built with its CUDA backend; ``python -m benchmarks.gpu
--out DIR`` writes DIR/gpu.json, and ``python -m benchmarks --only gpu`` records the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import kvpack
from kvpack.eval.data import synthetic_llama_cache


def _require_gpu():
    try:
        import torch
    except ImportError as error:
        raise SystemExit("the GPU benchmarks need torch with CUDA") from error
    if not torch.cuda.is_available():
        raise SystemExit("the GPU benchmarks need a CUDA device visible to torch")
    if not kvpack.cuda_available():
        raise SystemExit("kvpack was built without its CUDA backend (or sees no GPU)")
    return torch


def _gpu_seconds(torch, fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() on the GPU, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def _to_gpu(torch, array):
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


def measure(tokens: int = 32768, clusters: int = 400, iters: int = 20, budget: int = 1024):
    """Every GPU figure as a dict (the JSON gpu.sh writes)."""
    torch = _require_gpu()
    import torch.nn.functional as F

    cache = synthetic_llama_cache(tokens, dtype="float16", seed=0)
    keys, values, q = _to_gpu(torch, cache.keys), _to_gpu(torch, cache.values), cache.query
    q_gpu = _to_gpu(torch, q)
    heads_kv, _, dim = cache.keys.shape
    heads_q = q.shape[0]
    results = {
        "card": torch.cuda.get_device_name(0),
        "shape": dict(heads_kv=heads_kv, heads_q=heads_q, tokens=tokens, head_dim=dim),
    }

    # k-means: points already on the device; results come back to the host.
    start = time.perf_counter()
    km = kvpack.kmeans(keys, clusters, iters=iters, init="random", seed=0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    km = kvpack.kmeans(keys, clusters, iters=iters, init="random", seed=0)
    results["kmeans"] = dict(
        seconds_per_layer=time.perf_counter() - start,
        first_call_seconds=first,
        rounds=[int(r) for r in km.iterations],
        target_seconds=0.010,
    )

    # Dense decode attention against the device copy bandwidth (read K and V once).
    kv_bytes = 2 * keys.numel() * keys.element_size()
    dense = _gpu_seconds(torch, lambda: kvpack.attention(q_gpu, keys, values))
    src = torch.empty(kv_bytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy = _gpu_seconds(torch, lambda: dst.copy_(src))
    copy_bandwidth = 2 * src.numel() * src.element_size() / copy  # read + write
    results["dense_attention"] = dict(
        seconds=dense,
        bandwidth=kv_bytes / dense,
        copy_bandwidth=copy_bandwidth,
        ratio=(kv_bytes / dense) / copy_bandwidth,
        target_ratio=0.70,
    )

    # ClusterKV decode step against SDPA over the full cache.
    index = kvpack.ClusterIndex(cache.keys, n_clusters=tokens // 80, iters=iters)
    selection = index.select(q, budget)
    selection_gpu = _to_gpu(torch, selection)
    select_s = min(_host_seconds(lambda: index.select(q, budget)) for _ in range(3))
    sparse_s = _gpu_seconds(torch, lambda: kvpack.attention(q_gpu, keys, values, selection_gpu))
    # SDPA reads each KV head once for its query group (enable_gqa), as kvpack does.
    q_sdpa = q_gpu.half().view(1, heads_q, 1, dim)
    k_sdpa, v_sdpa = keys.unsqueeze(0), values.unsqueeze(0)
    sdpa_s = _gpu_seconds(
        torch, lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, enable_gqa=True)
    )
    step = select_s + sparse_s
    results["clusterkv_step"] = dict(
        budget=budget,
        selected=int(selection.shape[1]),
        select_seconds_host=select_s,
        sparse_attention_seconds=sparse_s,
        step_seconds=step,
        sdpa_full_seconds=sdpa_s,
        speedup=sdpa_s / step,
        speedup_attention_only=sdpa_s / sparse_s,
        target_speedup=5.0,
        note="selection on the host (ClusterIndex.select); its CUDA twin is not built yet",
    )
    return results


def _host_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> list[tuple[str, str, str]]:
    """Rows for ``python -m benchmarks --only gpu``."""
    r = measure()
    km, dense, step = r["kmeans"], r["dense_attention"], r["clusterkv_step"]
    return [
        ("card", r["card"], ""),
        (
            "k-means per layer (8x32768x128, 400 clusters)",
            f"{km['seconds_per_layer'] * 1e3:.1f} ms",
            "<= 10 ms",
        ),
        (
            "dense decode attention / copy bandwidth",
            f"{dense['ratio']:.2f} ({dense['bandwidth'] / 1e9:.0f} of "
            f"{dense['copy_bandwidth'] / 1e9:.0f} GB/s)",
            ">= 0.70",
        ),
        (
            "ClusterKV step vs SDPA over the full cache",
            f"{step['speedup']:.1f}x (attention alone {step['speedup_attention_only']:.1f}x)",
            ">= 5x",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure()
    path = args.out / "gpu.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
