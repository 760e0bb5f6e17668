"""Hugging Face transformers integration: one ``Cache`` per kvpack method.

    cache = kvpack.hf.make_cache(model, method="clusterkv", budget=256)
    model.generate(input_ids, cache=cache, max_new_tokens=32)

transformers takes the cache as ``cache=`` since it renamed ``past_key_values``; older 5.x
releases take ``past_key_values=``. :func:`cache_argument` names the one the installed
release takes (``model.generate(ids, **{kvpack.hf.cache_argument(model): cache})``).

Works with Llama/Mistral/Qwen-style decoders (any model whose attention layers call the
cache's ``update`` and then the configured attention function). ``make_cache``
switches the model's attention implementation to ``"kvpack"``: SDPA for every other
cache, and for a kvpack cache the method's own attention. The first ``skip_layers``
layers keep their whole cache.

The first forward is the prefill: attention is exact over the whole prompt, then each
layer compresses; later forwards decode, one token or a chunk at a time (so a prompt
prefilled in chunks is compressed after its first chunk). Per method:

- ``h2o``, ``streaming_llm``, ``snapkv``, ``cam``, ``kvmerger``: the prompt's cache is
  compressed to ``budget`` slots per KV head by :func:`kvpack.compress`, ranked by the
  attention the prompt's queries paid each key. Decoded tokens are appended.
- ``clusterkv``, ``quest``: the whole cache stays in host memory in a
  :class:`kvpack.ClusterKV` per sequence; each decoded token attends ``budget`` recalled
  tokens (clusters, or Quest pages).
- ``kivi``: the prompt's cache becomes KIVI codes (:func:`kvpack.quantize`, ``bits``,
  group 32) with the latest ``budget`` tokens in full precision; decode attends the codes
  directly and the decoded tokens in full precision, merged by log-sum-exp.
- ``full``: no compression (a reference that runs the same code path).

``method`` is a name or a :mod:`kvpack.methods` object (``kvpack.methods.SnapKV(window=16)``).
``budget`` is a token count, or a fraction of each prompt in (0, 1). Batches may be
left-padded: padding never takes a slot.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import numpy as np

from . import methods as _methods
from ._extras import require
from .clustering import ClusterKV
from .compression import budget_tokens, compress
from .quantization import quantize

require("kvpack.hf", "torch", "transformers")

import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

__all__ = [
    "METHODS",
    "KVPackCache",
    "Prefill",
    "cache_argument",
    "dynamic_cache",
    "make_cache",
    "prefill",
    "returned_cache",
    "stored_cache",
]

EVICTION_METHODS = _methods.names("compress")
RECALL_METHODS = _methods.names("recall")
METHODS = _methods.names()
ATTENTION = "kvpack"


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward (and so ``generate``) takes a cache:
    ``"cache"`` in current transformers, ``"past_key_values"`` in releases before the
    rename. Passing the other name warns (current) or is ignored (older)."""
    forward = getattr(model, "forward", None)
    if forward is None:
        raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output) -> Cache:
    """The cache a forward returned (``output.cache``, or ``past_key_values`` before the
    rename), read without the deprecation warning of the old name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def make_cache(
    model,
    method: str | _methods.Method = "clusterkv",
    budget: int | float = 1024,
    *,
    skip_layers: int = 2,
    log_count_bias: bool = False,
    prefill: Prefill | None = None,
    decode_budget: int | None = None,
    decode_interval: int | None = None,
    **params: Any,
) -> KVPackCache:
    """A cache that compresses or recalls the KV cache of ``model`` with ``method``.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A decoder-only model; its attention implementation becomes ``"kvpack"``.
    method : str or kvpack.methods object
        One of :data:`METHODS`, or its object with parameters set
        (``kvpack.methods.ClusterKV(n_clusters=64)``).
    budget : int or float
        Slots (tokens) per KV head kept or recalled; a float in (0, 1) is a fraction of
        each prompt. For ``kivi``, the tokens kept in full precision.
    skip_layers : int
        First layers left uncompressed [2].
    log_count_bias : bool
        Compression methods: attention over the kept slots adds ``log(count)`` to each
        slot's score (see :func:`kvpack.compress`).
    prefill : Prefill, optional
        Start from this exact prefill (see :func:`prefill`) instead of running one: each
        layer compresses or indexes its own copy at once, and ``generate`` goes on from
        :attr:`Prefill.next_ids`.
    decode_budget : int, optional
        Compression methods: slots per KV head a layer keeps while decoding, so memory stays
        bounded over long generations (as kvpress's DecodingPress). Whenever
        ``decode_interval`` tokens were decoded since the last time and more than
        ``decode_budget`` slots are held, the method compresses what the layer holds back
        to ``decode_budget``, ranking by the last 32 decoded queries. None: every decoded
        token is kept.
    decode_interval : int, optional
        Decoded tokens between two such compressions [``decode_budget // 16``, at least 1]:
        a layer holds at most ``decode_budget + decode_interval`` slots.
    **params
        The method's parameters, as for a name in :func:`kvpack.methods.resolve`: e.g.
        ``window`` (SnapKV), ``sigma`` (KVMerger), ``n_clusters``, ``recall_steps``
        (ClusterKV), ``bits`` (2) and ``group`` (32) for KIVI.

    Returns
    -------
    KVPackCache
    """
    if not hasattr(getattr(model, "config", None), "get_text_config"):
        raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
    method = _methods.resolve(method, **params)
    if not isinstance(log_count_bias, (bool, np.bool_)):
        raise TypeError(f"log_count_bias: expected a bool, got {type(log_count_bias).__name__}")
    if log_count_bias and method.kind != "compress":
        raise TypeError(f"log_count_bias: method {method.name!r} does not merge slots")
    budget_tokens(budget, 1)  # an int count >= 1 or a share in (0, 1], or a named error
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    layers = model.config.get_text_config().num_hidden_layers
    if not isinstance(skip_layers, numbers.Integral) or not 0 <= skip_layers <= layers:
        raise ValueError(f"skip_layers: expected an int from 0 to {layers}, got {skip_layers!r}")
    for name, value in (("decode_budget", decode_budget), ("decode_interval", decode_interval)):
        if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
    if decode_interval is not None and decode_budget is None:
        raise ValueError("decode_interval: given without decode_budget")
    if decode_budget is not None and (method.kind != "compress" or method.name == "full"):
        raise ValueError(
            f"decode_budget: method {method.name!r} does not compress (only "
            f"{', '.join(m for m in EVICTION_METHODS if m != 'full')} do)"
        )
    if prefill is not None and not isinstance(prefill, Prefill):
        raise TypeError(f"prefill: expected a kvpack.hf.Prefill, got {type(prefill).__name__}")
    if prefill is not None and len(prefill.layers) != layers:
        raise ValueError(f"prefill: has {len(prefill.layers)} layers, the model {layers}")
    _use_kvpack_attention(model)
    cache = KVPackCache(
        layers, method, budget, skip_layers=int(skip_layers), log_count_bias=bool(log_count_bias)
    )
    if decode_budget is not None:
        interval = max(1, decode_budget // 16) if decode_interval is None else decode_interval
        for layer in cache.layers[int(skip_layers) :]:
            layer.decode_budget, layer.decode_interval = int(decode_budget), int(interval)
    if prefill is not None:
        for layer, captured in zip(cache.layers, prefill.layers):
            layer.adopt(*captured)
    return cache


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
    if not hasattr(getattr(model, "config", None), "get_text_config"):
        raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids: expected a (batch, tokens) tensor with at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _use_kvpack_attention(model)
    layers = model.config.get_text_config().num_hidden_layers
    capture = Cache(layers=[_CaptureLayer(_methods.Full(), 1.0) for _ in range(layers)])
    # Positions as generate() gives them: counted over the real tokens of each row.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        output = model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
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
    if not hasattr(getattr(model, "config", None), "get_text_config"):
        raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
    kv = getattr(stored, "kv", stored)
    positions = getattr(stored, "positions", None)
    counts = getattr(stored, "counts", None)
    layers = model.config.get_text_config().num_hidden_layers
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
    _use_kvpack_attention(model)
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


class KVPackCache(Cache):
    """A transformers ``Cache`` whose layers compress or recall with one kvpack method.

    Build it with :func:`make_cache`. ``stats()`` reports what the layers hold (slots
    and bytes per tier) and, for recall methods, the fast-tier hit rate and bytes loaded.
    """

    def __init__(
        self,
        num_layers: int,
        method: str | _methods.Method,
        budget: int | float,
        *,
        skip_layers: int = 2,
        log_count_bias: bool = False,
    ) -> None:
        method = _methods.resolve(method)
        kind = {"compress": _EvictionLayer, "recall": _RecallLayer, "quantize": _KiviLayer}
        # Skipped layers keep everything, in the growing buffers of the full method.
        layers = [
            _EvictionLayer(_methods.Full(), budget)
            if i < skip_layers
            else kind[method.kind](method, budget, log_count_bias)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.method, self.budget, self.skip_layers = method, budget, skip_layers

    def stats(self) -> dict:
        """Tokens seen, slots held per compressed layer, the bytes every layer holds per
        tier, and recall counts summed over layers and sequences (``hits``, ``loaded``,
        ``bytes_loaded``, ``hit_rate``).

        ``bytes`` maps each tier to the key/value bytes held there: ``"model"`` (tensors
        on the model's device: kept slots, decoded tokens, skipped layers), ``"slow"`` and
        ``"fast"`` (the recall methods' host store and fast tier), ``"codes"`` (KIVI's
        quantized prompt); ``"total"`` sums them.
        """
        compressed = self.layers[self.skip_layers :]
        held: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.nbytes().items():
                held[tier] = held.get(tier, 0) + n
        held["total"] = sum(held.values())
        result = {
            "method": self.method.name,
            "tokens": self.get_seq_length(),
            "slots": [layer.slots() for layer in compressed],
            "bytes": held,
        }
        if self.method.kind == "recall":
            totals = [r.total for layer in compressed for r in getattr(layer, "recall", [])]
            for name in ("selected", "hits", "loaded", "bytes_loaded"):
                result[name] = int(sum(t[name] for t in totals))
            result["hit_rate"] = result["hits"] / max(1, result["selected"])
        return result


class _KVPackLayer(DynamicLayer):
    """Shared by every method: the first forward is the prefill (exact attention over
    the prompt, then ``_compress``), later forwards decode (``_decode``)."""

    is_croppable = False

    def __init__(self, method, budget: int | float, log_count_bias: bool = False) -> None:
        super().__init__()
        self.method, self.budget, self.log_count_bias = method, budget, log_count_bias
        self.seen = 0
        self.prefilled = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks keep the logical layout (every token seen); attend() maps them to slots.
        return self.seen + query_length, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        if not self.prefilled:
            keys, values = super().update(key_states, value_states)
        else:
            keys, values = self._append(key_states, value_states)
        keys._kvpack_layer = self  # read by _attention: this layer attends
        return keys, values

    def attend(self, module, query, key, value, attention_mask, scaling):
        if self.prefilled:
            return self._decode(module, query, key, value, attention_mask, scaling)
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling
        )
        valid = _valid_tokens(attention_mask, key.shape[0], key.shape[-2], key.device)
        self._compress(query, key, value, valid, scaling)
        self.prefilled = True
        return output

    def adopt(self, query, keys, values, valid, scaling) -> None:
        """Starts from a shared prefill (:class:`Prefill`): keeps this method's share of
        the prompt's keys and values, as its own prefill would have."""
        self.lazy_initialization(keys, values)
        self.seen = keys.shape[-2]
        self._compress(query, keys, values, valid, scaling)
        self.prefilled = True

    def _budget(self, prompt_tokens: int) -> int:
        return budget_tokens(self.budget, prompt_tokens)

    def reset(self) -> None:
        super().reset()
        self.seen, self.prefilled = 0, False
        self.__dict__.pop("_recent_queries", None)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("kvpack caches cannot be cropped (assisted decoding)")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("kvpack caches do not support beam search")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("kvpack caches do not support expanding the batch")

    def batch_select_indices(self, indices):
        raise NotImplementedError("kvpack caches do not support selecting batch rows")


class _CaptureLayer(_KVPackLayer):
    """Keeps what the exact prefill attended (for :func:`prefill`); never decodes."""

    def _compress(self, query, keys, values, valid, scaling):
        self.captured = (query, keys, values, valid, scaling)

    def _decode(self, *args):
        raise RuntimeError("a kvpack.hf.prefill capture does not decode")


class _BufferedLayer(_KVPackLayer):
    """Keys and values in buffers with spare room that grow by a quarter, so appending a
    decoded token copies that token, not the cache; ``length`` slots are in use."""

    def _append(self, key_states, value_states):
        new = key_states.shape[-2]
        if self.length + new > self.keys.shape[-2]:
            capacity = self.length + new + max(64, self.length // 4)
            most = getattr(self, "decode_budget", None)
            if most is not None:  # never more than it holds before it compresses
                capacity = min(capacity, max(self.length + new, most + self.decode_interval))
            self.keys, self.values = (
                _grown(t, self.length, capacity) for t in (self.keys, self.values)
            )
        self.keys[:, :, self.length : self.length + new] = key_states
        self.values[:, :, self.length : self.length + new] = value_states
        self.length += new
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class _EvictionLayer(_BufferedLayer):
    """The slots :func:`kvpack.compress` kept of the prompt (all of it for ``full`` and the
    skipped layers), then every decoded token (or, with ``decode_budget``, what the method
    keeps of them as it goes). A decode step over a batch without padding and without
    log-count bias is transformers' own SDPA call over the buffers."""

    decode_budget: int | None = None  # set by make_cache
    decode_interval = 1
    observed = 32  # decoded queries a decode-time compression ranks by

    def _compress(self, query, keys, values, valid, scaling):
        log_count_bias = self.log_count_bias
        rows = []
        for b in range(keys.shape[0]):
            everything = bool(valid[b].all())
            tokens = torch.nonzero(valid[b]).flatten()
            k, v = (
                (keys[b], values[b]) if everything else (keys[b][:, tokens], values[b][:, tokens])
            )
            budget = self._budget(tokens.numel())
            if self.method.name == "full" or budget >= tokens.numel():
                rows.append((k, v, tokens.expand(k.shape[0], -1), None))
                continue
            c = compress(
                _dense(k),
                _dense(v),
                self.method,
                budget,
                scale=scaling,
                queries=_dense(query[b][:, tokens].float()),
            )
            positions = tokens[torch.from_numpy(c.positions.astype(np.int64)).to(tokens.device)]
            bias = torch.from_numpy(np.log(c.counts)) if log_count_bias else None
            rows.append((_torch(c.keys, k), _torch(c.values, v), positions, bias))
        self._hold_rows(rows, int(valid.shape[1]), query.dtype)

    def _hold_rows(self, rows, tokens: int, dtype) -> None:
        """Holds one (keys, values, positions, log-count bias or None) per batch row, of
        ``tokens`` tokens seen, padding shorter rows with slots no query attends."""
        slots = max(row[0].shape[1] for row in rows)
        padded = any(row[0].shape[1] < slots for row in rows)
        pad = lambda x, value: torch.nn.functional.pad(  # noqa: E731
            x,
            (0, 0, 0, slots - x.shape[1]) if x.ndim == 3 else (0, slots - x.shape[1]),
            value=value,
        )
        if len(rows) == 1:  # no copy when nothing was dropped
            held_keys, held_values = rows[0][0][None], rows[0][1][None]
        else:
            held_keys = torch.stack([pad(r[0], 0.0) for r in rows])
            held_values = torch.stack([pad(r[1], 0.0) for r in rows])
        bias = None
        if padded or any(r[3] is not None for r in rows):
            zeros = lambda r: torch.zeros(r[2].shape)  # noqa: E731
            bias = [pad((r[3] if r[3] is not None else zeros(r)).float(), -math.inf) for r in rows]
            bias = torch.stack(bias).to(held_keys.device, dtype)
        positions = torch.stack([pad(r[2], -1) for r in rows])
        self.hold(held_keys, held_values, positions, bias, tokens)

    def hold(self, keys, values, positions, bias, tokens: int) -> None:
        """Holds ``keys`` and ``values`` [batch, heads_kv, slots, dim] for a prompt of
        ``tokens`` tokens: per slot the position it keeps (``positions``, -1 for padding)
        and an additive score bias (-inf for padding, log(count) for merged slots; None
        when zero everywhere)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.length = int(keys.shape[2])
        self.prompt_positions, self.prompt_bias = positions, bias
        self.first_decoded = tokens  # logical position of the first decoded token
        self.seen, self.prefilled = tokens, True

    @property
    def positions(self) -> torch.Tensor:
        """[batch, heads_kv, slots]: the logical position each held slot stands for."""
        decoded = torch.arange(self.first_decoded, self.seen, device=self.prompt_positions.device)
        shape = (*self.prompt_positions.shape[:2], decoded.numel())
        return torch.cat([self.prompt_positions, decoded.expand(shape)], dim=-1)

    def _decode(self, module, query, key, value, attention_mask, scaling):
        output = self._attend_held(module, query, key, value, attention_mask, scaling)
        if self.decode_budget is not None:
            self._recent_queries = torch.cat(
                [getattr(self, "_recent_queries", query[:, :, :0]), query], dim=2
            )[:, :, -self.observed :]
            due = self.seen - self.first_decoded >= self.decode_interval
            if due and self.length > self.decode_budget:
                self._compress_held(scaling)
        return output

    def _compress_held(self, scaling) -> None:
        """Compresses what each row holds back to ``decode_budget`` slots (rows holding no
        more keep everything), as kvpress's DecodingPress does during generation."""
        positions, slots = self.positions, self.length
        held_bias = self.prompt_bias
        rows = []
        for b in range(positions.shape[0]):
            real = torch.nonzero(positions[b, 0] >= 0).flatten()
            k, v = self.keys[b][:, real], self.values[b][:, real]
            bias = None
            if held_bias is not None:  # the prompt's slots carry it, decoded tokens add 0
                bias = torch.nn.functional.pad(held_bias[b], (0, slots - held_bias.shape[-1]))
                bias = bias[:, real].float()
            if real.numel() <= self.decode_budget:
                rows.append((k, v, positions[b][:, real], bias))
                continue
            c = compress(
                _dense(k),
                _dense(v),
                self.method,
                self.decode_budget,
                scale=scaling,
                queries=_dense(self._recent_queries[b].float()),
            )
            kept = torch.from_numpy(c.positions.astype(np.int64)).to(k.device)
            counts = torch.from_numpy(c.counts.astype(np.int64)).to(k.device)
            new_bias = None if bias is None else _folded_log_counts(bias, kept, counts)
            held = positions[b][:, real].gather(1, kept)
            rows.append((_torch(c.keys, k), _torch(c.values, v), held, new_bias))
        self._hold_rows(rows, self.seen, self.keys.dtype)

    def _attend_held(self, module, query, key, value, attention_mask, scaling):
        new = query.shape[2]
        if attention_mask is None and self.prompt_bias is None and new == 1:
            output, _ = sdpa_attention_forward(module, query, key, value, None, scaling=scaling)
            return output
        # The general case: an additive mask over the slots per KV head and query.
        batch, heads_kv, slots = key.shape[0], key.shape[1], key.shape[2]
        prompt = self.prompt_positions.shape[-1]
        q_positions = torch.arange(self.seen - new, self.seen, device=query.device)
        positions = self.positions[:, :, None, :]  # [b, heads_kv, 1, slots]
        allowed = (positions >= 0) & (positions <= q_positions[:, None])
        if attention_mask is not None:  # [b, 1, q, seen]: the logical layout, one head
            logical = attention_mask.expand(-1, heads_kv, -1, -1)
            gathered = torch.gather(logical, 3, positions.clamp(min=0).expand(-1, -1, new, -1))
            allowed &= gathered if gathered.dtype == torch.bool else gathered == 0
        bias = query.new_zeros(batch, heads_kv, 1, slots)
        if self.prompt_bias is not None:
            bias[..., :prompt] = self.prompt_bias[:, :, None, :]
        bias = torch.where(allowed, bias, -math.inf)
        groups = query.shape[1] // heads_kv
        if new == 1:  # the query heads of a group as rows: no copy of K and V per head
            grouped = query.reshape(batch, heads_kv, groups, query.shape[-1])
            output = torch.nn.functional.scaled_dot_product_attention(
                grouped, key, value, attn_mask=bias, scale=scaling
            )
            return output.reshape(batch, 1, query.shape[1], query.shape[-1])
        output = torch.nn.functional.scaled_dot_product_attention(
            query,
            key.repeat_interleave(groups, dim=1),
            value.repeat_interleave(groups, dim=1),
            attn_mask=bias.repeat_interleave(groups, dim=1),
            scale=scaling,
        )
        return output.transpose(1, 2).contiguous()

    def slots(self) -> int:
        return getattr(self, "length", 0)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the key and value buffers held (spare capacity included)."""
        return {"model": _tensor_bytes(self.keys, self.values)}


class _RecallLayer(_KVPackLayer):
    """One :class:`kvpack.ClusterKV` per sequence holds the whole cache on the host."""

    def _compress(self, query, keys, values, valid, scaling):
        self.recall = []
        for b in range(keys.shape[0]):
            tokens = torch.nonzero(valid[b]).flatten()
            recall = ClusterKV(self._budget(tokens.numel()), self.method)
            recall.prefill(_dense(keys[b][:, tokens]), _dense(values[b][:, tokens]))
            self.recall.append(recall)
        self.keys = self.values = None  # the host copies in ClusterKV are the cache now

    def _append(self, key_states, value_states):
        return key_states, value_states  # decode() hands them to ClusterKV.step

    def _decode(self, module, query, key, value, attention_mask, scaling):
        # ClusterKV scales scores by 1/sqrt(head_dim); fold any other scaling into q.
        fold = scaling * math.sqrt(query.shape[-1])
        q = query.float() if math.isclose(fold, 1.0, rel_tol=1e-12) else query.float() * fold
        rows = [
            torch.from_numpy(
                recall.step(_dense(q[b, :, i]), _dense(key[b, :, i]), _dense(value[b, :, i]))
            )
            for b, recall in enumerate(self.recall)
            for i in range(query.shape[2])
        ]
        output = rows[0][None] if len(rows) == 1 else torch.stack(rows)
        output = output.view(query.shape[0], query.shape[2], query.shape[1], query.shape[-1])
        return output.to(query.device, query.dtype)

    def slots(self) -> int:
        return min((r.tokens for r in getattr(self, "recall", [])), default=0)

    def nbytes(self) -> dict[str, int]:
        if not self.prefilled:
            return {"model": _tensor_bytes(self.keys, self.values)}
        tiers = [r.nbytes for r in self.recall]
        return {tier: sum(t[tier] for t in tiers) for tier in ("slow", "fast")}


class _KiviLayer(_BufferedLayer):
    """KIVI codes of the prompt per sequence, plus the decoded tokens in full precision;
    each decode step is one core call per sequence that attends both in one softmax."""

    def _compress(self, query, keys, values, valid, scaling):
        bits, group = self.method.bits, self.method.group
        self.quantized = []
        for b in range(keys.shape[0]):
            tokens = torch.nonzero(valid[b]).flatten()
            self.quantized.append(
                quantize(
                    _dense(keys[b][:, tokens]),
                    _dense(values[b][:, tokens]),
                    bits,
                    group=group,
                    residual=self._budget(tokens.numel()),
                )
            )
        # New tensors: an empty view of the prompt's would keep all of it alive.
        self.keys = keys.new_empty(*keys.shape[:2], 0, keys.shape[-1])
        self.values = values.new_empty(*values.shape[:2], 0, values.shape[-1])
        self.length = 0

    def _decode(self, module, query, key, value, attention_mask, scaling):
        new, decoded = query.shape[2], key.shape[2]
        output = torch.empty(query.shape[0], new, query.shape[1], query.shape[-1])
        for b, quantized in enumerate(self.quantized):
            for i in range(new):
                seen = decoded - new + i + 1  # decoded tokens this query may attend
                tail = (_host(key[b, :, :seen]), _host(value[b, :, :seen]))
                q = _dense(query[b, :, i].float())
                output[b, i] = torch.from_numpy(quantized.attend(q, scale=scaling, tail=tail))
        return output.to(query.device, query.dtype)

    def slots(self) -> int:
        return min((q.tokens for q in getattr(self, "quantized", [])), default=0)

    def nbytes(self) -> dict[str, int]:
        codes = sum(q.nbytes for q in getattr(self, "quantized", []))
        return {"model": _tensor_bytes(self.keys, self.values), "codes": codes}


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"kvpack"`` attention implementation: a kvpack layer's own attention when
    the cache returned one, SDPA otherwise."""
    layer = getattr(key, "_kvpack_layer", None)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name)]
    if unsupported or dropout:
        raise NotImplementedError(
            f"kvpack caches do not support {(unsupported or ['attention dropout'])[0]}"
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(module, query, key, value, attention_mask, scaling), None


def _use_kvpack_attention(model) -> None:
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def _valid_tokens(attention_mask, batch: int, tokens: int, device) -> torch.Tensor:
    """[batch, tokens] True for real tokens: what the prompt's last query may attend."""
    if attention_mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, :tokens]
    return last if last.dtype == torch.bool else last == 0


def _folded_log_counts(bias, kept, counts) -> torch.Tensor:
    """The log-count bias [heads, budget] of slots kept from slots with log counts
    ``bias`` [heads, n]: a kept slot keeps its count; where the counts of a head add up
    to n, its slots merged consecutive runs (KVMerger), whose counts add up."""
    old = bias.exp()
    merged = counts.sum(-1) == bias.shape[-1]
    ends = counts.cumsum(-1)
    folded = old.cumsum(-1).gather(1, (ends - 1).clamp(min=0))
    folded = folded - torch.nn.functional.pad(folded[:, :-1], (1, 0))
    kept_counts = torch.where(merged[:, None], folded, old.gather(1, kept))
    return kept_counts.log()


def _grown(t: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A [batch, heads, capacity, dim] buffer holding t's first ``length`` tokens."""
    grown = t.new_empty(*t.shape[:2], capacity, t.shape[-1])
    grown[:, :, :length] = t[:, :, :length]
    return grown


def _tensor_bytes(*tensors) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors if t is not None)


def _host(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the core takes it through DLPack: a host tensor as it is (strides kept, no
    copy); a device tensor is copied to the host, where the core's decode path runs."""
    t = t.detach()
    return t if t.device.type == "cpu" else t.cpu()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """:func:`_host` of ``t``, C-contiguous (no copy when it already is)."""
    return _host(t).contiguous()


def _torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(like.device)
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, like.dtype)
