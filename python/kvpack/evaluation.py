"""Quality of a method on a real model: pass-key accuracy, perplexity, and perplexity
of the tokens that need the distant context.

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

__all__ = [
    "context_dependent_tokens",
    "fidelity",
    "lm_contexts",
    "long_context_perplexity",
    "passkey_accuracy",
    "perplexity",
]

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


# Held-out bytes read per window when a tokenizer cuts it: enough for `context` tokens of
# any subword vocabulary (they hold 2-5 bytes of text on average).
_BYTES_PER_TOKEN = 8


def _text_windows(context: int, prefix: float, windows: int, seed: int, tokenizer=None):
    """Held-out windows of ``context`` tokens and the prompt length ``split``: bytes with
    BOS first, or the tokenizer's ids (its BOS first when it has one)."""
    import torch

    held_out = tasks.corpus().held_out
    split = round(prefix * context)
    if not 1 <= split <= context - 2:
        raise ValueError(
            f"prefix: {prefix} of {context} tokens leaves no prompt or nothing to score"
        )
    if windows < 1:
        raise ValueError(f"windows: expected at least 1, got {windows}")
    span = context if tokenizer is None else _BYTES_PER_TOKEN * context
    if span >= held_out.size:
        raise ValueError(f"context: {context} exceeds the held-out text ({held_out.size} bytes)")
    rng = np.random.default_rng(seed)
    texts = []
    for start in rng.integers(0, held_out.size - span, size=windows):
        if tokenizer is None:
            ids = [tasks.BOS, *held_out[start : start + context - 1].tolist()]
        else:
            text = held_out[start : start + span].tobytes().decode("utf-8", errors="replace")
            bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
            ids = bos + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) < context:
                raise ValueError(
                    f"context: {span} held-out bytes give only {len(ids)} tokens, not {context}"
                )
        texts.append(torch.tensor([ids[:context]]))
    return split, texts


def _token_losses(model, ids, split: int, cache) -> np.ndarray:
    """Negative log-likelihood (nats) of tokens ``split..`` of ``ids``: the prompt
    ``ids[:, :split]`` is prefilled into ``cache`` (which compresses it), the rest is
    scored in one forward over that cache."""
    import torch

    with torch.no_grad():
        first = model(ids[:, :split], past_key_values=cache, use_cache=True).logits[:, -1:]
        rest = model(ids[:, split:-1], past_key_values=cache, use_cache=True).logits
    logits = torch.cat([first, rest], dim=1)
    nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, split:], reduction="none")
    return nll.numpy().astype(np.float64)


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
    tokenizer=None,
    progress: Progress | None = None,
) -> float:
    """Per-token perplexity of held-out text after the method compressed its prefix.

    Each window of ``context`` held-out bytes is split: the first ``prefix`` share is
    the prompt (prefilled, then compressed), the rest is scored token by token in one
    forward over the compressed cache. ``options`` go to the method (e.g.
    ``{"log_count_bias": True}`` for KVMerger); the other arguments are as in
    :func:`passkey_accuracy`. Tokens are bytes (the shipped tiny LM), or the ids of
    ``tokenizer`` (a transformers tokenizer of ``model``; windows are then ``context``
    of its tokens).

    Most bytes of text are predicted from the last few hundred, which every method
    keeps: see :func:`long_context_perplexity` for the bytes that need the prompt.
    """
    split, texts = _text_windows(context, prefix, windows, seed, tokenizer)
    losses = []
    for ids in texts:
        cache = _cache(model, method, budget, skip_layers, options)
        losses.append(_token_losses(model, ids, split, cache))
        if progress:
            progress(1)
    return math.exp(np.concatenate(losses).mean())


def context_dependent_tokens(
    model,
    *,
    context: int = 2048,
    prefix: float = 0.75,
    windows: int = 16,
    seed: int = 0,
    short: int = 128,
    gain: float = 2.0,
    max_loss: float = 2.0,
    tokenizer=None,
) -> list[np.ndarray]:
    """The scored tokens of :func:`perplexity`'s windows that depend on the distant prompt.

    A token counts when the full prompt lowers its loss by at least ``gain`` nats
    against a prompt cut to its last ``short`` tokens, and the full prompt predicts it
    well (loss at most ``max_loss``): the key tokens of LongPPL (Fang et al., 2025,
    with its thresholds 2 and 2), with the model as its own evaluator. ``tokenizer`` as
    in :func:`perplexity`.

    Returns
    -------
    list of ndarray of bool, one per window, shape (context - split,)
        ``True`` where the token at ``split + i`` depends on the distant prompt.
    """
    split, texts = _text_windows(context, prefix, windows, seed, tokenizer)
    if not 1 <= short < split - 1:
        raise ValueError(f"short: expected 1..{split - 2} prompt tokens, got {short}")
    masks = []
    for ids in texts:
        full = _token_losses(model, ids, split, _cache(model, "dynamic", 1.0, 0))
        cut = np.concatenate(([0], np.arange(split - short, ids.shape[1])))
        near = _token_losses(model, ids[:, cut], short + 1, _cache(model, "dynamic", 1.0, 0))
        masks.append((near - full >= gain) & (full <= max_loss))
    return masks


def long_context_perplexity(
    model,
    method: str = "dynamic",
    budget: int | float = 1.0,
    *,
    context: int = 2048,
    prefix: float = 0.75,
    windows: int = 16,
    seed: int = 0,
    skip_layers: int = 2,
    key_tokens: list[np.ndarray] | None = None,
    options: dict | None = None,
    tokenizer=None,
) -> float:
    """Perplexity of the tokens that depend on the distant prompt, after the method
    compressed the prompt: what compression can lose, without the bytes every method
    predicts from its recent window.

    Parameters are as in :func:`perplexity`; ``key_tokens`` are
    :func:`context_dependent_tokens` for the same windows (computed with its defaults
    when not given; pass them to score several methods on one selection).
    """
    if key_tokens is None:
        key_tokens = context_dependent_tokens(
            model, context=context, prefix=prefix, windows=windows, seed=seed, tokenizer=tokenizer
        )
    split, texts = _text_windows(context, prefix, windows, seed, tokenizer)
    if len(key_tokens) != windows or any(m.shape != (context - split,) for m in key_tokens):
        raise ValueError(
            f"key_tokens: expected {windows} masks of {context - split} tokens "
            "(context_dependent_tokens with the same context, prefix and windows)"
        )
    if not any(m.any() for m in key_tokens):
        raise ValueError("key_tokens: no token depends on the distant prompt; use more windows")
    losses = []
    for ids, mask in zip(texts, key_tokens):
        if mask.any():
            cache = _cache(model, method, budget, skip_layers, options)
            losses.append(_token_losses(model, ids, split, cache)[mask])
    return math.exp(np.concatenate(losses).mean())


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
