"""``kvpack demo``: every method on a language model (the shipped tiny LM, or
SmolLM2-135M with ``--model smollm2-135m``), the store policies on a trace, and the
decode speed at 32k tokens, in one run on embedded defaults.

Sections (each a table; figures written to ``--out``, a temporary directory by default):

1. Retrieval with a budget of 1/16 of the context: pass-key prompts on the tiny LM, the
   RULER-style tasks (:mod:`kvpack.eval.ruler`, average score) on SmolLM2.
2. Held-out perplexity with the prompt compressed to 50% and 35%, over every scored token
   and over the tokens that need the distant prompt (most do not).

Every method scores each prompt from one shared exact prefill (:func:`kvpack.hf.prefill`).
3. AdaptCache: the adaptive policy and the LRU baselines on a Zipf trace of the LM's
   prompt caches (DRAM and SSD tiers in the output directory).
4. Decode speed: a ClusterKV step against dense attention on a Llama-3-8B-shaped
   synthetic layer of 32k tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import methods
from .._extras import require
from ..compression import budget_tokens

# Every method kvpack compares, in the registry's order.
METHODS = methods.names()
SMOLLM2_CONTEXT = 8192  # SmolLM2-135M's trained context
POLICIES = (
    ("lru", "lru", 0.0),
    ("kivi2-lru", "kivi2-lru", 0.0),
    ("streaming-lru", "streaming-lru", 0.0),
    ("adaptive a=0.001", "adaptive", 0.001),
    ("adaptive a=0.01", "adaptive", 0.01),
    ("adaptive a=0.1", "adaptive", 0.1),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="directory for figures and the store [a new temporary one]")
    parser.add_argument(
        "--model",
        choices=("tiny", "smollm2-135m"),
        default="tiny",
        help="model of sections 1 and 2 [tiny]; the store trace always uses the tiny LM",
    )
    parser.add_argument("--context", type=int, default=2048, help="tokens per prompt [2048]")
    parser.add_argument(
        "--budget", type=float, default=0.0625, help="pass-key budget, share of the context [1/16]"
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=10,
        help="pass-key prompts, or prompts per RULER task on SmolLM2 [10]",
    )
    parser.add_argument("--windows", type=int, default=3, help="perplexity windows [3]")
    parser.add_argument(
        "--long-windows",
        type=int,
        default=16,
        help="windows searched for bytes that need the distant prompt [16]",
    )
    parser.add_argument("--contexts", type=int, default=24, help="store trace contexts [24]")
    parser.add_argument("--requests", type=int, default=150, help="store trace requests [150]")
    parser.add_argument(
        "--speed-tokens",
        type=int,
        default=32768,
        help="synthetic context of the speed section [32768]",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> int:
    """Refuses bad arguments before anything is loaded or written; returns the tiny LM's
    trained context."""
    from ..models import TINY_LM_DIR

    trained = json.loads((TINY_LM_DIR / "config.json").read_text())["max_position_embeddings"]
    if args.model != "tiny":
        trained = SMOLLM2_CONTEXT
    if args.context > trained:
        raise ValueError(f"--context: {args.context} exceeds the trained context of {trained}")
    if not 0.0 < args.budget < 1.0:
        raise ValueError(f"--budget: expected a share in (0, 1), got {args.budget}")
    flags = ("context", "prompts", "windows", "long_windows", "contexts", "requests")
    for flag in (*flags, "speed_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected at least 1")
    if args.context < 256:
        raise ValueError(f"--context: expected at least 256 tokens, got {args.context}")
    require("kvpack demo", "torch", "transformers", "safetensors", "matplotlib")
    if args.model != "tiny":
        require(f"kvpack demo --model {args.model}", "gguf", "accelerate")
    return trained


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    trained = _check(args)
    from tqdm.auto import tqdm

    from ..models import load_pretrained, load_tiny_lm
    from . import scoring

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kvpack-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    tiny = load_tiny_lm()
    model, tokenizer = (tiny, None) if args.model == "tiny" else load_pretrained(args.model)
    shares = (0.5, 0.35)
    # Retrieval: pass-key prompts are bytes; a subword model answers RULER's prompts.
    retrieval = "passkey" if tokenizer is None else "ruler"
    per_method = scoring.TASKS[retrieval].steps(args.prompts) + len(shares) * (
        args.windows + args.long_windows
    )
    steps = args.long_windows + len(METHODS) * per_method + args.requests * len(POLICIES)
    bar = tqdm(total=steps, disable=args.quiet, desc="kvpack demo", unit="step")

    bar.set_postfix_str("tokens that need the distant prompt")
    key_tokens = scoring.context_dependent_tokens(
        model,
        context=args.context,
        windows=args.long_windows,
        tokenizer=tokenizer,
        progress=bar.update,
    )
    selected = sum(int(mask.sum()) for mask in key_tokens)
    # Every method (and share) in one call per measure: each prompt is prefilled once.
    setting = dict(context=args.context, tokenizer=tokenizer, progress=bar.update)
    bar.set_postfix_str("retrieval, every method")
    runs = [(method, args.budget) for method in METHODS]
    found = scoring.score_task(retrieval, model, runs, count=args.prompts, **setting)
    passkey = dict(zip(METHODS, map(scoring.headline, found)))
    runs = [(method, share) for method in METHODS for share in shares]
    bar.set_postfix_str("perplexity, every method")
    ppl = dict(
        zip(runs, scoring.score_task("perplexity", model, runs, count=args.windows, **setting))
    )
    long_ppl = dict.fromkeys(runs, math.nan)  # printed when no token needs the prompt
    if selected:
        long_values = scoring.score_task(
            "long-perplexity", model, runs, count=args.long_windows, scored=key_tokens, **setting
        )
        long_ppl = dict(zip(runs, long_values))
    else:
        bar.update(args.long_windows * len(runs))

    bar.set_postfix_str("store trace")
    runs = _store_trace(tiny, args, out, bar.update)
    bar.close()
    speed = _speed(args.speed_tokens)

    budget_slots = budget_tokens(args.budget, args.context)
    unit = "bytes" if tokenizer is None else "tokens"
    if tokenizer is None:
        print(
            f"\nkvpack demo: tiny LM ({trained}-token context), {args.prompts} pass-key "
            f"prompts, {args.windows} perplexity windows of {args.context} bytes"
        )
    else:
        print(
            f"\nkvpack demo: {args.model}, {len(_ruler_tasks())} RULER-style tasks x "
            f"{args.prompts} prompts of {args.context} tokens (average score), "
            f"{args.windows} perplexity windows of {args.context} tokens"
        )
    print(
        f"(ctx: perplexity of the {selected} {unit} in {args.long_windows} windows that the "
        "distant prompt predicts)"
    )
    column = "pass-key" if tokenizer is None else "RULER"
    print(
        f"{'method':<15}{f'{column} @{budget_slots}':>16}"
        + "".join(f"{f'ppl @{s:.0%}':>12}" for s in shares)
        + "".join(f"{f'ctx @{s:.0%}':>12}" for s in shares)
    )
    for method in METHODS:
        print(
            f"{method:<15}{passkey[method]:>16.0%}"
            + "".join(f"{ppl[method, s]:>12.3f}" for s in shares)
            + "".join(f"{long_ppl[method, s]:>12.3f}" for s in shares)
        )
    print(f"\nAdaptCache on a Zipf trace: {args.contexts} contexts, {args.requests} requests")
    print("(load: requests for a context stored before; mean: every request, prefill included)")
    print(f"{'policy':<19}{'load ms':>9}{'quality':>9}{'mean ms':>9}  served")
    for name, r in runs.items():
        print(
            f"{name:<19}{r['repeat_delay'] * 1e3:>9.2f}{r['repeat_quality']:>9.4f}"
            f"{r['mean_delay'] * 1e3:>9.2f}  {r['served']}"
        )
    print(
        f"\ndecode step at {args.speed_tokens} tokens (synthetic Llama-3-8B layer, float16): "
        f"dense {speed['dense'] * 1e3:.2f} ms, ClusterKV (budget 1024) "
        f"{speed['clusterkv'] * 1e3:.2f} ms, {speed['dense'] / speed['clusterkv']:.1f}x faster"
    )
    figures = _figures(out, passkey, (ppl, long_ppl), shares, runs, budget_slots, args.model)
    print("\nfigures: " + ", ".join(str(f) for f in figures))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


def _store_trace(model, args, out: Path, progress) -> dict:
    from ..store import TieredStore
    from .scoring import lm_contexts
    from .trace import replay, zipf_trace

    contexts = lm_contexts(model, args.contexts)
    requests, _ = zipf_trace(args.contexts, args.requests)
    entry = sum(k.nbytes + v.nbytes for k, v in contexts[0][0])
    dram, ssd = int(0.15 * entry * args.contexts), int(0.4 * entry * args.contexts)
    runs = {}
    for name, policy, alpha in POLICIES:
        directory = Path(tempfile.mkdtemp(prefix=f"store-{policy}-", dir=out))
        with TieredStore(dram, str(directory), ssd, policy=policy, alpha=alpha) as s:
            runs[name] = replay(s, contexts, requests, progress=progress)
        for path in directory.glob("*"):
            path.unlink()
        directory.rmdir()
    return runs


def _speed(tokens: int) -> dict:
    from ..attention import attention
    from ..clustering import RecallCache
    from .data import synthetic_llama_cache

    cache = synthetic_llama_cache(tokens, dtype="float16", seed=0)
    k, v, q = cache.keys, cache.values, cache.query
    recall = RecallCache(budget=1024)
    recall.prefill(np.ascontiguousarray(k[:, :-8]), np.ascontiguousarray(v[:, :-8]))

    def best(fn, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    dense = best(lambda: attention(q, k, v))
    steps = iter(range(tokens - 8, tokens))
    step = best(
        lambda: (
            t := next(steps),
            recall.step(q, np.ascontiguousarray(k[:, t]), np.ascontiguousarray(v[:, t])),
        )
    )
    return {"dense": dense, "clusterkv": step}


def _ruler_tasks() -> tuple:
    from . import ruler

    return ruler.TASKS


def _figures(out: Path, passkey, perplexities, shares, runs, budget_slots, model) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar(list(passkey), [100 * v for v in passkey.values()], color="C0")
    axes.set_ylabel("pass-key accuracy (%)" if model == "tiny" else "RULER average score (%)")
    axes.set_title(f"{'tiny LM' if model == 'tiny' else model}, budget {budget_slots} tokens")
    axes.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    paths.append(out / "passkey.png")
    figure.savefig(paths[-1], dpi=120)

    figure, panels = plt.subplots(1, 2, figsize=(11, 3.5))
    width = 0.8 / len(shares)
    unit = "byte" if model == "tiny" else "token"
    titles = (f"every scored {unit}", f"{unit}s that need the distant prompt")
    for axes, ppl, title in zip(panels, perplexities, titles):
        for i, share in enumerate(shares):
            axes.bar(
                np.arange(len(passkey)) + i * width,
                [ppl[m, share] for m in passkey],
                width,
                label=f"{share:.0%} kept",
            )
        axes.set_xticks(np.arange(len(passkey)) + width / 2, list(passkey), rotation=45)
        axes.set_ylabel(f"held-out perplexity (per {unit})")
        axes.set_title(title)
    panels[-1].legend(loc="upper left")  # its full-cache bars leave that corner free
    figure.tight_layout()
    paths.append(out / "perplexity.png")
    figure.savefig(paths[-1], dpi=120)

    figure, axes = plt.subplots(figsize=(5, 3.5))
    adaptive = [r for n, r in runs.items() if n.startswith("adaptive")]
    axes.plot(
        [r["repeat_delay"] * 1e3 for r in adaptive],
        [r["repeat_quality"] for r in adaptive],
        "o-",
        label="adaptive (alpha swept)",
    )
    for name, r in runs.items():
        if not name.startswith("adaptive"):
            axes.plot(r["repeat_delay"] * 1e3, r["repeat_quality"], "s", label=name)
    axes.set_xlabel("mean loading delay, repeat requests (ms)")
    axes.set_ylabel("mean quality")
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / "store_trace.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths
