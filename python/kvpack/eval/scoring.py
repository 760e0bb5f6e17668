"""Quality of a method on a real model: pass-key accuracy, RULER-style task scores,
perplexity, the perplexity of the tokens that need the distant prompt, and attention
fidelity.

The model-level measures run a Hugging Face causal LM through
:func:`kvpack.hf.make_cache` on held-out text and prompts of :mod:`kvpack.eval.tasks`.
The method ``"full"`` is the uncompressed reference: by default (``reference=
"transformers"``) transformers' own ``DynamicCache``, independent of kvpack; with
``reference="kvpack"`` kvpack's cache layers keeping every token, the path every other
method takes (the two agree to float rounding).
Pass-key prompts are bytes (the shipped tiny LM, or any model whose tokens are bytes);
the perplexities also take a subword model with its tokenizer.

Given ``runs``, a sequence of (method, budget) or (method, budget, options), each measure
scores all of them at once: each prompt is prefilled exactly once (:func:`kvpack.hf.prefill`)
and every run compresses its own copy of that prefill, so a method x budget table costs one
prefill per prompt. A run's ``options`` are :func:`kvpack.hf.make_cache` keyword arguments
of its own (e.g. ``{"layer_budgets": "pyramid"}``), over the measure's ``options``. It then
returns one result per run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..models.byte_tokenizer import BOS, PAD, decode, encode
from . import tasks

__all__ = [
    "TASKS",
    "Task",
    "bootstrap_interval",
    "context_dependent_tokens",
    "fidelity",
    "headline",
    "lm_contexts",
    "passkey_accuracy",
    "perplexity",
    "ruler_scores",
    "score_task",
]

Progress = Callable[[int], None]


def _runs(method, budget, runs) -> list:
    """The (method, budget, options) runs a measure scores: ``runs`` when given, checked
    (options {} where a run gives none), else the one run of ``method`` at ``budget``."""
    if runs is None:
        return [(method, budget, {})]
    runs = list(runs)
    if not runs or not all(
        isinstance(r, (tuple, list)) and (len(r) == 2 or (len(r) == 3 and isinstance(r[2], dict)))
        for r in runs
    ):
        raise ValueError(
            "runs: expected a non-empty sequence of (method, budget) or (method, budget, "
            f"options dict), got {runs!r}"
        )
    return [(r[0], r[1], dict(r[2]) if len(r) == 3 else {}) for r in runs]


REFERENCES = ("transformers", "kvpack")


@dataclass(frozen=True)
class _Caches:
    """How every run's cache is made, besides its method and budget."""

    skip_layers: int = 0  # first layers left uncompressed
    options: dict | None = None  # the method's options, for make_cache
    reference: str = "transformers"  # what holds the "full" runs' cache: REFERENCES

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(
                f"reference: expected 'transformers' or 'kvpack', got {self.reference!r}"
            )

    def argument(self, model, method, budget, prefill, run_options=None) -> dict:
        """The keyword argument that hands ``model`` a fresh cache of ``method``, started
        from ``prefill`` (a :class:`kvpack.hf.Prefill`); ``run_options`` are the run's own
        make_cache arguments, over the shared ``options``."""
        from .. import hf

        if isinstance(method, str) and method == "full" and self.reference == "transformers":
            cache = hf.dynamic_cache(model, prefill)
        else:
            options = {**(self.options or {}), **(run_options or {})}
            cache = hf.make_cache(
                model, method, budget, skip_layers=self.skip_layers, prefill=prefill, **options
            )
        return {hf.cache_argument(model): cache}


def _generate_runs(model, ids, mask, runs, caches: _Caches, max_new_tokens: int, pad: int):
    """Greedy continuations of the prompts ``ids`` for every run, from one exact prefill:
    a list (one per run) of (batch, max_new_tokens) token tensors."""
    import torch

    from .. import hf

    shared = hf.prefill(model, ids, mask)
    outputs = []
    for method, budget, options in runs:
        if max_new_tokens == 1:
            outputs.append(shared.next_ids[:, -1:])
            continue
        with torch.no_grad():
            out = model.generate(
                shared.next_ids,
                attention_mask=shared.next_attention_mask,
                **caches.argument(model, method, budget, shared, options),
                max_new_tokens=max_new_tokens - 1,
                do_sample=False,
                pad_token_id=pad,
            )
        outputs.append(out[:, ids.shape[1] :])
    return outputs


