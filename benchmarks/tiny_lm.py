"""Quality on the shipped tiny LM (the real-model targets).

- Pass-key retrieval at the trained context with a budget of 1/16 of it: ClusterKV
  within 5 points of the full cache and at least as good as Quest; H2O and
  StreamingLLM beside them. Reported with the default two uncompressed first layers and
  with every layer compressed.
- Held-out perplexity with the prompt compressed to 50% and 35%: KVMerger below H2O
  and CaM; with two and with no uncompressed first layers.
"""

from __future__ import annotations

import numpy as np

from kvpack import evaluation
from kvpack.models import load_tiny_lm

PASSKEY_METHODS = ("dynamic", "clusterkv", "quest", "h2o", "streaming_llm")
# name: (method, options). The log-count bias (each merged slot keeps the softmax mass
# of the tokens it stands for) is kvpack's option beyond the paper.
PERPLEXITY_METHODS = {
    "kvmerger": ("kvmerger", None),
    "kvmerger + log-count bias": ("kvmerger", {"log_count_bias": True}),
    "h2o": ("h2o", None),
    "cam": ("cam", None),
}


def run(prompts: int = 20, windows: int = 8) -> list[tuple[str, str, str]]:
    model = load_tiny_lm()
    context = model.config.max_position_embeddings
    budget = context // 16
    rows = []
    for skip_layers in (2, 0):
        accuracy = {
            method: evaluation.passkey_accuracy(
                model, method, budget, context=context, prompts=prompts, skip_layers=skip_layers
            )
            for method in PASSKEY_METHODS
        }
        # The default clusters follow the budget (budget/12 tokens on average, ~11 here);
        # the paper's fixed 80-token clusters fill a 128-token budget with one or two.
        accuracy["clusterkv, 80-token clusters"] = evaluation.passkey_accuracy(
            model,
            "clusterkv",
            budget,
            context=context,
            prompts=prompts,
            skip_layers=skip_layers,
            options={"n_clusters": context // 80},
        )
        for method, value in accuracy.items():
            target = ""
            if method == "clusterkv":
                gap = round(100 * (accuracy["dynamic"] - value))  # whole prompts: no float dust
                holds = gap <= 5 and value >= accuracy["quest"]
                target = (
                    f"within 5 points of full and >= quest: {'holds' if holds else 'does not hold'}"
                    f" ({gap:+.0f} points)"
                )
            name = "full cache" if method == "dynamic" else f"{method} @ {budget}"
            rows.append(
                (
                    f"pass-key at {context}, {name}, first {skip_layers} layers uncompressed",
                    f"{value:.0%} of {prompts}",
                    target,
                )
            )
    full = evaluation.perplexity(model, context=context, windows=windows)
    rows.append(("held-out perplexity per byte, full cache", f"{full:.4f}", ""))
    for skip_layers in (2, 0):
        for share in (0.5, 0.35):
            ppl = {
                name: evaluation.perplexity(
                    model,
                    method,
                    share,
                    context=context,
                    windows=windows,
                    skip_layers=skip_layers,
                    options=options,
                )
                for name, (method, options) in PERPLEXITY_METHODS.items()
            }
            for name, value in ppl.items():
                target = ""
                if name.startswith("kvmerger"):
                    holds = value < min(ppl["h2o"], ppl["cam"])
                    target = f"< h2o and cam: {'holds' if holds else 'does not hold'}"
                rows.append(
                    (
                        f"held-out perplexity per byte, {name} @ {share:.0%}, "
                        f"first {skip_layers} layers uncompressed",
                        f"{value:.4f}",
                        target,
                    )
                )
    return rows


def run_hit_rate(prompt: int = 1792, steps: int = 256) -> list[tuple[str, str, str]]:
    """ClusterKV's fast-tier hit rate over ``steps`` greedy decode steps of the tiny LM
    on held-out text: the share of recalled tokens already held from the last step."""
    import torch

    from kvpack import hf
    from kvpack.models import encode, tasks

    model = load_tiny_lm()
    ids = torch.tensor([encode(tasks.corpus().held_out[: prompt - 1].tobytes())])
    rows = []
    for budget in (128, 256):
        cache = hf.make_cache(model, "clusterkv", budget)
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=cache,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=tasks.PAD,
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
    key with the next, and the share of pairs at or above the merge threshold, per layer
    of the tiny LM (held-out bytes) and of MiniLM (real text)."""
    import kvpack
    from kvpack.data import checkpoint_kv, minilm_kv
    from kvpack.models import encode, tasks

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
            rows.append(
                (
                    f"adjacent-key cosine, {source}, layer {i}",
                    f"mean {cos.mean():.3f}, {np.mean(cos >= threshold):.0%} of pairs >= "
                    f"{threshold}",
                    "reported",
                )
            )
    return rows
