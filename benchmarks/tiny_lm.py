"""Quality on the shipped tiny LM (the real-model targets).

- ``run``: pass-key retrieval at the trained context with a budget of 1/16 of it: ClusterKV
  within 5 points of the full cache and at least as good as Quest; H2O and
  StreamingLLM beside them. Reported with the default two uncompressed first layers and
  with every layer compressed.
- ``run_merging``: KVMerger against H2O and CaM (StreamingLLM beside them as the
  recency reference) with the prompt compressed to 50% and 35%: held-out perplexity
  over all scored bytes and over the bytes that need the distant prompt, with two and
  with no uncompressed first layers, and pass-key retrieval.
- ``run_hit_rate``: ClusterKV's cluster-cache hit rate over greedy decoding.
- ``run_key_similarity``: how alike adjacent keys, and their values, are.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from kvpack.eval import scoring
from kvpack.models import load_tiny_lm

PASSKEY_METHODS = ("full", "clusterkv", "quest", "h2o", "streaming_llm")
# name: (method, options). The log-count bias (each merged slot keeps the softmax mass
# of the tokens it stands for) is kvpack's option beyond the paper.
# StreamingLLM is the recency reference: the share of loss that the recent window explains.
# "pivot only" is an ablation: a kernel so narrow that each merged slot is its pivot token
# alone (no averaging), which separates the loss of averaging from that of which tokens
# keep a slot.
MERGING_METHODS = {
    "kvmerger": ("kvmerger", None),
    "kvmerger + log-count bias": ("kvmerger", {"log_count_bias": True}),
    "ablation: kvmerger, pivot only (sigma 0.001)": ("kvmerger", {"sigma": 1e-3}),
    "h2o": ("h2o", None),
    "cam": ("cam", None),
    "streaming_llm": ("streaming_llm", None),
}


def run(prompts: int = 20) -> list[tuple[str, str, str]]:
    model = load_tiny_lm()
    context = model.config.max_position_embeddings
    budget = context // 16
    rows = []
    for skip_layers in (2, 0):
        accuracy = {
            method: scoring.passkey_accuracy(
                model, method, budget, context=context, prompts=prompts, skip_layers=skip_layers
            )
            for method in PASSKEY_METHODS
        }
        # The default clusters follow the budget (budget/12 tokens on average, ~11 here).
        # Variants: the paper's fixed 80-token clusters fill a 128-token budget with one or
        # two; a 16-token recent window always attended is what Quest's current page gives
        # it (the first layers attend mostly to the last few tokens).
        variants = {
            "clusterkv, 80-token clusters": {"n_clusters": context // 80},
            "clusterkv, 16-token recent window": {"window": 16},
        }
        for name, options in variants.items():
            accuracy[name] = scoring.passkey_accuracy(
                model,
                "clusterkv",
                budget,
                context=context,
                prompts=prompts,
                skip_layers=skip_layers,
                options=options,
            )
        for method, value in accuracy.items():
            target = ""
            if method == "clusterkv":
                gap = round(100 * (accuracy["full"] - value))  # whole prompts: no float dust
                holds = gap <= 5 and value >= accuracy["quest"]
                target = (
                    f"within 5 points of full and >= quest: {'holds' if holds else 'does not hold'}"
                    f" ({gap:+.0f} points)"
                )
            name = "full cache" if method == "full" else f"{method} @ {budget}"
            rows.append(
                (
                    f"pass-key at {context}, {name}, first {skip_layers} layers uncompressed",
                    f"{value:.0%} of {prompts}",
                    target,
                )
            )
    return rows


def run_merging(
    windows: int = 8, long_windows: int = 32, prompts: int = 20
) -> list[tuple[str, str, str]]:
    """KVMerger against H2O and CaM with the prompt compressed to 50% and 35%: perplexity
    per byte (the prompt is the first 3/4 of 2048 held-out bytes) over all scored bytes
    (``windows`` windows) and over the bytes whose loss the distant prompt lowers by 2
    nats or more and that it predicts with loss <= 2 (``long_windows`` windows;
    :func:`kvpack.eval.scoring.context_dependent_tokens`), then pass-key retrieval (the
    paper's needle test)."""
    model = load_tiny_lm()
    context = model.config.max_position_embeddings
    key_tokens = scoring.context_dependent_tokens(model, context=context, windows=long_windows)
    selected = sum(int(mask.sum()) for mask in key_tokens)
    scored = sum(mask.size for mask in key_tokens)
    metrics = {
        "held-out perplexity per byte": partial(
            scoring.perplexity, model, context=context, windows=windows
        ),
        "context-dependent perplexity": partial(
            scoring.perplexity,
            model,
            context=context,
            windows=long_windows,
            scored=key_tokens,
        ),
    }
    rows = [
        (
            "context-dependent bytes (distant prompt saves >= 2 nats, loss <= 2)",
            f"{selected} of {scored}",
            "reported",
        )
    ]
    for metric, measure in metrics.items():
        full = measure("full", 1.0)
        rows.append((f"{metric}, full cache", f"{full:.4f}", ""))
        for skip_layers in (2, 0):
            for share in (0.5, 0.35):
                ppl = {
                    name: measure(method, share, skip_layers=skip_layers, options=options)
                    for name, (method, options) in MERGING_METHODS.items()
                }
                for name, value in ppl.items():
                    rows.append(
                        (
                            f"{metric}, {name} @ {share:.0%}, first {skip_layers} layers "
                            "uncompressed",
                            f"{value:.4f}",
                            _kvmerger_target(name, ppl, lower_is_better=True),
                        )
                    )
    for share in (0.5, 0.35):
        accuracy = {
            name: scoring.passkey_accuracy(
                model, method, share, context=context, prompts=prompts, options=options
            )
            for name, (method, options) in MERGING_METHODS.items()
        }
        for name, value in accuracy.items():
            rows.append(
                (
                    f"pass-key at {context}, {name} @ {share:.0%}, first 2 layers uncompressed",
                    f"{value:.0%} of {prompts}",
                    _kvmerger_target(name, accuracy, lower_is_better=False),
                )
            )
    return rows


def _kvmerger_target(name: str, values: dict, lower_is_better: bool) -> str:
    """The paper's claim on a KVMerger row (better than both H2O and CaM); "" otherwise."""
    if not name.startswith("kvmerger"):
        return ""
    value, baselines = values[name], (values["h2o"], values["cam"])
    holds = value < min(baselines) if lower_is_better else value > max(baselines)
    sign = "<" if lower_is_better else ">"
    return f"{sign} h2o and cam: {'holds' if holds else 'does not hold'}"


def run_hit_rate(prompt: int = 1792, steps: int = 256) -> list[tuple[str, str, str]]:
    """ClusterKV's fast-tier hit rate over ``steps`` greedy decode steps of the tiny LM
    on held-out text: the share of recalled tokens already held from the last step."""
    import torch

    from kvpack import hf
    from kvpack.eval import tasks
    from kvpack.models import encode
    from kvpack.models.byte_tokenizer import PAD

    model = load_tiny_lm()
    ids = torch.tensor([encode(tasks.corpus().held_out[: prompt - 1].tobytes())])
    rows = []
    for budget in (128, 256):
        cache = hf.make_cache(model, "clusterkv", budget)
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **{hf.cache_argument(model): cache},
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=PAD,
            )
        stats = cache.stats()
        rows.append(
            (
                f"ClusterKV hit rate, {steps} decode steps after {prompt} tokens, budget {budget}",
                f"{stats['hit_rate']:.3f} ({stats['loaded']} of {stats['selected']} recalled "
                f"tokens loaded, {stats['bytes_loaded'] / 2**20:.1f} MiB)",
                "reported",
            )
        )
    return rows


