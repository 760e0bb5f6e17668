"""The ``kvpack`` command line: ``kvpack demo`` runs the main job on embedded defaults."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import _core
from .attention import attention
from .data import synthetic_llama_cache

__all__ = ["main"]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def oracle_indices(weights: np.ndarray, heads_kv: int, budget: int) -> np.ndarray:
    """The ``budget`` tokens per KV head with the most attention summed over its query group.

    Parameters
    ----------
    weights : ndarray, shape (heads_q, tokens)
    heads_kv : int
    budget : int

    Returns
    -------
    ndarray of int32, shape (heads_kv, budget), rows sorted ascending.
    """
    heads_q, tokens = weights.shape
    mass = weights.reshape(heads_kv, heads_q // heads_kv, tokens).sum(axis=1)
    top = np.argpartition(-mass, budget - 1, axis=1)[:, :budget]
    return np.ascontiguousarray(np.sort(top, axis=1), dtype=np.int32)


def run_demo(args: argparse.Namespace) -> int:
    """Dense vs sparse decode attention on a Llama-3-8B-shaped synthetic cache."""
    if args.budget > args.tokens:
        print(
            f"kvpack demo: --budget {args.budget} exceeds --tokens {args.tokens}", file=sys.stderr
        )
        return 2
    if args.threads:
        _core.set_num_threads(args.threads)
    print(
        f"kvpack {_core.__version__} | threads {_core.get_num_threads()} | "
        f"CUDA {'available' if _core.cuda_available() else 'not available'}"
    )
    print(
        f"building a synthetic Llama-3-8B-shaped layer: 8 KV heads, 32 query heads, "
        f"d=128, {args.tokens} tokens, float16 ..."
    )
    cache = synthetic_llama_cache(args.tokens, dtype="float16", seed=args.seed)
    k, v, q = cache.keys, cache.values, cache.query

    dense, weights = attention(q, k, v, return_weights=True)
    indices = oracle_indices(weights, k.shape[0], args.budget)
    sparse = attention(q, k, v, indices)
    recent = np.ascontiguousarray(
        np.broadcast_to(
            np.arange(args.tokens - args.budget, args.tokens, dtype=np.int32),
            (k.shape[0], args.budget),
        )
    )
    window = attention(q, k, v, recent)

    # Independent float64 reference for the dense output.
    group = q.shape[0] // k.shape[0]
    k64 = np.repeat(k.astype(np.float64), group, axis=0)
    v64 = np.repeat(v.astype(np.float64), group, axis=0)
    s = np.einsum("hd,htd->ht", q.astype(np.float64), k64) / np.sqrt(k.shape[2])
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    reference = np.einsum("ht,htd->hd", p, v64)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    kept_mass = float(
        np.take_along_axis(weights.reshape(k.shape[0], group, -1), indices[:, None, :], axis=2)
        .sum(axis=2)
        .mean()
    )
    t_dense = _median_seconds(lambda: attention(q, k, v), args.repeats)
    t_sparse = _median_seconds(lambda: attention(q, k, v, indices), args.repeats)
    kv_bytes = k.nbytes + v.nbytes

    rows = [
        ("dense (all tokens)", args.tokens, rel(dense, reference), 1.0, t_dense),
        (
            f"sparse: top-{args.budget} oracle",
            args.budget,
            rel(sparse, reference),
            kept_mass,
            t_sparse,
        ),
        (
            f"sparse: recent {args.budget}",
            args.budget,
            rel(window, reference),
            float(weights[:, -args.budget :].sum(axis=1).mean()),
            float("nan"),
        ),
    ]
    print()
    print(f"{'method':<28}{'tokens':>8}{'rel. error':>12}{'attn mass':>11}{'time':>11}")
    for name, n, err, mass, t in rows:
        t_text = f"{t * 1e3:8.2f} ms" if np.isfinite(t) else "          -"
        print(f"{name:<28}{n:>8}{err:>12.2e}{mass:>11.3f}{t_text}")
    print()
    print(
        f"dense attention reads K+V ({kv_bytes / 2**20:.0f} MiB) at "
        f"{kv_bytes / t_dense / 1e9:.1f} GB/s; sparse over {args.budget} tokens is "
        f"{t_dense / t_sparse:.1f}x faster"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="dense vs sparse attention on a Llama-shaped synthetic cache"
    )
    demo.add_argument("--tokens", type=int, default=32768, help="context length [32768]")
    demo.add_argument("--budget", type=int, default=1024, help="tokens attended sparsely [1024]")
    demo.add_argument("--repeats", type=int, default=10, help="timed repetitions [10]")
    demo.add_argument("--threads", type=int, default=0, help="threads (0: all) [0]")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic cache [0]")
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as error:
        print(f"kvpack {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
