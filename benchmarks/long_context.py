"""Long contexts on a hybrid model: every kvpack cache on Gemma 3 270M at 8k to 32k tokens.

Gemma 3 270M (float32; 18 layers, layers 5, 11 and 17 global, the others a 512-token
sliding window; 4 query / 1 KV head of 256). At each length the prompt is a pass-key
prompt (the key halfway in), prefilled once exactly (``kvpack.hf.prefill``) and shared by
every method's cache, as the real_lm suite does; each method keeps its share of the
global layers, the sliding layers their window. Then 8 greedy tokens through
``model.generate`` (decode speed: the best of 2 rounds, each a median, every row's peers
decoded in the same rounds interleaved with it). Every ratio is against a peer measured
in the same process:

- transformers' own cache (DynamicCache, its sliding layers at their window) with SDPA
  over the whole prompt: its prefill and its decode;
- the model's floor: the same decode with a 32-token cache (the weights alone);
- for an eviction method at budget b: SDPA over a b-token cache.

A method's prefill is the shared exact prefill plus its own step over it (compression
with its evidence, or the recall index), which is what its own prefill adds. Memory: the
KV bytes each cache holds after the prompt, against what its budget promises (b slots in
each global layer, the window in each sliding layer), and the process's peak resident
memory over its prefill step and decode. The full cache's answer to the pass key at each
length says where the model itself stops retrieving.
"""

from __future__ import annotations

import time

from .common import machine
from .e2e import _best_decode, _generate, _layer_bytes

LENGTHS = (
    32736,
    16384,
    8192,
)  # the longest first; 32736 + the 9 generated tokens stays in the 32768 context
SHARES = (1 / 16, 1 / 32)
STEPS = 8
ROUNDS = 2


