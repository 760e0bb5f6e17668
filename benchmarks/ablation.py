"""The levers beyond the papers at small budgets, one at a time and together (suite
``ablation_4k``): SmolLM2-135M-Instruct (float32) on the seven RULER-style tasks at 4096
tokens, each method at 1/16 and 1/8 of the prompt.

- ClusterKV and Quest as their papers have them; then with refined recall (``refine=4``:
  four times the budget recalled, the budget with the highest exact q . k kept), with a
  4-bit slow tier (``slow_bits=4``: the prompt held as KIVI codes), with PyramidKV's layer
  budgets (``layer_budgets="pyramid"``), and with the three together.
- SnapKV and H2O as their papers have them; with AdaKV's head budgets (``adaptive``); and
  with PyramidKV's layer budgets as well.
- Suite ``ablation_4k_heads``: refined ClusterKV and Quest at 1/16, uniform and with
  AdaKV's head budgets for the recalled tokens, on 28 prompts.

Each row gives the average with its 95% bootstrap interval over prompts, the points it
gains over its method's paper configuration on the same prompts (paired interval), and the
key/value bytes its cache holds per tier after the prefill of one 4096-token prompt. Every
prompt is prefilled once for all rows (as in ``real_lm``). The claims themselves are judged
in ``real_lm_4k`` on more prompts; this table screens which levers are worth it.
"""

from __future__ import annotations

import os
import time

from kvpack import methods
from kvpack.eval import bootstrap_interval

from .real_lm import LONG_CONTEXT, RECALL_SHARES, _label, _progress

# 3 prompts for each of the 7 tasks: 33 rows on 21 prompts fit about half an hour here.
PROMPTS_PER_TASK = 3
# The head-budget rows screen one lever: 4 prompts per task (28) fit about 10 minutes here.
HEAD_PROMPTS_PER_TASK = 4
PYRAMID = {"layer_budgets": "pyramid"}


def _levers() -> list[tuple[str, str, object, dict]]:
    """(row label, its paper configuration's label, method, make_cache options) of every
    row, the paper configuration of each method first."""
    rows = []
    for name, kind in (("clusterkv", methods.ClusterKV), ("quest", methods.Quest)):
        rows += [
            (name, name, kind(), {}),
            (f"{name} + refine 4", name, kind(refine=4), {}),
            (f"{name} + 4-bit slow tier", name, kind(slow_bits=4), {}),
            (f"{name} + pyramid layers", name, kind(), PYRAMID),
            (f"{name} + all three", name, kind(refine=4, slow_bits=4), PYRAMID),
        ]
    for name, kind in (("snapkv", methods.SnapKV), ("h2o", methods.H2O)):
        rows += [
            (name, name, kind(), {}),
            (f"{name} + adaptive heads", name, kind(adaptive=True), {}),
            (f"{name} + adaptive heads + pyramid layers", name, kind(adaptive=True), PYRAMID),
        ]
    return rows


def _bytes(model, tokenizer, levers, shares) -> dict:
    """(label, share) -> the cache's bytes per tier (MiB) after one prompt's prefill."""
    import numpy as np
    import torch

    from kvpack import hf
    from kvpack.eval import ruler

    sample = ruler.make_sample(
        "single_needle", tokenizer, LONG_CONTEXT, np.random.default_rng(0), depth=0.5
    )
    shared = hf.prefill(model, torch.tensor([sample.prompt]))
    held = {}
    for share in shares:
        for label, _, method, options in levers:
            cache = hf.make_cache(model, method, share, skip_layers=2, prefill=shared, **options)
            tiers = cache.stats()["bytes"]
            held[(label, share)] = {t: n / 2**20 for t, n in tiers.items() if n and t != "total"}
    return held


def _head_levers() -> list[tuple[str, str, object, dict]]:
    """The rows of ``ablation_4k_heads``: refined ClusterKV and Quest, each with AdaKV's
    head budgets (the heads share the step's recalled tokens) against its uniform row."""
    rows = []
    for name, kind in (("clusterkv", methods.ClusterKV), ("quest", methods.Quest)):
        base = f"{name} + refine 4"
        rows += [
            (base, base, kind(refine=4), {}),
            (f"{base} + adaptive heads", base, kind(refine=4, adaptive=True), {}),
        ]
    return rows


def run_heads(samples: int = HEAD_PROMPTS_PER_TASK) -> list:
    """Suite ``ablation_4k_heads``: adaptive head budgets for refined recall at 1/16 of
    4096 tokens, where the budget is tightest."""
    return run(samples, shares=RECALL_SHARES[:1], levers=_head_levers())


def run(
    samples: int = PROMPTS_PER_TASK,
    shares: tuple[float, ...] = RECALL_SHARES,
    levers: list | None = None,
) -> list:
    import torch

    from kvpack.eval import ruler, ruler_scores
    from kvpack.models import load_pretrained

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_pretrained("smollm2-135m")
    levers = levers or _levers()
    runs = [("full", 1.0)]
    runs += [(method, share, options) for share in shares for _, _, method, options in levers]
    prompts = samples * len(ruler.TASKS)
    results = ruler_scores(
        model,
        tokenizer,
        runs=runs,
        context=LONG_CONTEXT,
        samples=samples,
        progress=_progress(f"ablation at {LONG_CONTEXT}", prompts * len(runs)),
    )
    full, results = results[0], iter(results[1:])
    held = _bytes(model, tokenizer, levers, shares)

    low, high = bootstrap_interval(full["prompts"])
    rows = [
        (
            f"RULER-style average at {LONG_CONTEXT}, full cache ({prompts} prompts)",
            f"{100 * full['average']:.1f} [{100 * low:.1f}, {100 * high:.1f}]",
            "",
        )
    ]
    for share in shares:
        papers = {}
        for label, paper, _, _ in levers:
            result = next(results)
            papers.setdefault(paper, result)
            low, high = bootstrap_interval(result["prompts"])
            value = f"{100 * result['average']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
            if label != paper:
                gain_low, gain_high = bootstrap_interval(
                    result["prompts"], papers[paper]["prompts"]
                )
                gain = 100 * (result["average"] - papers[paper]["average"])
                value += f"; vs {paper} {gain:+.1f} [{100 * gain_low:+.1f}, {100 * gain_high:+.1f}]"
            tiers = held[(label, share)]
            value += "; MiB " + ", ".join(f"{t} {n:.1f}" for t, n in tiers.items())
            rows.append((f"{label} @ {_label(share)}: average [95%]; gain; memory", value, ""))
    minutes = (time.perf_counter() - start) / 60
    rows.append(("suite wall time (minutes)", f"{minutes:.1f}", "reported"))
    return rows
