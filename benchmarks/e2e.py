"""generate() end to end on a real model: every kvpack cache against transformers' own.

SmolLM2-135M-Instruct (float32, 30 layers, 9 query / 3 KV heads of 64), a prompt of
seeded random tokens of 4096 and 8160 tokens (8k: with the 17 generated ones it stays
inside the model's 8192-token context), then 16 greedy tokens through
``model.generate``. A logits processor stamps each step, so prefill is the time to the
first token's logits and a decode step the time between two stamps (median; decode
speeds are the best of three rounds, interleaved with their peers', each from one shared
exact prefill). Every ratio is against a peer measured in the same process:

- transformers' DynamicCache with SDPA over the whole prompt (the user's alternative);
- the model's floor: the same decode with a 32-token cache (the weights alone);
- for an eviction method at budget b: SDPA over a b-token cache (what its attention
  could at best cost).

KV memory is the key/value bytes the cache holds after prefill (``stats()["bytes"]``),
counted over the compressed layers and compared with the DynamicCache's same layers.

Last, what a method x budget table costs ``kvpack eval``: a perplexity table (4 methods
x 2 budgets, one 1024-token window) scored from one shared prefill against one prefill
per run, and against one run alone.
"""

from __future__ import annotations

import statistics
import time

from .common import machine

LENGTHS = (4096, 8160)
SHARES = (1 / 16, 1 / 8)
STEPS = 16
ROUNDS = 3


def _generate(model, ids, cache, steps: int, skip: int = 2) -> tuple[float, float, int]:
    """Prefill seconds, median decode ms per token of ``model.generate``, and the KV
    bytes ``cache`` holds in its layers from ``skip`` on once the prompt is in."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    import kvpack.hf

    stamps: list[float] = []
    held: list[int] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            if len(stamps) == 1 and cache is not None:
                held.append(sum(_layer_bytes(layer) for layer in cache.layers[skip:]))
                stamps[0] = time.perf_counter()  # the first step starts now
            return scores

    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **{kvpack.hf.cache_argument(model): cache},
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]),
            pad_token_id=0,
        )
    steps_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, statistics.median(steps_ms), (held or [0])[0]


def _layer_bytes(layer) -> int:
    """Key/value bytes one cache layer holds (a kvpack layer or a DynamicLayer)."""
    if hasattr(layer, "nbytes"):
        return sum(layer.nbytes().values())
    return sum(t.nelement() * t.element_size() for t in (layer.keys, layer.values))


def _best_decode(model, runs: dict, steps: int, rounds: int = ROUNDS) -> dict[str, float]:
    """Per run, the lowest over ``rounds`` interleaved rounds of its median decode ms per
    token: other load on the machine only ever slows a round, and interleaving gives a run
    and its peer the same spells of it. A run is (input ids, a function making its cache)."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (ids, make) in runs.items():
            decode = _generate(model, ids, make(), steps)[1]
            best[name] = min(best.get(name, float("inf")), decode)
    return best


