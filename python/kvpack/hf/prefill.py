"""Where a kvpack cache starts from other than its own prefill: one exact prefill shared
by many methods' caches (:class:`Prefill`), transformers' own cache of one
(:func:`dynamic_cache`), or a context loaded from a store (:func:`stored_cache`)."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from transformers.cache_utils import Cache

from .. import methods as _methods
from .cache import KVPackCache, _KVPackLayer, _torch, use_kvpack_attention
from .compat import cache_argument, check_model, layer_windows


class Prefill:
    """One exact prefill of a batch of prompts, from which caches of any method start.

    Every method's prefill is the same exact attention over the prompt; only what each
    layer keeps afterwards differs. Comparing methods on one prompt then costs one
    prefill: ``make_cache(model, method, budget, prefill=p)`` (or :func:`dynamic_cache`)
    gives each its own copy, compressed as its own prefill would have, and decoding goes
    on from the prefill's greedy next token, exactly as ``generate`` on the prompt would.

    Attributes
    ----------
    input_ids, attention_mask : torch.Tensor, shape (batch, prompt)
    logits : torch.Tensor, shape (batch, vocab)
        The model's logits at the prompt's last position.
    layers : list
        Per layer: the prompt's queries, keys, values, real-token mask and score scale.
    """

    def __init__(self, input_ids, attention_mask, logits, layers) -> None:
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.logits, self.layers = logits, layers

    @property
    def tokens(self) -> int:
        """Prompt length (padding included)."""
        return int(self.input_ids.shape[1])

    @property
    def next_ids(self) -> torch.Tensor:
        """The prompt followed by the greedy next token: what ``generate`` continues
        from a cache started from this prefill."""
        return torch.cat([self.input_ids, self.logits.argmax(-1, keepdim=True)], dim=1)

    @property
    def next_attention_mask(self) -> torch.Tensor:
        """The attention mask of :attr:`next_ids`."""
        return torch.nn.functional.pad(self.attention_mask, (0, 1), value=1)


def prefill(model, input_ids, attention_mask=None) -> Prefill:
    """Runs ``model`` over the prompts ``input_ids`` once, exactly, and keeps what every
    method's cache starts from (see :class:`Prefill`)."""
    layers = check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids: expected a (batch, tokens) tensor with at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    layer_windows(model)  # a model kvpack caches cannot hold is refused before the prefill
    use_kvpack_attention(model)
    capture = Cache(layers=[_CaptureLayer(_methods.Full(), 1.0) for _ in range(layers)])
    # Positions as generate() gives them: counted over the real tokens of each row.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        output = model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # the last position's only: a prompt's [tokens, vocab] is GBs
            **{cache_argument(model): capture},
        )
    return Prefill(
        input_ids,
        attention_mask,
        output.logits[:, -1].float(),
        [layer.captured for layer in capture.layers],
    )


def dynamic_cache(model, prefill: Prefill) -> Cache:
    """transformers' own ``DynamicCache`` holding a copy of ``prefill``'s keys and values:
    the full-cache reference, started like :func:`make_cache` with ``prefill=``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (_, keys, values, _, _) in enumerate(prefill.layers):
        cache.update(keys.clone(), values.clone(), index)
    return cache


def stored_cache(model, stored, tokens: int | None = None, *, log_count_bias: bool = False):
    """A cache holding a context loaded from a store, to go on from where it ends.

    ``stored`` is a :class:`kvpack.StoredKV` (what :meth:`kvpack.TieredStore.get` returns)
    or a list of ``(keys, values)`` per layer, ``[heads_kv, slots, head_dim]`` each. Slots
    kept by token dropping or merging keep the positions the entry records; ``tokens`` is
    the length of the context it stands for (default: the slots, or the last kept
    position + 1). Feed the tokens after the context (``input_ids`` of the whole sequence,
    as ``generate`` takes them) and each attends every held slot and the tokens before it.

    Parameters
    ----------
    model : transformers PreTrainedModel
    stored : kvpack.StoredKV or list of (ndarray, ndarray)
    tokens : int, optional
        Context length in tokens.
    log_count_bias : bool
        Merged slots add ``log(count)`` to their scores (see :func:`kvpack.compress`).

    Returns
    -------
    KVPackCache
    """
    layers = check_model(model)
    kv = getattr(stored, "kv", stored)
    positions = getattr(stored, "positions", None)
    counts = getattr(stored, "counts", None)
    if not isinstance(kv, (list, tuple)) or len(kv) != layers:
        raise ValueError(
            f"stored: expected {layers} layers of (keys, values), got "
            f"{len(kv) if isinstance(kv, (list, tuple)) else type(kv).__name__}"
        )
    arrays = []
    for index, layer_kv in enumerate(kv):
        if not isinstance(layer_kv, (list, tuple)) or len(layer_kv) != 2:
            raise ValueError(f"stored: layer {index}: expected a (keys, values) pair")
        keys, values = (np.asarray(a) for a in layer_kv)
        if keys.ndim != 3 or keys.shape != values.shape:
            raise ValueError(
                f"stored: layer {index}: expected keys and values of one shape "
                f"[heads_kv, slots, head_dim], got {keys.shape} and {values.shape}"
            )
        if positions is not None and np.shape(positions[index]) != keys.shape[:2]:
            raise ValueError(
                f"stored: layer {index}: positions of shape {np.shape(positions[index])} "
                f"for keys of {keys.shape[:2]} [heads_kv, slots]"
            )
        arrays.append((keys, values))
    if positions is None:
        inferred = arrays[0][0].shape[1]
        for index, (keys, _) in enumerate(arrays):
            if keys.shape[1] != inferred:
                raise ValueError(
                    f"stored: layer {index} holds {keys.shape[1]} tokens, layer 0 {inferred} "
                    "(an entry without positions holds every token of the context)"
                )
    else:
        inferred = max(int(p.max()) + 1 for p in positions)
    if tokens is None:
        tokens = inferred
    if not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool) or tokens < inferred:
        raise ValueError(f"tokens: expected an int of at least {inferred}, got {tokens!r}")
    if log_count_bias and counts is None:
        raise ValueError("log_count_bias: the stored entry has no merge counts")
    use_kvpack_attention(model)
    like = next(model.parameters())
    cache = KVPackCache(layers, _methods.Full(), 1.0, skip_layers=0)
    for index, (layer, (keys, values)) in enumerate(zip(cache.layers, arrays)):
        k, v = _torch(keys, like)[None], _torch(values, like)[None]
        if positions is None:
            held = torch.arange(k.shape[2], device=k.device).expand(1, k.shape[1], -1)
        else:
            held = torch.from_numpy(positions[index].astype(np.int64)).to(k.device)[None]
        bias = None
        if log_count_bias:
            bias = torch.from_numpy(np.log(counts[index])).to(k.device, k.dtype)[None]
        layer.hold(k, v, held, bias, tokens)
    return cache


class _CaptureLayer(_KVPackLayer):
    """Keeps what the exact prefill attended (for :func:`prefill`); never decodes."""

    def _compress(self, query, keys, values, valid, scaling):
        self.captured = (query, keys, values, valid, scaling)

    def decode(self, *args):
        raise RuntimeError("a kvpack.hf.prefill capture does not decode")
