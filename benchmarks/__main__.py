"""Runs the performance suite, records each suite's run and renders benchmarks/RESULTS.md.

Usage: ``python -m benchmarks [--only NAME ...] [--no-record]`` or
``python -m benchmarks --report`` (render RESULTS.md from the saved runs alone).
"""

from __future__ import annotations

import argparse
import sys

from . import (
    ablation,
    attention,
    clusterkv,
    compress,
    demo,
    e2e,
    gpu,
    kmeans,
    long_context,
    real_lm,
    reliability,
    report,
    store,
    tiny_lm,
    wheel,
)

SUITES = {
    "attention": ("Decode attention (32k tokens, 8/32 heads, d=128, float16)", attention.run),
    "clusterkv": (
        "ClusterKV decode step (32k tokens, budget 1024, 8/32 heads, d=128, float16)",
        clusterkv.run,
    ),
    "compress": (
        "KVMerger compression speed (32k tokens x 8 heads x d=128, float16, evidence given)",
        compress.run_speed,
    ),
    "merging_quality": (
        "Compression quality on real MiniLM keys (attention-output relative error)",
        compress.run_quality,
    ),
    "store": ("Tiered store read speed (64 MiB entry, float16)", store.run_speed),
    "store_trace": (
        "Tiered store: Zipf trace of real MiniLM caches, adaptive vs LRU baselines",
        store.run_trace,
    ),
    "tiny_lm": (
        "Pass-key retrieval on the shipped tiny LM at 1/16 of the context",
        tiny_lm.run,
    ),
    "tiny_lm_merging": (
        "KVMerger against H2O and CaM on the tiny LM: perplexity and pass-key at 50% / 35%",
        tiny_lm.run_merging,
    ),
    "tiny_lm_hit_rate": (
        "ClusterKV cluster-cache hit rate on the tiny LM (256 decode steps, R = 1)",
        tiny_lm.run_hit_rate,
    ),
    "key_similarity": (
        "Adjacent-key similarity of real models (KVMerger's premise)",
        tiny_lm.run_key_similarity,
    ),
    "demo": ("kvpack demo on its defaults (the main job)", demo.run),
    "e2e": (
        "generate() on SmolLM2-135M (float32): every cache against transformers' SDPA",
        e2e.run,
    ),
    "decode_memory": (
        "Eviction caches over 4096 decoded tokens on SmolLM2-135M: KV memory with and "
        "without decode_budget",
        e2e.run_decode_memory,
    ),
    "long_context": (
        "Gemma 3 270M (hybrid: sliding-window and global layers) at 8k, 16k and 32k tokens: "
        "every cache against transformers' own with SDPA",
        long_context.run,
    ),
    "real_lm": (
        "Every method on SmolLM2-135M-Instruct (float32): RULER-style tasks, merging "
        "perplexity, AdaptCache on real caches",
        real_lm.run,
    ),
    "real_lm_4k": (
        "ClusterKV against Quest at 1/16 and 1/8 of 4096 tokens on SmolLM2-135M-Instruct, "
        "each also with refined recall, beside the eviction methods",
        real_lm.run_long,
    ),
    "ablation_4k": (
        "Levers beyond the papers at 1/16 and 1/8 of 4096 tokens on SmolLM2-135M-Instruct: "
        "refined recall, a 4-bit slow tier, head and layer budgets",
        ablation.run,
    ),
    "ablation_4k_heads": (
        "Adaptive head budgets for refined recall at 1/16 of 4096 tokens on SmolLM2-135M-Instruct",
        ablation.run_heads,
    ),
    "reliability": (
        "Reliability: fuzzed decoder, killed writers, 16 threads of store traffic, a hung Redis",
        reliability.run,
    ),
    "reliability_cluster": (
        "Reliability of the remote tier on a Redis Cluster: a killed master, reshards, "
        "processes sharing one SSD directory and the cluster",
        reliability.run_cluster,
    ),
    "store_cluster": (
        "The remote tier's gets: a Redis Cluster (3 masters + 3 replicas) against one server",
        store.run_cluster,
    ),
    "kmeans": (
        "Cosine k-means (8 heads x 32768 keys x d=128, 400 clusters, 20 iterations)",
        kmeans.run,
    ),
    "wheel": (
        "The wheel against the source build: attention and ClusterKV speed (same machine)",
        wheel.run,
    ),
    "gpu": (
        "GPU: k-means, ClusterKV step vs SDPA, dense attention vs copy bandwidth (one card)",
        gpu.run,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="suites to run [all]")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument(
        "--report", action="store_true", help="run nothing; render RESULTS.md from saved runs"
    )
    args = parser.parse_args(argv)
    if args.report:
        report.render(list(SUITES), results=report.RESULTS, readme=report.README)
        print(f"wrote {report.RESULTS} and the claims table of {report.README}")
        return 0
    command = "python -m benchmarks" + (f" --only {' '.join(args.only)}" if args.only else "")
    for name in args.only or SUITES:
        title, run = SUITES[name]
        rows = run()
        print(f"## {title}")
        for metric, value, target in rows:
            print(f"{metric:<52} {value:>28}  {target}")
        if not args.no_record:
            print(f"recorded {report.record(name, title, command, rows)}")
            report.render(list(SUITES), results=report.RESULTS, readme=report.README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
