"""Every method judged on a real pretrained LM: SmolLM2-135M-Instruct (float32).

- ``ruler``: the seven RULER-style tasks at 2048 tokens (``samples`` prompts per task,
  needle depth swept from start to end), every method decoding from one exact prefill
  per prompt. ClusterKV at 1/16 and 1/8 of the prompt against the full cache and Quest
  (the paper's claim: within 5 points of the full cache, above Quest), with SnapKV, H2O
  and StreamingLLM beside them; KVMerger at 50% and 35% against H2O and CaM.
- ``run_long`` (suite ``real_lm_4k``): the ClusterKV claim at 4096 tokens, 1/16 and
  1/8, with fewer methods (a 4096-token table of every method does not fit the hour of
  ``real_lm`` beside the rest), and ClusterKV and Quest with refined recall against the
  full cache, Quest and the eviction methods at the same budget.
- ``merging``: KVMerger against H2O and CaM with the prompt compressed to 50% and 35%:
  perplexity of held-out text (2048-token windows through the tokenizer, the first 3/4
  the prompt) over all scored tokens and over the tokens that need the distant prompt.
  StreamingLLM is the recency reference; "pivot only" (a kernel so narrow that each
  merged slot is its pivot token) separates the loss of averaging from that of choosing
  which tokens keep a slot.
- ``adaptcache``: the tiered store on SmolLM2's real caches. Each context is a RULER
  prompt of 2048 tokens without its question (what a store holds before the question
  comes); a hit loads the entry, the question is prefilled on it and the answer decoded,
  and the request's quality is the task score of that answer. A miss recomputes the
  context (its measured prefill) and scores as the full cache. Each context's score per
  codec is computed once from the entry that codec encodes; the store is handed those
  scores, and answers decoded from entries the store actually returned are checked
  against them. Requests follow a Zipf trace; DRAM holds 10% of the working set and the
  SSD tier 30%. Target: at equal quality, the loading delay of repeat requests at least
  1.43x below the best static baseline's (the paper's low end); quality at equal delay
  reported.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

import kvpack
from kvpack import methods
from kvpack.eval import bootstrap_interval

from .store import BASELINES, compare, replay_rows

RULER_CONTEXT = 2048
LONG_CONTEXT = 4096  # the ClusterKV claim's own context (suite real_lm_4k)
RECALL_SHARES = (1 / 16, 1 / 8)
# 8 prompts for each of the 7 tasks: one prompt moves an average by at most 100/56 < 2
# points.
PROMPTS_PER_TASK = 8
RECALL_METHODS = ("clusterkv", "quest", "snapkv", "h2o", "streaming_llm")
EVICTION_METHODS = ("snapkv", "h2o", "streaming_llm")
# Recall beyond the papers, judged beside them at 4096 tokens: 4x the budget recalled and
# the budget with the highest exact q . k kept (the lever ablation_4k found strongest).
REFINED = (methods.ClusterKV(refine=4), methods.Quest(refine=4))
MERGING_SHARES = (0.5, 0.35)
MERGING_RUN_METHODS = ("kvmerger", "h2o", "cam")
# name -> method: the merging table's rows (see the module docstring for the ablation).
MERGING_METHODS = {
    "kvmerger": "kvmerger",
    "ablation: kvmerger, pivot only (sigma 0.001)": methods.KVMerger(sigma=1e-3),
    "h2o": "h2o",
    "cam": "cam",
    "streaming_llm": "streaming_llm",
}
PERPLEXITY_CONTEXT = 2048
STORE_CONTEXT = 2048
ALPHAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
VERIFIED_ANSWERS = 24  # (context, codec) pairs whose returned entry is decoded again


def _progress(label: str, total: int):
    """A callback counting work done, printing how far ``label`` has come."""
    start, done = time.perf_counter(), [0]

    def step(n: int = 1) -> None:
        done[0] += n
        elapsed = time.perf_counter() - start
        print(
            f"[real_lm] {label}: {done[0]}/{total} ({elapsed:.0f} s)", file=sys.stderr, flush=True
        )

    return step


def _label(share: float) -> str:
    """1/16 and 1/8 as fractions, 50% and 35% as percentages."""
    fraction = Fraction(share).limit_denominator(64)
    small = fraction.numerator == 1 and fraction.denominator >= 4
    return f"1/{fraction.denominator}" if small else f"{share:.0%}"


def run(ruler_samples: int = PROMPTS_PER_TASK, windows: int = 6, long_windows: int = 10) -> list:
    import torch

    from kvpack.models import load_pretrained

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_pretrained("smollm2-135m")
    rows, times = [], {}
    for name, part in (
        ("ruler", lambda: _ruler(model, tokenizer, ruler_samples)),
        ("merging", lambda: _merging(model, tokenizer, windows, long_windows)),
        ("adaptcache", lambda: _adaptcache(model, tokenizer)),
    ):
        begun = time.perf_counter()
        rows += part()
        times[name] = time.perf_counter() - begun
    total = time.perf_counter() - start
    spent = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in times.items())
    rows.append(("suite wall time (minutes)", f"{total / 60:.1f} ({spent})", "< 60"))
    return rows


# ---- RULER-style tasks --------------------------------------------------------------


def _table(model, tokenizer, runs, context: int, samples: int, tasks=None):
    """RULER-style scores of every (method, share) run at ``context`` tokens, each prompt
    prefilled once: one row per run, and each run's result (its task scores, ``"average"``
    and ``"prompts"``) under (its method's name, share)."""
    from kvpack.eval import ruler, ruler_scores

    tasks = tuple(tasks or ruler.TASKS)
    prompts = samples * len(tasks)
    scores = ruler_scores(
        model,
        tokenizer,
        runs=runs,
        tasks=tasks,
        context=context,
        samples=samples,
        progress=_progress(f"RULER at {context}", prompts * len(runs)),
    )
    rows, average = [], {}
    for (method, share), result in zip(runs, scores):
        average[(_name(method), share)] = result
        name = "full cache" if method == "full" else f"{_name(method)} @ {_label(share)}"
        scored = ", ".join(f"{t} {100 * result[t]:.0f}" for t in tasks)
        low, high = bootstrap_interval(result["prompts"])
        rows.append(
            (
                f"RULER-style average at {context}, {name} ({prompts} prompts)",
                f"{100 * result['average']:.1f} [{100 * low:.1f}, {100 * high:.1f}] ({scored})",
                "",
            )
        )
    return rows, average


def _name(method) -> str:
    """A run's method as a row names it: its shorthand, with the parameters it sets away
    from the defaults (``"clusterkv refine=4"``)."""
    if isinstance(method, str):
        return method
    defaults = type(method)().as_dict()
    changed = [f"{k}={v}" for k, v in method.as_dict().items() if defaults[k] != v]
    return " ".join([method.name, *changed])


def _gap(result: dict, baseline: dict) -> tuple[float, float, float]:
    """Points ``result`` lies below ``baseline`` on the same prompts: the mean and its
    95% paired bootstrap interval."""
    low, high = bootstrap_interval(baseline["prompts"], result["prompts"])
    return 100 * (baseline["average"] - result["average"]), 100 * low, 100 * high


def _clusterkv_rows(average: dict) -> list:
    """The paper's claim at each recall share: within 5 points of full, above Quest, both
    on the 95% paired bootstrap interval over prompts, not the mean alone."""
    rows = []
    for share in RECALL_SHARES:
        cluster, quest = average[("clusterkv", share)], average[("quest", share)]
        gap, _, gap_high = _gap(cluster, average[("full", 1.0)])
        lead, lead_low, _ = _gap(quest, cluster)
        holds = gap_high <= 5 and lead_low > 0
        rows.append(
            (
                f"ClusterKV @ {_label(share)}: points below full; points above Quest "
                "[95% intervals]",
                f"{gap:+.1f} [upper {gap_high:+.1f}]; {lead:+.1f} [lower {lead_low:+.1f}]",
                f"within 5 of full and above quest: {'holds' if holds else 'does not hold'}",
            )
        )
    return rows


def run_long(samples: int = PROMPTS_PER_TASK) -> list:
    """ClusterKV against Quest at 1/16 and 1/8 of a 4096-token prompt, each as its paper
    has it and with refined recall (the lever ``ablation_4k`` found strongest), with
    SnapKV, H2O and StreamingLLM at the same budgets; the seven tasks with ``samples``
    prompts each."""
    import torch

    from kvpack.models import load_pretrained

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_pretrained("smollm2-135m")
    runs = [("full", 1.0)]
    runs += [(m, s) for s in RECALL_SHARES for m in ("clusterkv", "quest", *REFINED)]
    runs += [(m, s) for s in RECALL_SHARES for m in EVICTION_METHODS]
    rows, average = _table(model, tokenizer, runs, LONG_CONTEXT, samples)
    rows += _clusterkv_rows(average)
    rows += _beyond_rows(average)
    minutes = (time.perf_counter() - start) / 60
    rows.append(("suite wall time (minutes)", f"{minutes:.1f}", "reported"))
    return rows


def _beyond_rows(average: dict) -> list:
    """The target beyond the papers, per recall configuration and share: within 5 points
    of full at 1/16 and 2 at 1/8, above Quest and above every eviction method at the same
    share, each on its 95% paired interval over prompts."""
    rows = []
    for share, within in zip(RECALL_SHARES, (5, 2)):
        for config in ("clusterkv", *map(_name, REFINED)):
            result = average[(config, share)]
            gap, _, gap_high = _gap(result, average[("full", 1.0)])
            peers = [p for p in ("quest", *EVICTION_METHODS) if p != config]
            leads = {p: _gap(average[(p, share)], result) for p in peers}
            holds = gap_high <= within and all(low > 0 for _, low, _ in leads.values())
            rows.append(
                (
                    f"{config} @ {_label(share)}: points below full [upper]; points above "
                    "each peer [lower]",
                    f"{gap:+.1f} [{gap_high:+.1f}]; "
                    + ", ".join(
                        f"{p} {lead:+.1f} [{low:+.1f}]" for p, (lead, low, _) in leads.items()
                    ),
                    f"within {within} of full, above every peer: "
                    f"{'holds' if holds else 'does not hold'}",
                )
            )
    return rows


def _ruler(model, tokenizer, samples: int, tasks=None) -> list:
    runs = [("full", 1.0)]
    runs += [(m, s) for s in RECALL_SHARES for m in RECALL_METHODS]
    runs += [(m, s) for s in MERGING_SHARES for m in MERGING_RUN_METHODS]
    rows, average = _table(model, tokenizer, runs, RULER_CONTEXT, samples, tasks)
    rows += _clusterkv_rows(average)
    for share in MERGING_SHARES:
        merged = average[("kvmerger", share)]
        leads = {m: _gap(average[(m, share)], merged) for m in ("h2o", "cam")}
        holds = all(low > 0 for _, low, _ in leads.values())
        rows.append(
            (
                f"KVMerger @ {_label(share)}: points above H2O and CaM [95% lower ends]",
                ", ".join(f"{m} {lead:+.1f} [{low:+.1f}]" for m, (lead, low, _) in leads.items()),
                f"> h2o and cam: {'holds' if holds else 'does not hold'}",
            )
        )
    return rows


# ---- merging: perplexity ------------------------------------------------------------


def _merging(model, tokenizer, windows: int, long_windows: int) -> list:
    from kvpack.eval import context_dependent_tokens, perplexity

    context = PERPLEXITY_CONTEXT
    runs = [("full", 1.0)]
    runs += [(method, s) for s in MERGING_SHARES for method in MERGING_METHODS.values()]
    names = ["full cache"] + [
        f"{name} @ {_label(s)}" for s in MERGING_SHARES for name in MERGING_METHODS
    ]
    key_tokens = context_dependent_tokens(
        model,
        context=context,
        windows=long_windows,
        tokenizer=tokenizer,
        progress=_progress("context-dependent tokens", long_windows),
    )
    selected = sum(int(mask.sum()) for mask in key_tokens)
    scored = sum(mask.size for mask in key_tokens)
    measures = {
        "perplexity per token": perplexity(
            model,
            runs=runs,
            context=context,
            windows=windows,
            tokenizer=tokenizer,
            progress=_progress("perplexity", windows * len(runs)),
        ),
        "context-dependent perplexity": perplexity(
            model,
            runs=runs,
            context=context,
            windows=long_windows,
            scored=key_tokens,
            tokenizer=tokenizer,
            progress=_progress("context-dependent perplexity", long_windows * len(runs)),
        ),
    }
    rows = [
        (
            "perplexity windows (prompt 3/4, the rest scored)",
            f"{windows} of {context} tokens; context-dependent: {long_windows}, "
            f"{selected} of {scored} scored tokens (the distant prompt saves >= 2 nats, "
            "loss <= 2)",
            "",
        )
    ]
    for measure, values in measures.items():
        by_name = dict(zip(names, values))
        for name, value in by_name.items():
            target = ""
            if name.startswith("kvmerger"):
                share = name.split(" @ ")[1]
                rivals = [by_name[f"{m} @ {share}"] for m in ("h2o", "cam")]
                holds = value < min(rivals)
                target = f"< h2o and cam: {'holds' if holds else 'does not hold'}"
            rows.append((f"{measure}, {name}", f"{value:.4f}", target))
    return rows


# ---- AdaptCache on real caches ------------------------------------------------------


def _answer(model, tokenizer, sample, stored, tokens: int) -> float:
    """Task score of the answer decoded after ``sample``'s question is prefilled on the
    stored context of ``tokens`` tokens."""
    import torch

    from kvpack import hf
    from kvpack.eval import ruler

    ids = torch.tensor([sample.prompt])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **{hf.cache_argument(model): hf.stored_cache(model, stored, tokens)},
            max_new_tokens=sample.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return ruler.score(answer, sample.answers)


def _store_contexts(model, tokenizer, per_task: int, tasks):
    """Per context: (kv in float16, probe queries, prefill seconds, score per codec), and
    its sample and length for decoding again."""
    import torch

    from kvpack import hf
    from kvpack.eval import ruler

    contexts, samples = [], []
    step = _progress("store contexts", per_task * len(tasks))
    for t, task in enumerate(tasks):
        for i in range(per_task):
            rng = np.random.default_rng([7, t, i])
            sample = ruler.make_sample(
                task, tokenizer, STORE_CONTEXT, rng, depth=i / max(1, per_task - 1)
            )
            tokens = len(sample.prompt) - sample.question
            start = time.perf_counter()
            prefill = hf.prefill(model, torch.tensor([sample.prompt[:tokens]]))
            seconds = time.perf_counter() - start
            kv = [
                (k[0].to(torch.float16).numpy(), v[0].to(torch.float16).numpy())
                for _, k, v, _, _ in prefill.layers
            ]
            # The context's last queries: the store's evidence for dropping tokens.
            probes = [
                np.ascontiguousarray(q[0, :, -32:].float().numpy()) for q, *_ in prefill.layers
            ]
            del prefill
            scores = {}
            for codec in kvpack.store.CODECS:
                blob = kvpack.store.encode(kv, codec, probe_queries=probes)
                stored = kvpack.store.decode(blob)
                scores[codec] = _answer(model, tokenizer, sample, stored, tokens)
            contexts.append((kv, probes, seconds, scores))
            samples.append((sample, tokens))
            step()
    return contexts, samples


def _adaptcache(model, tokenizer, per_task: int = 3, requests_count: int = 400, tasks=None) -> list:
    from kvpack.eval import ruler
    from kvpack.eval.trace import replay, zipf_trace

    contexts, samples = _store_contexts(model, tokenizer, per_task, tasks or ruler.TASKS)
    working_set = sum(
        (k.nbytes + v.nbytes + 4095) // 4096 * 4096 for kv, *_ in contexts for k, v in kv
    )
    requests, arrivals = zipf_trace(len(contexts), requests_count, seed=1)
    dram, ssd = int(0.10 * working_set), int(0.30 * working_set)
    checked = {}  # (context, codec) -> whether the returned entry scores as precomputed

    def check(index: int, got) -> None:
        if (index, got.codec) in checked or len(checked) >= VERIFIED_ANSWERS:
            return
        sample, tokens = samples[index]
        score = _answer(model, tokenizer, sample, got, tokens)
        checked[(index, got.codec)] = score == contexts[index][3][got.codec]

    runs = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVPACK_BENCH_DIR")) as directory:
        with kvpack.TieredStore(dram, directory, ssd, o_direct=True) as probe:
            bandwidths = probe.bandwidths
        policies = [(p, 0.0) for p in BASELINES] + [("adaptive", a) for a in ALPHAS]
        step = _progress("store trace replays", len(policies))
        for policy, alpha in policies:
            with kvpack.TieredStore(
                dram,
                directory,
                ssd,
                policy=policy,
                alpha=alpha,
                o_direct=True,
                bandwidths=bandwidths,
            ) as store:
                name = policy if policy != "adaptive" else f"adaptive a={alpha:g}"
                runs[name] = replay(store, contexts, requests, on_hit=check)
            for path in Path(directory).glob("*.kvb"):
                path.unlink()
            step()

    full = np.mean([c[3]["none"] for c in contexts])
    per_codec = ", ".join(
        f"{codec} {100 * np.mean([c[3][codec] for c in contexts]):.0f}"
        for codec in kvpack.store.CODECS
    )
    rows = [
        (
            "store trace on SmolLM2 caches",
            f"{len(contexts)} RULER contexts of {STORE_CONTEXT} tokens without the question "
            f"({working_set / 2**20:.0f} MiB), {requests_count} requests over "
            f"{arrivals[-1]:.0f} s, DRAM {dram / 2**20:.0f} MiB, SSD {ssd / 2**20:.0f} MiB",
            "",
        ),
        ("task score per codec (full cache first)", f"{100 * full:.0f}: {per_codec}", ""),
        (
            "answers decoded from returned entries that score as precomputed",
            f"{sum(checked.values())} of {len(checked)}",
            "all",
        ),
    ]
    rows += replay_rows(runs, "task score")
    rows += compare(runs, target=1.43)
    return rows