def run(
    lengths: tuple[int, ...] = LENGTHS, shares: tuple[float, ...] = SHARES, steps: int = STEPS
) -> list[tuple[str, str, str]]:
    import torch
    from transformers import DynamicCache

    import kvpack
    from kvpack import hf
    from kvpack.models import load_pretrained

    model, tokenizer = load_pretrained("smollm2-135m")
    model = model.float().eval()
    skip = 2
    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[str, str, str]] = [
        ("machine", machine(), ""),
        ("threads (torch = kvpack: one OpenMP runtime)", f"{torch.get_num_threads()}", ""),
        ("decode times", f"best of {ROUNDS} interleaved rounds, each a median", ""),
    ]

    def sdpa_cache():
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)

    def random_ids(tokens: int):
        return torch.randint(100, 40000, (1, tokens), generator=generator)

    _generate(model, random_ids(64), None, 2)  # warm-up
    floor = _best_decode(model, {"floor": (random_ids(32), sdpa_cache)}, steps)["floor"]
    rows.append(("model floor: decode with a 32-token cache", f"{floor:.1f} ms/token", ""))
    for tokens in lengths:
        ids = random_ids(tokens)
        # Prefill time and memory from a whole generate() each; decode speed from one
        # shared exact prefill, so repeated rounds do not repeat the prompt.
        sdpa_prefill, _, full_bytes = _generate(model, ids, sdpa_cache(), 1, skip)
        shared = hf.prefill(model, ids)
        sdpa = _best_decode(
            model,
            {"sdpa": (shared.next_ids, lambda shared=shared: hf.dynamic_cache(model, shared))},
            steps,
        )["sdpa"]
        rows += [
            (f"{tokens}: SDPA prefill", f"{sdpa_prefill:.2f} s", "reference"),
            (f"{tokens}: SDPA decode", f"{sdpa:.1f} ms/token", "reference"),
            (f"{tokens}: SDPA decode / floor", f"{sdpa / floor:.2f}x", ""),
        ]
        for method in hf.METHODS:
            for share in (1.0,) if method == "full" else shares:
                budget = kvpack.budget_tokens(share, tokens)
                label = f"{tokens}: {method}" + (
                    "" if method == "full" else f" @ 1/{round(1 / share)}"
                )
                cache = hf.make_cache(model, method, budget, skip_layers=skip)
                prefill, _, kept = _generate(model, ids, cache, 1, skip)
                del cache

                def own(method=method, budget=budget, shared=shared):
                    return hf.make_cache(model, method, budget, skip_layers=skip, prefill=shared)

                runs = {"own": (shared.next_ids, own)}
                if method in _evicting():  # its peer: SDPA over a budget-sized cache
                    runs["near"] = (random_ids(budget), sdpa_cache)
                best = _best_decode(model, runs, steps)
                decode = best["own"]
                rows += [
                    (f"{label}: decode", f"{decode:.1f} ms/token", ""),
                    (
                        f"{label}: prefill / SDPA prefill",
                        f"{prefill / sdpa_prefill:.2f}",
                        _prefill_target(method, tokens, share),
                    ),
                    (
                        f"{label}: SDPA decode / its decode",
                        f"{sdpa / decode:.2f}x",
                        _speed_target(method, tokens, share),
                    ),
                    (
                        f"{label}: decode / floor",
                        f"{decode / floor:.2f}",
                        _floor_target(method, tokens, share),
                    ),
                    (
                        f"{label}: KV bytes after prefill / full cache's",
                        f"{kept / full_bytes:.4f}",
                        _memory_target(method, share),
                    ),
                ]
                if "near" in best:
                    rows.append(
                        (
                            f"{label}: decode / SDPA over a {budget}-token cache",
                            f"{decode / best['near']:.2f}",
                            "<= 1.05",
                        )
                    )
                print(f"e2e: {label} done", flush=True)
    # kvpack's regions run on torch's OpenMP workers; one thread for kvpack instead:
    tokens, threads = lengths[-1], kvpack.get_num_threads()
    budget = kvpack.budget_tokens(shares[0], tokens)
    kvpack.set_num_threads(1)
    try:
        decode = _generate(model, ids, hf.make_cache(model, "clusterkv", budget), steps)[1]
    finally:
        kvpack.set_num_threads(threads)
    rows.append(
        (
            f"{tokens}: clusterkv @ {budget} with 1 kvpack thread: decode",
            f"{decode:.1f} ms/token",
            "",
        )
    )
    return rows + _table_cost(model, tokenizer)


DECODE_PROMPT, DECODE_BUDGET, DECODED = 1024, 64, 4096


