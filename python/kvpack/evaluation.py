"""Quality of a method on a real model: pass-key accuracy and perplexity.

Both run a Hugging Face causal LM through :func:`kvpack.hf.make_cache` (``"dynamic"``
is the plain transformers ``DynamicCache``, the full-cache reference) on byte-level
prompts of :mod:`kvpack.models.tasks`, so they suit the shipped tiny LM and any model
whose tokens are bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .models import tasks

__all__ = ["fidelity", "lm_contexts", "passkey_accuracy", "perplexity"]

Progress = Callable[[int], None]


def _cache(model, method: str, budget, skip_layers: int, options: dict | None = None):
    from transformers import DynamicCache

    if method == "dynamic":
        return DynamicCache(config=model.config)
    from . import hf

    return hf.make_cache(model, method, budget, skip_layers=skip_layers, **(options or {}))


def passkey_accuracy(
    model,
    method: str = "dynamic",
    budget: int | float = 1.0,
    *,
    context: int = 2048,
    prompts: int = 20,
    batch: int = 4,
    seed: int = 0,
    filler: str = "repeat",
    skip_layers: int = 2,
    options: dict | None = None,
    progress: Progress | None = None,
) -> float:
    """Share of pass-key prompts whose five digits greedy decoding gets right.

    Parameters
    ----------
    model : transformers causal LM over byte tokens
    method : str
        ``"dynamic"`` or one of :data:`kvpack.hf.METHODS`.
    budget : int or float
        Tokens (or fraction of the prompt) the method keeps or recalls.
    context : int
        Tokens per prompt, answer included.
    prompts : int
        Prompts, the key at evenly spaced depths from start to end.
    batch : int
        Prompts per ``generate`` call.
    seed : int
        Seed of the keys and haystacks; equal seeds give equal prompts for every method.
    filler : {"repeat", "text"}
        Haystack of repeated filler sentences, or held-out natural text.
    skip_layers : int
        First layers the method leaves uncompressed (see :func:`kvpack.hf.make_cache`).
    options : dict, optional
        The method's options (e.g. ``{"n_clusters": 256}`` for ClusterKV).
    progress : callable, optional
        Called with the number of prompts done after each batch.
    """
    import torch

    if filler not in ("repeat", "text"):
        raise ValueError(f"filler: expected 'repeat' or 'text', got {filler!r}")
    if prompts < 1 or batch < 1:
        raise ValueError(f"prompts and batch: expected at least 1, got {prompts}, {batch}")
    rng = np.random.default_rng(seed)
    text = tasks.corpus().held_out if filler == "text" else None
    samples = [
        tasks.passkey_sample(rng, context, text, depth=i / max(1, prompts - 1))
        for i in range(prompts)
    ]
    correct = 0
    for first in range(0, prompts, batch):
        chunk = samples[first : first + batch]
        ids = torch.tensor([s[0][: s[1]] for s in chunk])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=_cache(model, method, budget, skip_layers, options),
                max_new_tokens=7,
                do_sample=False,
                pad_token_id=tasks.PAD,
            )
        for row, (_, _, key) in zip(out[:, ids.shape[1] :].tolist(), chunk):
            correct += tasks.decode(row).strip().startswith(key)
        if progress:
            progress(len(chunk))
    return correct / prompts


def perplexity(
    model,
    method: str = "dynamic",
    budget: int | float = 1.0,
    *,
    context: int = 2048,
    prefix: float = 0.75,
    windows: int = 8,
    seed: int = 0,
    skip_layers: int = 2,
    options: dict | None = None,
    progress: Progress | None = None,
) -> float:
    """Per-byte perplexity of held-out text after the method compressed its prefix.

    Each window of ``context`` held-out bytes is split: the first ``prefix`` share is
    the prompt (prefilled, then compressed), the rest is scored token by token in one
    forward over the compressed cache. ``options`` go to the method (e.g.
    ``{"log_count_bias": True}`` for KVMerger); the other arguments are as in
    :func:`passkey_accuracy`.
    """
    import torch

    held_out = tasks.corpus().held_out
    split = round(prefix * context)
    if not 1 <= split <= context - 2:
        raise ValueError(
            f"prefix: {prefix} of {context} tokens leaves no prompt or nothing to score"
        )
    if windows < 1:
        raise ValueError(f"windows: expected at least 1, got {windows}")
    if context >= held_out.size:
        raise ValueError(f"context: {context} exceeds the held-out text ({held_out.size} bytes)")
    rng = np.random.default_rng(seed)
    total, count = 0.0, 0
    for start in rng.integers(0, held_out.size - context, size=windows):
        ids = torch.tensor([[tasks.BOS, *held_out[start : start + context - 1].tolist()]])
        cache = _cache(model, method, budget, skip_layers, options)
        with torch.no_grad():
            first = model(ids[:, :split], past_key_values=cache, use_cache=True).logits[:, -1:]
            rest = model(ids[:, split:-1], past_key_values=cache, use_cache=True).logits
        logits = torch.cat([first, rest], dim=1)
        nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, split:], reduction="sum")
        total, count = total + float(nll), count + ids.shape[1] - split
        if progress:
            progress(1)
    return math.exp(total / count)


def fidelity(layers, method: str, budget: int | float, *, observe: int = 32) -> float:
    """Mean attention-output relative error of one decode step per layer.

    The last query of each layer attends the cache of the tokens before it, compressed
    or recalled by ``method``; the reference is dense attention over all of them.

    Parameters
    ----------
    layers : list of kvpack.data.LayerKV (or objects with queries, keys, values)
        Queries (heads_q, tokens, d), keys and values (heads_kv, tokens, d).
    method : str
        ``"full"``, a :data:`kvpack.METHODS` compression, ``"clusterkv"``, ``"quest"``
        or ``"kivi"`` (``budget`` = full-precision tokens, 2-bit codes).
    budget : int or float
        Tokens kept or recalled, or a fraction of the context.
    observe : int
        Prompt queries before the step the compression methods rank keys by.
    """
    from .attention import attention
    from .clustering import ClusterKV
    from .compression import compress
    from .quantization import quantize

    errors = []
    for layer in layers:
        keys = np.ascontiguousarray(layer.keys[:, :-1])
        values = np.ascontiguousarray(layer.values[:, :-1])
        q = np.ascontiguousarray(layer.queries[:, -1])
        tokens = keys.shape[1]
        slots = budget if isinstance(budget, int) else max(1, round(budget * tokens))
        if slots > tokens:
            raise ValueError(f"budget: {slots} tokens exceed the context of {tokens}")
        dense = attention(q, keys, values)
        if method in ("clusterkv", "quest"):
            recall = ClusterKV(slots, method)
            head = (np.ascontiguousarray(x[:, :-1]) for x in (keys, values))
            recall.prefill(*head)
            out = recall.step(
                q, np.ascontiguousarray(keys[:, -1]), np.ascontiguousarray(values[:, -1])
            )
        elif method == "kivi":
            out = quantize(keys, values, 2, residual=slots).attend(q)
        else:
            window = np.ascontiguousarray(layer.queries[:, -1 - observe : -1])
            out = compress(keys, values, method, slots, queries=window).attend(q)
        errors.append(np.linalg.norm(out - dense) / np.linalg.norm(dense))
    return float(np.mean(errors))


def lm_contexts(model, count: int, tokens: int = 1024):
    """Prompt caches of ``model`` on consecutive held-out text windows, for
    :func:`kvpack.store.replay`: (kv as float16 per layer, None, prefill seconds).

    No probe queries are recorded, so the store scores each codec on each layer's last
    keys (its own stand-in).
    """
    import time

    import torch

    text = tasks.corpus().held_out
    if count * tokens > text.size:
        raise ValueError(f"count: {count} windows of {tokens} exceed the held-out text")
    contexts = []
    for i in range(count):
        ids = torch.tensor([tasks.encode(text[i * tokens : (i + 1) * tokens - 1].tobytes())])
        start = time.perf_counter()
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        seconds = time.perf_counter() - start
        kv = [
            (layer.keys[0].numpy().astype(np.float16), layer.values[0].numpy().astype(np.float16))
            for layer in cache.layers
        ]
        contexts.append((kv, None, seconds))
    return contexts