def run_key_similarity(tokens: int = 2048, threshold: float = 0.75) -> list[tuple[str, str, str]]:
    """How redundant neighbouring keys are (KVMerger's premise): the mean cosine of each
    key with the next, the share of pairs at or above the merge threshold, and how alike
    those pairs' values are (merging averages them), per layer of the tiny LM (held-out
    bytes) and of MiniLM (real text)."""
    import kvpack
    from kvpack.eval import tasks
    from kvpack.eval.data import checkpoint_kv, minilm_kv
    from kvpack.models import encode

    model = load_tiny_lm()
    ids = encode(tasks.corpus().held_out[: tokens - 1].tobytes())
    sources = {
        f"tiny LM, {tokens} held-out bytes": checkpoint_kv(model, ids=ids),
        "MiniLM, 384 tokens": minilm_kv(tokens=384),
    }
    rows = []
    for source, layers in sources.items():
        for i, layer in enumerate(layers):
            cos = kvpack.adjacent_similarity(np.ascontiguousarray(layer.keys, dtype=np.float32))
            value_cos = kvpack.adjacent_similarity(
                np.ascontiguousarray(layer.values, dtype=np.float32)
            )
            similar = cos >= threshold
            values = f"mean {value_cos[similar].mean():.2f}" if similar.any() else "none"
            rows.append(
                (
                    f"adjacent-key cosine, {source}, layer {i}",
                    f"mean {cos.mean():.3f}, {similar.mean():.0%} of pairs >= {threshold} "
                    f"(their values' cosine: {values})",
                    "reported",
                )
            )
    return rows