def passkey_accuracy(
    model,
    method: str = "full",
    budget: int | float = 1.0,
    *,
    context: int = 2048,
    prompts: int = 20,
    batch: int = 4,
    seed: int = 0,
    filler: str = "repeat",
    skip_layers: int = 2,
    options: dict | None = None,
    reference: str = "transformers",
    progress: Progress | None = None,
    runs=None,
) -> float | list[float]:
    """Share of pass-key prompts whose five digits greedy decoding gets right.

    Parameters
    ----------
    model : transformers causal LM over byte tokens
    method : str or kvpack.methods object
        One of :data:`kvpack.hf.METHODS`; ``"full"`` is the uncompressed reference.
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
    reference : {"transformers", "kvpack"}
        What holds the cache of ``"full"`` runs: transformers' ``DynamicCache`` (the
        reference independent of kvpack), or kvpack's cache layers keeping every token.
    progress : callable, optional
        Called with the number of prompts (times runs) done after each batch.
    runs : sequence of (method, budget) or (method, budget, options), optional
        Score these runs instead of ``method`` at ``budget``, each prompt prefilled once
        for all of them; a list of results is returned, one per run.
    """
    kwargs = dict(context=context, prompts=prompts, batch=batch, seed=seed, filler=filler)
    caches = _Caches(skip_layers, options, reference)
    scores = _passkey(model, _runs(method, budget, runs), caches, progress, **kwargs)
    return scores if runs is not None else scores[0]


def _passkey(
    model, runs, caches, progress, *, context, prompts, batch, seed, filler
) -> list[float]:
    """:func:`passkey_accuracy` of every run, one prefill per batch of prompts."""
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
    correct = np.zeros(len(runs))
    for first in range(0, prompts, batch):
        chunk = samples[first : first + batch]
        ids = torch.tensor([s[0][: s[1]] for s in chunk])
        outputs = _generate_runs(model, ids, torch.ones_like(ids), runs, caches, 7, PAD)
        for r, out in enumerate(outputs):
            for row, (_, _, key) in zip(out.tolist(), chunk):
                correct[r] += decode(row).strip().startswith(key)
        if progress:
            progress(len(chunk) * len(runs))
    return [float(c) / prompts for c in correct]


def _check_tokenizer(tokenizer) -> None:
    if not (callable(tokenizer) and hasattr(tokenizer, "bos_token_id")):
        raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer)}")


def ruler_scores(
    model,
    tokenizer,
    method: str = "full",
    budget: int | float = 1.0,
    *,
    tasks=None,
    context: int = 2048,
    samples: int = 4,
    seed: int = 0,
    skip_layers: int = 2,
    options: dict | None = None,
    reference: str = "transformers",
    progress: Progress | None = None,
    runs=None,
) -> dict | list[dict]:
    """RULER-style task scores of a subword model decoding from ``method``'s cache.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : transformers tokenizer
        ``model``'s own: prompts are built from its tokens (:mod:`kvpack.eval.ruler`).
    method : str
        One of :data:`kvpack.hf.METHODS`; ``"full"`` is the uncompressed reference.
    budget : int or float
        Tokens (or fraction of the prompt) the method keeps or recalls.
    tasks : sequence of str, optional
        Of :data:`kvpack.eval.ruler.TASKS` (default all).
    context : int
        Prompt tokens.
    samples : int
        Prompts per task; needles at depths evenly spread from start to end.
    seed : int
        Equal seeds give equal prompts for every method.
    skip_layers : int
        First layers the method leaves uncompressed.
    options : dict, optional
        The method's options.
    reference : {"transformers", "kvpack"}
        What holds the cache of ``"full"`` runs: transformers' ``DynamicCache`` (the
        reference independent of kvpack), or kvpack's cache layers keeping every token.
    progress : callable, optional
        Called after each prompt with the runs scored on it (1 without ``runs``).
    runs : sequence of (method, budget) or (method, budget, options), optional
        Score these runs instead of ``method`` at ``budget``, each prompt prefilled once
        for all of them; a list of results is returned, one per run.

    Returns
    -------
    dict
        Task name -> mean score in [0, 1] (RULER's string match: the share of expected
        answers in the output), ``"average"`` over the tasks, and ``"prompts"``: task
        name -> each prompt's score, for :func:`bootstrap_interval`.
    """
    kwargs = dict(tasks=tasks, context=context, samples=samples, seed=seed)
    caches = _Caches(skip_layers, options, reference)
    scores = _ruler(model, tokenizer, _runs(method, budget, runs), caches, progress, **kwargs)
    return scores if runs is not None else scores[0]