def run_decode_memory(
    prompt: int = DECODE_PROMPT, budget: int = DECODE_BUDGET, decoded: int = DECODED
) -> list[tuple[str, str, str]]:
    """KV memory of eviction caches over a long generation: ``decoded`` greedy tokens after
    a ``prompt``-token prompt at ``budget`` slots, with ``decode_budget=budget`` (evicting as
    they go) and without (every decoded token kept), against the bytes ``budget`` slots
    take in the compressed layers; and the decode speed of each, against the same cache
    keeping every decoded token and against transformers' DynamicCache with SDPA (which
    keeps the whole prompt and every decoded token)."""
    import torch
    from transformers import DynamicCache

    from kvpack import hf
    from kvpack.models import load_pretrained

    model, _ = load_pretrained("smollm2-135m")
    model = model.float().eval()
    skip, config = 2, model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_slot = (config.num_hidden_layers - skip) * config.num_key_value_heads * 2 * 4 * head_dim
    ids = torch.randint(100, 40000, (1, prompt), generator=torch.Generator().manual_seed(0))
    rows: list[tuple[str, str, str]] = [("machine", machine(), "")]
    decode_ms = {}
    for method, decode_budget in (("h2o", None), ("h2o", budget), ("streaming_llm", budget)):
        cache = hf.make_cache(model, method, budget, skip_layers=skip, decode_budget=decode_budget)
        decode = _generate(model, ids, cache, decoded, skip)[1]
        decode_ms[method, decode_budget] = decode
        held = sum(_layer_bytes(layer) for layer in cache.layers[skip:])
        label = f"{method} @ {budget}" + (
            f", decode_budget {decode_budget}" if decode_budget else ", every decoded token kept"
        )
        rows += [
            (
                f"{label}: KV bytes after {decoded} decoded tokens / {budget} slots' bytes",
                f"{held / (budget * per_slot):.3f}",
                "<= 1.10" if decode_budget else "",
            ),
            (f"{label}: decode", f"{decode:.1f} ms/token", ""),
        ]
        print(f"decode_memory: {label} done", flush=True)
    speedup = decode_ms["h2o", None] / decode_ms["h2o", budget]
    rows.append(
        (f"h2o @ {budget}: decode keeping every token / with decode_budget", f"{speedup:.2f}x", "")
    )
    model.set_attn_implementation("sdpa")
    sdpa_cache = DynamicCache(config=config)
    sdpa = _generate(model, ids, sdpa_cache, decoded, skip)[1]
    held = sum(_layer_bytes(layer) for layer in sdpa_cache.layers[skip:])
    rows += [
        (
            f"DynamicCache + SDPA: KV bytes after {decoded} decoded tokens / {budget} slots' bytes",
            f"{held / (budget * per_slot):.3f}",
            "",
        ),
        ("DynamicCache + SDPA: decode", f"{sdpa:.1f} ms/token", "reference"),
        (
            f"DynamicCache + SDPA decode / h2o @ {budget} with decode_budget",
            f"{sdpa / decode_ms['h2o', budget]:.2f}x",
            "",
        ),
    ]
    return rows


def _table_cost(model, tokenizer) -> list[tuple[str, str, str]]:
    """Seconds of a perplexity table from one shared prefill per window, from one
    prefill per run, and of one run alone (the values must agree)."""
    from kvpack.eval import scoring

    runs = [(m, b) for m in ("full", "h2o", "kvmerger", "clusterkv") for b in (0.5, 0.25)]
    text = dict(context=1024, windows=1, seed=0, tokenizer=tokenizer)
    start = time.perf_counter()
    shared = scoring.perplexity(model, runs=runs, **text)
    shared_s = time.perf_counter() - start
    start = time.perf_counter()
    separate = [scoring.perplexity(model, m, b, **text) for m, b in runs]
    separate_s = time.perf_counter() - start
    if shared != separate:
        raise AssertionError(f"shared prefill changed the values: {shared} vs {separate}")
    one = separate_s / len(runs)
    label = f"eval table ({len(runs)} runs, 1 window of 1024 tokens)"
    return [
        (f"{label}: one prefill per run", f"{separate_s:.1f} s", ""),
        (f"{label}: one shared prefill", f"{shared_s:.1f} s", ""),
        (f"{label}: per-run prefills / shared", f"{separate_s / shared_s:.2f}x", ""),
        (f"{label}: shared table / one run", f"{shared_s / one:.2f}", ""),
    ]


def _prefill_target(method: str, tokens: int, share: float) -> str:
    return "<= 1.15" if method == "clusterkv" and tokens == LENGTHS[-1] and share == 1 / 16 else ""


def _speed_target(method: str, tokens: int, share: float) -> str:
    if method == "full":
        return ">= 1.00"
    if method in ("clusterkv", "quest") and tokens == LENGTHS[-1] and share == 1 / 16:
        return ">= 2.4"
    return ""


def _floor_target(method: str, tokens: int, share: float) -> str:
    return "<= 1.25" if method == "clusterkv" and tokens == LENGTHS[-1] and share == 1 / 16 else ""


def _memory_target(method: str, share: float) -> str:
    """Eviction methods hold their budget: within 10% of budget / prompt."""
    return f"<= {1.10 * share:.4f}" if method in _evicting() else ""


def _evicting() -> list[str]:
    """The methods that keep a budget of the prompt's slots (every compression method but
    the uncompressed reference)."""
    import kvpack

    return [m for m in kvpack.methods.names("compress") if m != "full"]