def _peak_reset() -> None:
    """Starts a new peak of this process's resident memory (Linux's clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run(
    lengths: tuple[int, ...] = LENGTHS, shares: tuple[float, ...] = SHARES, steps: int = STEPS
) -> list[tuple[str, str, str]]:
    import numpy as np
    import torch
    from transformers import DynamicCache

    import kvpack
    from kvpack import hf
    from kvpack.eval.ruler import make_sample
    from kvpack.models import load_pretrained

    start = time.perf_counter()
    model, tokenizer = load_pretrained("gemma3-270m")
    config = model.config
    kinds = config.layer_types
    global_layers = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    slot_bytes = config.num_key_value_heads * config.head_dim * 2 * 4  # keys + values, fp32
    window_bytes = (len(kinds) - len(global_layers)) * (config.sliding_window - 1) * slot_bytes
    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[str, str, str]] = [
        ("machine", machine(), ""),
        ("threads", f"{torch.get_num_threads()}", ""),
        ("decode times", f"best of {ROUNDS} interleaved rounds, each a median", ""),
    ]

    def sdpa_cache():
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=config)

    def random_ids(tokens: int):
        return torch.randint(100, 200000, (1, tokens), generator=generator)

    _generate(model, random_ids(64), None, 2)  # warm-up
    floor_ids = random_ids(32)
    floors: list[float] = []
    for tokens in lengths:
        sample = make_sample("passkey", tokenizer, tokens, np.random.default_rng(tokens), 0.5)
        ids = torch.tensor([sample.prompt])
        _peak_reset()
        sdpa_prefill, _, sdpa_bytes = _generate(model, ids, sdpa_cache(), 1, 0)
        sdpa_peak = _peak_gib()
        began = time.perf_counter()
        shared = hf.prefill(model, ids)
        exact_prefill = time.perf_counter() - began
        sdpas: list[float] = []
        rows += [
            (f"{tokens}: SDPA prefill", f"{sdpa_prefill:.1f} s", "reference"),
            (f"{tokens}: SDPA prefill peak memory", f"{sdpa_peak:.2f} GiB", ""),
            (f"{tokens}: SDPA KV bytes", f"{sdpa_bytes / 2**20:.1f} MiB", ""),
            (
                f"{tokens}: kvpack exact prefill / SDPA prefill",
                f"{exact_prefill / sdpa_prefill:.2f}",
                "",
            ),
        ]
        for method in hf.METHODS:
            for share in (1.0,) if method == "full" else shares:
                budget = kvpack.budget_tokens(share, tokens)
                label = f"{tokens}: {method}" + (
                    "" if method == "full" else f" @ 1/{round(1 / share)}"
                )
                _peak_reset()
                began = time.perf_counter()
                cache = hf.make_cache(model, method, budget, prefill=shared)
                step = time.perf_counter() - began
                held = sum(_layer_bytes(layer) for layer in cache.layers)
                if method == "full":
                    answer = _answer(model, shared, cache, tokenizer, sample.max_new_tokens)
                    rows.append((f"{tokens}: full cache's pass key", answer.strip(), ""))
                    rows.append((f"{tokens}: the key", sample.answers[0], ""))
                peak = _peak_gib()
                del cache

                def own(method=method, budget=budget, shared=shared):
                    return hf.make_cache(model, method, budget, prefill=shared)

                # Its peers in the same rounds, so a change of the machine's load meets
                # them all alike: SDPA over the whole prompt, the floor, SDPA over b.
                runs = {
                    "own": (shared.next_ids, own),
                    "sdpa": (shared.next_ids, lambda s=shared: hf.dynamic_cache(model, s)),
                    "floor": (floor_ids, sdpa_cache),
                }
                if method in _evicting():
                    runs["near"] = (random_ids(budget), sdpa_cache)
                best = _best_decode(model, runs, steps, ROUNDS)
                decode, sdpa, floor = best["own"], best["sdpa"], best["floor"]
                sdpas.append(sdpa)
                floors.append(floor)
                promised = window_bytes + len(global_layers) * min(budget, tokens) * slot_bytes
                prefill = exact_prefill + step
                rows += [
                    (f"{label}: decode", f"{decode:.1f} ms/token", ""),
                    (
                        f"{label}: SDPA decode / its decode",
                        f"{sdpa / decode:.2f}x",
                        _speed_target(method, tokens),
                    ),
                    (
                        f"{label}: decode / floor",
                        f"{decode / floor:.2f}",
                        _floor_target(method, tokens, share),
                    ),
                    (
                        f"{label}: prefill / SDPA prefill",
                        f"{prefill / sdpa_prefill:.2f}",
                        _prefill_target(method, tokens),
                    ),
                    (
                        f"{label}: KV bytes / promised",
                        f"{held / promised:.3f}",
                        _memory_target(method),
                    ),
                    (f"{label}: peak memory", f"{peak:.2f} GiB", ""),
                ]
                if "near" in best:
                    rows.append(
                        (
                            f"{label}: decode / SDPA over a {budget}-token cache",
                            f"{decode / best['near']:.2f}",
                            "<= 1.10" if tokens == max(lengths) else "",
                        )
                    )
                print(f"long_context: {label} done", flush=True)
        rows.append(
            (f"{tokens}: SDPA decode (best of its rounds)", f"{min(sdpas):.1f} ms/token", "")
        )
        del shared
    rows.append(("model floor: decode with a 32-token cache", f"{min(floors):.1f} ms/token", ""))
    minutes = (time.perf_counter() - start) / 60
    rows.append(("suite wall time (minutes)", f"{minutes:.1f}", "reported"))
    return rows


def _answer(model, shared, cache, tokenizer, new_tokens: int) -> str:
    """What ``cache`` (started from ``shared``) answers: its greedy continuation, decoded."""
    import torch

    from kvpack import hf

    with torch.inference_mode():
        out = model.generate(
            shared.next_ids,
            attention_mask=torch.ones_like(shared.next_ids),
            **{hf.cache_argument(model): cache},
            max_new_tokens=new_tokens - 1,
            do_sample=False,
            pad_token_id=0,
        )
    return tokenizer.decode(out[0, shared.tokens :])


def _speed_target(method: str, tokens: int) -> str:
    return ">= 1.00" if method == "full" and tokens == max(LENGTHS) else ""


def _floor_target(method: str, tokens: int, share: float) -> str:
    recall = method in ("clusterkv", "quest") and share == 1 / 16
    return "<= 1.15" if recall and tokens == max(LENGTHS) else ""


def _prefill_target(method: str, tokens: int) -> str:
    # Every method but the uncompressed one adds a step to the prefill: its evidence and
    # compression, its recall index, or its quantization.
    return "<= 1.15" if method != "full" and tokens == max(LENGTHS) else ""


def _memory_target(method: str) -> str:
    return "<= 1.10" if method in _evicting() else ""


def _evicting() -> list[str]:
    import kvpack

    return [m for m in kvpack.methods.names("compress") if m != "full"]