def _ruler(
    model, tokenizer, runs, caches, progress, *, tasks, context, samples, seed
) -> list[dict]:
    """:func:`ruler_scores` of every run, one prefill per prompt."""
    import torch

    from . import ruler

    tasks = tuple(ruler.TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown or not tasks:
        raise ValueError(
            f"tasks: expected some of {', '.join(ruler.TASKS)}, got {unknown or tasks}"
        )
    if samples < 1:
        raise ValueError(f"samples: expected at least 1, got {samples}")
    _check_tokenizer(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = [{} for _ in runs]
    per_prompt = [{task: [] for task in tasks} for _ in runs]
    for index, task in enumerate(tasks):
        for i in range(samples):
            rng = np.random.default_rng([seed, index, i])
            depth = i / max(1, samples - 1)
            sample = ruler.make_sample(task, tokenizer, context, rng, depth=depth)
            ids = torch.tensor([sample.prompt])
            outputs = _generate_runs(
                model, ids, torch.ones_like(ids), runs, caches, sample.max_new_tokens, pad,
            )  # fmt: skip
            for r, out in enumerate(outputs):
                answer = tokenizer.decode(out[0], skip_special_tokens=True)
                per_prompt[r][task].append(ruler.score(answer, sample.answers))
            if progress:
                progress(len(runs))
        for r in range(len(runs)):
            scores[r][task] = float(np.mean(per_prompt[r][task]))
    for run_scores, prompts in zip(scores, per_prompt):
        run_scores["average"] = float(np.mean([run_scores[t] for t in tasks]))
        run_scores["prompts"] = prompts
    return scores


def bootstrap_interval(
    scores: dict, baseline: dict | None = None, *, confidence: float = 0.95,
    resamples: int = 10000, seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """A percentile bootstrap interval of a task average over its prompts.

    ``scores`` maps each task to its prompts' scores (``ruler_scores(...)["prompts"]``);
    the average is the mean over tasks of each task's mean. Each resample draws every
    task's prompts again with replacement, within the task, so each task keeps its
    weight. With ``baseline`` (another run's scores on the same prompts) the interval
    is of the difference ``scores - baseline``, prompt by prompt: paired, as the claim
    "within x points of the full cache" needs.

    Returns
    -------
    (low, high) : tuple of float
        In the scores' units, at ``confidence``.
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores: expected a dict of task -> prompt scores, got none")
    if baseline is not None and (
        not isinstance(baseline, dict)
        or baseline.keys() != scores.keys()
        or any(len(baseline[t]) != len(scores[t]) for t in scores)
    ):
        raise ValueError("baseline: expected the same tasks and prompt counts as scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples: expected at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    averages = np.zeros(resamples)
    for task, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"scores: task {task!r}: expected a list of prompt scores")
        if baseline is not None:
            values = values - np.asarray(baseline[task], dtype=np.float64)
        drawn = rng.integers(0, values.size, size=(resamples, values.size))
        averages += values[drawn].mean(axis=1)
    averages /= len(scores)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(averages, [tail, 100 - tail])
    return float(low), float(high)


# The perplexity windows' defaults: the prompt's share of a window, and the prompt tokens
# the short context of context_dependent_tokens keeps.
PROMPT_SHARE = 0.75
SHORT_PROMPT = 128

# Held-out bytes read per window when a tokenizer cuts it: enough for `context` tokens of
# any subword vocabulary (they hold 2-5 bytes of text on average).
_BYTES_PER_TOKEN = 8


@dataclass
class _Windows:
    texts: list  # token ids, torch tensors of shape (1, context)
    split: int  # prompt length: tokens [0, split) are compressed, the rest scored
    head: int  # leading BOS tokens (0 or 1), kept when a prompt is cut short


def _text_windows(context: int, prefix: float, windows: int, seed: int, tokenizer=None):
    """Held-out windows of ``context`` tokens: bytes with BOS first, or the tokenizer's
    ids (its BOS first when it has one)."""
    import torch

    held_out = tasks.corpus().held_out
    split = round(prefix * context)
    if not 1 <= split <= context - 2:
        raise ValueError(
            f"prefix: {prefix} of {context} tokens leaves no prompt or nothing to score"
        )
    if windows < 1:
        raise ValueError(f"windows: expected at least 1, got {windows}")
    if tokenizer is not None:
        _check_tokenizer(tokenizer)
    span = context if tokenizer is None else _BYTES_PER_TOKEN * context
    if span >= held_out.size:
        raise ValueError(
            f"context: {context} tokens need {span} held-out bytes; the text has {held_out.size}"
        )
    if tokenizer is None:
        bos = [BOS]
    else:
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rng = np.random.default_rng(seed)
    texts = []
    for start in rng.integers(0, held_out.size - span, size=windows):
        if tokenizer is None:
            ids = held_out[start : start + context - 1].tolist()
        else:
            text = held_out[start : start + span].tobytes().decode("utf-8", errors="replace")
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(bos) + len(ids) < context:
                raise ValueError(
                    f"context: {context} tokens: {span} held-out bytes give only "
                    f"{len(bos) + len(ids)}"
                )
        texts.append(torch.tensor([(bos + ids)[:context]]))
    return _Windows(texts, split, len(bos))


def _token_losses(model, ids, split: int, runs, caches: _Caches) -> list:
    """Negative log-likelihood (nats) of tokens ``split..`` of ``ids`` for every run: the
    prompt ``ids[:, :split]`` is prefilled once, each run's cache compresses its copy, and
    the rest is scored in one forward over it. One array per run."""
    import torch

    from .. import hf

    shared = hf.prefill(model, ids[:, :split])
    losses = []
    for method, budget, options in runs:
        cache = caches.argument(model, method, budget, shared, options)
        with torch.no_grad():
            rest = model(ids[:, split:-1], **cache, use_cache=True).logits
        logits = torch.cat([shared.logits[:, None].to(rest.dtype), rest], dim=1)
        nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, split:], reduction="none")
        losses.append(nll.numpy().astype(np.float64))
    return losses


def _perplexity_over(model, runs, windows: _Windows, masks, caches, progress) -> list[float]:
    """exp(mean loss) per run of the scored tokens each mask selects (all where None)."""
    losses = [[] for _ in runs]
    for ids, mask in zip(windows.texts, masks or [None] * len(windows.texts)):
        if mask is None or mask.any():
            for r, loss in enumerate(_token_losses(model, ids, windows.split, runs, caches)):
                losses[r].append(loss if mask is None else loss[mask])
        if progress:
            progress(len(runs))
    return [math.exp(np.concatenate(run).mean()) for run in losses]


def perplexity(
    model,
    method: str = "full",
    budget: int | float = 1.0,
    *,
    context: int = 2048,
    prefix: float = PROMPT_SHARE,
    windows: int = 8,
    seed: int = 0,
    skip_layers: int = 2,
    scored: list[np.ndarray] | None = None,
    options: dict | None = None,
    reference: str = "transformers",
    tokenizer=None,
    progress: Progress | None = None,
    runs=None,
) -> float | list[float]:
    """Per-token perplexity of held-out text after the method compressed its prefix.

    Each window of ``context`` held-out tokens is split: the first ``prefix`` share is
    the prompt (prefilled, then compressed), the rest is scored token by token in one
    forward over the compressed cache. Most of those tokens are predicted from the last
    few hundred, which every method keeps: ``scored=`` :func:`context_dependent_tokens`
    scores only the ones that need the distant prompt, what compression can lose (the
    full cache's value on them is low by construction: compare methods with each other
    on one selection).

    Parameters
    ----------
    model : transformers causal LM
    method : str
        One of :data:`kvpack.hf.METHODS`; ``"full"`` is the uncompressed reference.
    budget : int or float
        Tokens (or fraction of the prompt) the method keeps or recalls.
    context : int
        Tokens per window.
    prefix : float
        Share of each window that is the prompt.
    windows : int
        Windows at seeded random offsets of the held-out text.
    seed : int
        Seed of the offsets; equal seeds give equal windows for every method.
    skip_layers : int
        First layers the method leaves uncompressed.
    scored : list of ndarray of bool, optional
        The tokens scored: one mask per window, shape ``(context - split,)`` with
        ``split = round(prefix * context)``, ``True`` where the token at ``split + i``
        counts (e.g. :func:`context_dependent_tokens` of the same windows, computed once
        for every method). Default: every token after the prompt.
    options : dict, optional
        The method's options (e.g. ``{"log_count_bias": True}`` for KVMerger).
    reference : {"transformers", "kvpack"}
        What holds the cache of ``"full"`` runs: transformers' ``DynamicCache`` (the
        reference independent of kvpack), or kvpack's cache layers keeping every token.
    tokenizer : transformers tokenizer, optional
        ``model``'s own, for a model whose tokens are not bytes: the held-out text is cut
        into ``context`` of its tokens (its BOS first when it has one). Default: bytes,
        BOS first (the shipped tiny LM).
    progress : callable, optional
        Called after each window with the runs scored on it (1 without ``runs``).
    runs : sequence of (method, budget) or (method, budget, options), optional
        Score these runs instead of ``method`` at ``budget``, each prompt prefilled once
        for all of them; a list of results is returned, one per run.

    Returns
    -------
    float
        exp of the mean loss over the scored tokens of every window.
    """
    text = _text_windows(context, prefix, windows, seed, tokenizer)
    masks = None if scored is None else _check_scored(scored, windows, context - text.split)
    caches = _Caches(skip_layers, options, reference)
    values = _perplexity_over(model, _runs(method, budget, runs), text, masks, caches, progress)
    return values if runs is not None else values[0]


def _check_scored(scored, windows: int, tokens: int) -> list[np.ndarray]:
    """``scored`` as a list of boolean masks, one of ``tokens`` per window, or a named error."""
    masks = [np.asarray(m) for m in scored]
    if len(masks) != windows or any(m.dtype != bool or m.shape != (tokens,) for m in masks):
        raise ValueError(
            f"scored: expected {windows} boolean masks of {tokens} tokens, one per window "
            "(context_dependent_tokens with the same context, prefix and windows)"
        )
    if not any(m.any() for m in masks):
        raise ValueError("scored: selects no token; use more windows")
    return masks


def context_dependent_tokens(
    model,
    *,
    context: int = 2048,
    prefix: float = PROMPT_SHARE,
    windows: int = 16,
    seed: int = 0,
    short: int = SHORT_PROMPT,
    gain: float = 2.0,
    max_loss: float = 2.0,
    tokenizer=None,
    progress: Progress | None = None,
) -> list[np.ndarray]:
    """The scored tokens of :func:`perplexity`'s windows that depend on the distant prompt
    (its ``scored=``).

    Each window is scored twice with the full cache: after the whole prompt, and after
    the prompt cut to its last ``short`` tokens (BOS kept; the scored tokens before each
    one stay in both, since compression touches only the prompt). A token counts when
    the whole prompt lowers its loss by at least ``gain`` nats and predicts it well
    (loss at most ``max_loss``): LongPPL's key tokens (Fang et al., 2025, thresholds 2
    and 2), the model as its own judge, the short context being the uncut prompt's tail.

    Parameters
    ----------
    model, context, prefix, windows, seed, tokenizer, progress
        As in :func:`perplexity`.
    short : int
        Prompt tokens the cut prompt keeps, fewer than the prompt's (BOS aside).
    gain : float
        Least loss (nats) the distant prompt must save.
    max_loss : float
        Most loss (nats) the full prompt may leave.

    Returns
    -------
    list of ndarray of bool, one per window, shape (context - split,)
        With ``split = round(prefix * context)``: ``True`` where the token at
        ``split + i`` depends on the distant prompt.
    """
    for name, value in (("gain", gain), ("max_loss", max_loss)):
        if math.isnan(value):
            raise ValueError(f"{name}: expected a number of nats, got NaN")
    text = _text_windows(context, prefix, windows, seed, tokenizer)
    split, head = text.split, text.head
    if not 1 <= short < split - head:  # at least one prompt token must be distant
        raise ValueError(f"short: expected 1..{split - head - 1} prompt tokens, got {short}")
    reference = _Caches()  # transformers' DynamicCache holds the whole prompt
    whole = _runs("full", 1.0, None)
    masks = []
    for ids in text.texts:
        (full,) = _token_losses(model, ids, split, whole, reference)
        cut = np.concatenate((np.arange(head), np.arange(split - short, ids.shape[1])))
        (near,) = _token_losses(model, ids[:, cut], head + short, whole, reference)
        masks.append((near - full >= gain) & (full <= max_loss))
        if progress:
            progress(1)
    return masks


def fidelity(layers, method, budget: int | float, *, observe: int = 32) -> float:
    """Mean attention-output relative error of one decode step per layer.

    The last query of each layer attends the cache of the tokens before it, compressed
    or recalled by ``method``; the reference is dense attention over all of them.

    Parameters
    ----------
    layers : list of kvpack.eval.data.LayerKV (or objects with queries, keys, values)
        Queries (heads_q, tokens, d), keys and values (heads_kv, tokens, d).
    method : str or kvpack.methods object
        Any method of :mod:`kvpack.methods` (for ``kivi``, ``budget`` is the tokens
        kept in full precision).
    budget : int or float
        Tokens kept or recalled, or a fraction of the context.
    observe : int
        Prompt queries before the step the compression methods rank keys by.
    """
    from .. import methods
    from ..attention import attention
    from ..clustering import RecallCache
    from ..compression import budget_tokens, compress
    from ..quantization import quantize

    method = methods.resolve(method)

    errors = []
    for layer in layers:
        keys = np.ascontiguousarray(layer.keys[:, :-1])
        values = np.ascontiguousarray(layer.values[:, :-1])
        q = np.ascontiguousarray(layer.queries[:, -1])
        tokens = keys.shape[1]
        slots = budget_tokens(budget, tokens)
        if slots > tokens:
            raise ValueError(f"budget: {slots} tokens exceed the context of {tokens}")
        dense = attention(q, keys, values)
        if method.kind == "recall":
            recall = RecallCache(slots, method)
            head = (np.ascontiguousarray(x[:, :-1]) for x in (keys, values))
            recall.prefill(*head)
            out = recall.step(
                q, np.ascontiguousarray(keys[:, -1]), np.ascontiguousarray(values[:, -1])
            )
        elif method.kind == "quantize":
            out = quantize(keys, values, method.bits, group=method.group, residual=slots).attend(q)
        else:
            window = np.ascontiguousarray(layer.queries[:, -1 - observe : -1])
            out = compress(keys, values, method, slots, queries=window).attend(q)
        errors.append(np.linalg.norm(out - dense) / np.linalg.norm(dense))
    return float(np.mean(errors))


def lm_contexts(model, count: int, tokens: int = 1024):
    """Prompt caches of ``model`` on consecutive held-out text windows, for
    :func:`kvpack.eval.trace.replay`: (kv as float16 per layer, None, prefill seconds).

    No probe queries are recorded, so the store scores each codec on each layer's last
    keys (its own stand-in).
    """
    import time

    import torch

    from ..hf import returned_cache

    text = tasks.corpus().held_out
    if count * tokens > text.size:
        raise ValueError(f"count: {count} windows of {tokens} exceed the held-out text")
    contexts = []
    for i in range(count):
        ids = torch.tensor([encode(text[i * tokens : (i + 1) * tokens - 1].tobytes())])
        start = time.perf_counter()
        with torch.no_grad():
            cache = returned_cache(model(ids, use_cache=True))
        seconds = time.perf_counter() - start
        kv = [
            (layer.keys[0].numpy().astype(np.float16), layer.values[0].numpy().astype(np.float16))
            for layer in cache.layers
        ]
        contexts.append((kv, None, seconds))
    return contexts


# ---- the tasks of `kvpack eval` and `kvpack demo`: one table both read -----------------


def _score_passkey(model, runs, *, count, context, seed, skip_layers, tokenizer, progress, **extra):
    return passkey_accuracy(
        model, context=context, prompts=count, seed=seed, skip_layers=skip_layers,
        progress=progress, runs=runs, **extra,
    )  # fmt: skip


def _score_ruler(model, runs, *, count, context, seed, skip_layers, tokenizer, progress, **extra):
    return ruler_scores(
        model, tokenizer, context=context, samples=count, seed=seed, skip_layers=skip_layers,
        progress=progress, runs=runs, **extra,
    )  # fmt: skip


def _score_perplexity(
    model, runs, *, count, context, seed, skip_layers, tokenizer, progress, **extra
):
    return perplexity(
        model, context=context, windows=count, seed=seed, skip_layers=skip_layers,
        tokenizer=tokenizer, progress=progress, runs=runs, **extra,
    )  # fmt: skip


def _score_fidelity(layers, runs, *, progress, **_) -> list[float]:
    values = []
    for method, budget, options in runs:
        if options:
            raise ValueError(f"runs: fidelity takes no cache options, got {options!r}")
        values.append(fidelity(layers, method, budget))
        if progress:
            progress(1)
    return values


def _ruler_prompts(count: int) -> int:
    from . import ruler

    return count * len(ruler.TASKS)


@dataclass(frozen=True)
class Task:
    """A task of ``kvpack eval --task`` and ``kvpack demo``: what it measures, what model
    it reads, and the call that scores a list of (method, budget) runs on it."""

    value: str  # what the number is: a table's header, a figure's axis
    # What the model must read: "bytes" (pass-key prompts: a byte-level model), "subword"
    # (prompts built with the model's own tokenizer), "text" (held-out text: bytes, or the
    # model's tokenizer's tokens) or "kv" (per-layer queries, keys and values, no model).
    reads: str
    count: str  # what the count of score_task is: "prompts" or "windows" ("" for none)
    steps: Callable[[int], int]  # progress steps per run, given the count
    score: Callable  # (model, runs, *, count, context, seed, ...) -> one result per run
    selects: bool = False  # scores only the tokens context_dependent_tokens selects


TASKS = {
    "passkey": Task("pass-key accuracy", "bytes", "prompts", int, _score_passkey),
    "ruler": Task(
        "RULER-style task average (string match)",
        "subword",
        "prompts",
        _ruler_prompts,
        _score_ruler,
    ),
    "perplexity": Task("perplexity", "text", "windows", int, _score_perplexity),
    "long-perplexity": Task(
        "perplexity of context-dependent tokens",
        "text",
        "windows",
        int,
        _score_perplexity,
        selects=True,
    ),
    "fidelity": Task("attention-output relative error", "kv", "", lambda _: 1, _score_fidelity),
}


def score_task(
    task: str,
    model,
    runs,
    *,
    count: int = 1,
    context: int = 2048,
    seed: int = 0,
    skip_layers: int = 2,
    tokenizer=None,
    progress: Progress | None = None,
    **extra,
) -> list:
    """Every (method, budget) of ``runs`` scored on one of :data:`TASKS`.

    Parameters
    ----------
    task : str
        A key of :data:`TASKS`.
    model : transformers causal LM, or list of LayerKV for ``"fidelity"``
    runs : sequence of (method, budget)
    count : int
        Prompts (per RULER task) or text windows, as the task's ``count`` says.
    context, seed, skip_layers, tokenizer, progress
        As in the task's scorer (:func:`passkey_accuracy`, :func:`ruler_scores`,
        :func:`perplexity`, :func:`fidelity`).
    **extra
        The scorer's other keywords: ``scored=`` (required for ``"long-perplexity"``),
        ``filler=`` and ``batch=`` for ``"passkey"``, ``reference=``.

    Returns
    -------
    list, one result per run
        A float, or for ``"ruler"`` a dict of task scores with their ``"average"``
        (:func:`headline` gives the number either way).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    spec = TASKS[task]
    if spec.selects and extra.get("scored") is None:
        raise ValueError(f"scored: task {task!r} needs context_dependent_tokens' selection")
    return spec.score(
        model,
        _runs(None, None, runs),
        count=count,
        context=context,
        seed=seed,
        skip_layers=skip_layers,
        tokenizer=tokenizer,
        progress=progress,
        **extra,
    )


def headline(result) -> float:
    """The number of one result of :func:`score_task`: RULER's average, else the value."""
    return result["average"] if isinstance(result, dict) else result
