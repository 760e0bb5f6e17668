"""The kvpack ``Cache`` and its layers, one per kind of method, and the attention
function that hands each decode step to the layer's core call.

A layer's ``update`` puts the layer's attention into the keyword arguments the model's
attention hands on to :func:`attention` (transformers passes the same ``kwargs`` to
``Cache.update`` and to the attention function), so a decode step goes
``update -> attention -> layer.decode -> _core -> kernel``.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import _core
from .. import methods as _methods
from ..compression import budget_tokens, compress, pyramid_budgets
from .compat import check_model, layer_windows, rotary_embedding

if TYPE_CHECKING:
    from .prefill import Prefill

EVICTION_METHODS = _methods.names("compress")
LAYER_BUDGETS = ("uniform", "pyramid")
RECALL_METHODS = _methods.names("recall")
METHODS = _methods.names()
ATTENTION = "kvpack"  # the attention implementation make_cache sets
ATTEND = "kvpack_attend"  # the keyword under which a layer hands attention() its own


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
    layer_budgets: str = "uniform",
    pyramid_beta: float = 20,
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
        each prompt. For ``kivi``, the tokens kept in full precision. With
        ``adaptive=True`` (``h2o``, ``snapkv``, ``keydiff``, ``expected_attention``: AdaKV)
        a layer's KV heads share ``heads_kv * budget`` slots by their pooled scores, a
        head's unused slots empty; for ``clusterkv`` and ``quest`` (with ``refine >= 2``)
        they share ``heads_kv * budget`` recalled tokens at each step.
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
    layer_budgets : {"uniform", "pyramid"}
        How the compressed layers share the budget (compression and recall methods):
        ``"uniform"``, each ``budget``; ``"pyramid"``, PyramidKV's schedule
        (:func:`kvpack.pyramid_budgets`): more in the lower layers, less in the higher,
        ``budget`` per layer on average over each prompt, the total kept.
    pyramid_beta : float
        The pyramid's steepness [20]: the highest layer keeps ``budget / pyramid_beta``.
    **params
        The method's parameters, as for a name in :func:`kvpack.methods.resolve`: e.g.
        ``window`` (SnapKV), ``sigma`` (KVMerger), ``n_clusters``, ``recall_steps``
        (ClusterKV), ``bits`` (2) and ``group`` (32) for KIVI.

    Returns
    -------
    KVPackCache
    """
    layers = check_model(model)
    method = _methods.resolve(method, **params)
    if not isinstance(log_count_bias, (bool, np.bool_)):
        raise TypeError(f"log_count_bias: expected a bool, got {type(log_count_bias).__name__}")
    if log_count_bias and method.kind != "compress":
        raise TypeError(f"log_count_bias: method {method.name!r} does not merge slots")
    budget_tokens(budget, 1)  # an int count >= 1 or a share in (0, 1], or a named error
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if not isinstance(skip_layers, numbers.Integral) or not 0 <= skip_layers <= layers:
        raise ValueError(f"skip_layers: expected an int from 0 to {layers}, got {skip_layers!r}")
    for name, value in (("decode_budget", decode_budget), ("decode_interval", decode_interval)):
        if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
    if decode_interval is not None and decode_budget is None:
        raise ValueError("decode_interval: given without decode_budget")
    if decode_budget is not None and getattr(method, "adaptive", False):
        raise NotImplementedError(
            "decode_budget: not with adaptive head budgets (adaptive=True): decode-time "
            "compression keeps decode_budget slots in every head"
        )
    if layer_budgets not in LAYER_BUDGETS:
        raise ValueError(
            f"layer_budgets: expected one of {', '.join(LAYER_BUDGETS)}, got {layer_budgets!r}"
        )
    if isinstance(pyramid_beta, (bool, np.bool_)) or not isinstance(pyramid_beta, numbers.Real):
        raise TypeError(f"pyramid_beta: expected a number >= 1, got {pyramid_beta!r}")
    if not math.isfinite(pyramid_beta) or pyramid_beta < 1:
        raise ValueError(f"pyramid_beta: expected a number >= 1, got {pyramid_beta!r}")
    if layer_budgets == "pyramid" and (method.kind == "quantize" or method.name == "full"):
        raise ValueError(
            f"layer_budgets: method {method.name!r} keeps no budget of slots to schedule "
            f"(the compression and recall methods do)"
        )
    if decode_budget is not None and (method.kind != "compress" or method.name == "full"):
        raise ValueError(
            f"decode_budget: method {method.name!r} does not compress (only "
            f"{', '.join(m for m in EVICTION_METHODS if m != 'full')} do)"
        )
    from .prefill import Prefill  # it builds on this module's layers

    if prefill is not None and not isinstance(prefill, Prefill):
        raise TypeError(f"prefill: expected a kvpack.hf.Prefill, got {type(prefill).__name__}")
    if prefill is not None and len(prefill.layers) != layers:
        raise ValueError(f"prefill: has {len(prefill.layers)} layers, the model {layers}")
    windows = layer_windows(model)
    use_kvpack_attention(model)
    cache = KVPackCache(
        layers,
        method,
        budget,
        skip_layers=int(skip_layers),
        log_count_bias=bool(log_count_bias),
        windows=windows,
    )
    if layer_budgets == "pyramid":
        compressed = cache.compressed_layers
        for position, index in enumerate(compressed):
            cache.layers[index].pyramid = (position, len(compressed), float(pyramid_beta))
    rotary = rotary_embedding(model)
    for index in cache.compressed_layers:  # Expected Attention takes RoPE off its queries
        cache.layers[index].rotary = rotary
    if decode_budget is not None:
        interval = max(1, decode_budget // 16) if decode_interval is None else decode_interval
        for index in cache.compressed_layers:
            layer = cache.layers[index]
            layer.decode_budget, layer.decode_interval = int(decode_budget), int(interval)
    if prefill is not None:
        for layer, captured in zip(cache.layers, prefill.layers):
            layer.adopt(*captured)
    return cache


class KVPackCache(Cache):
    """A transformers ``Cache`` whose layers compress or recall with one kvpack method.

    Build it with :func:`make_cache`. The method runs in the layers of
    ``compressed_layers``: not the first ``skip_layers`` (they keep everything), nor the
    sliding-window layers of ``sliding_layers`` (they keep their window, as transformers'
    own cache does). ``stats()`` reports what the layers hold (slots and bytes per tier)
    and, for recall methods, the fast-tier hit rate and bytes loaded.
    """

    def __init__(
        self,
        num_layers: int,
        method: str | _methods.Method,
        budget: int | float,
        *,
        skip_layers: int = 2,
        log_count_bias: bool = False,
        windows: list[int | None] | None = None,
    ) -> None:
        method = _methods.resolve(method)
        kind = {"compress": _EvictionLayer, "recall": _RecallLayer, "quantize": _KiviLayer}
        windows = windows or [None] * num_layers
        self.sliding_layers = [i for i, window in enumerate(windows) if window]
        self.compressed_layers = [
            i for i in range(skip_layers, num_layers) if i not in self.sliding_layers
        ]
        layers = []
        for i, window in enumerate(windows):
            if window:
                layers.append(_SlidingLayer(window))
            elif i < skip_layers:  # keeps everything, in the growing buffers of full
                layers.append(_EvictionLayer(_methods.Full(), budget))
            else:
                layers.append(kind[method.kind](method, budget, log_count_bias))
        super().__init__(layers=layers)
        self.method, self.budget, self.skip_layers = method, budget, skip_layers

    def stats(self) -> dict:
        """Tokens seen, slots held per compressed layer, the bytes every layer holds per
        tier, and recall counts summed over layers and sequences (``hits``, ``loaded``,
        ``bytes_loaded``, ``hit_rate``, and ``candidates``: keys scored exactly to refine
        the selection).

        ``bytes`` maps each tier to the key/value bytes held there: ``"model"`` (tensors
        on the model's device: kept slots, decoded tokens, skipped layers), ``"slow"`` and
        ``"fast"`` (the recall methods' host store and fast tier), ``"codes"`` (KIVI's
        quantized prompt, or a recall method's with ``slow_bits``); ``"total"`` sums them.
        """
        compressed = [self.layers[i] for i in self.compressed_layers]
        held: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.nbytes().items():
                held[tier] = held.get(tier, 0) + n
        held["total"] = sum(held.values())
        result = {
            "method": self.method.name,
            "tokens": self.get_seq_length(),
            "slots": [layer.slots() for layer in compressed],
            "compressed_layers": list(self.compressed_layers),
            "sliding_layers": list(self.sliding_layers),
            "bytes": held,
        }
        if self.method.kind == "recall":
            totals = [r.total for layer in compressed for r in getattr(layer, "recall", [])]
            for name in ("selected", "hits", "loaded", "bytes_loaded", "candidates"):
                result[name] = int(sum(t[name] for t in totals))
            result["hit_rate"] = result["hits"] / max(1, result["selected"])
        return result


class _KVPackLayer(DynamicLayer):
    """Shared by every method: the first forward is the prefill (exact attention over
    the prompt, then ``_compress``), later forwards decode (``decode``)."""

    is_croppable = False
    # PyramidKV: (this layer among the compressed ones, how many, beta); set by make_cache
    pyramid: tuple[int, int, float] | None = None

    def __init__(self, method, budget: int | float, log_count_bias: bool = False) -> None:
        super().__init__()
        self.method, self.budget, self.log_count_bias = method, budget, log_count_bias
        self.seen = 0
        self.prefilled = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks keep the logical layout (every token seen); the prefill reads them.
        return self.seen + query_length, 0

    def update(self, key_states, value_states, *args, kwargs=None, **ignored):
        if kwargs is None:
            raise NotImplementedError(
                "kvpack caches need a model whose attention hands its keyword arguments to "
                "Cache.update (kwargs=...), as transformers 5's decoders do"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        if not self.prefilled:
            kwargs[ATTEND] = self.prefill_attention
            return super().update(key_states, value_states)
        kwargs[ATTEND] = self.decode
        return self._append(key_states, value_states)

    def prefill_attention(self, module, query, key, value, attention_mask, scaling, rules):
        """Exact attention over the prompt; then the layer keeps its method's share."""
        valid = _valid_tokens(attention_mask, key.shape[0], key.shape[-2], key.device)
        window = getattr(self, "window", None) or rules.get("sliding_window")
        if window and window < query.shape[-2] == key.shape[-2] and _no_padding(attention_mask):
            # A sliding layer over a long prompt: the core attends each query's window
            # only (SDPA would score every key and mask all but the window's).
            output = self._windowed_prefill(query, key, value, scaling, rules, window)
        elif rules.get("softcap") or rules.get("s_aux") is not None:
            # SDPA has neither softcapping nor sinks: the model's own eager attention does.
            # It adds the mask to the scores: the boolean mask SDPA takes becomes 0 / -inf,
            # and none (SDPA's plain causal case) the causal mask.
            eager = sys.modules[type(module).__module__].eager_attention_forward
            mask = attention_mask
            if mask is None:
                mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool).tril(
                    key.shape[-2] - query.shape[-2]
                )[None, None]
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, -math.inf)
            output, _ = eager(module, query, key, value, mask, scaling=scaling, **rules)
        else:
            output, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **rules
            )
        self._compress(query, key, value, valid, scaling)
        self.prefilled = True
        return output

    @staticmethod
    def _windowed_prefill(query, key, value, scaling, rules, window):
        """Causal attention of a prompt with no padding in which a query at position p
        sees positions above p - window: one core call, as a decode step over no held slot."""
        no_slots = np.zeros((key.shape[0], key.shape[1], 0), dtype=np.int64)
        output = _core.held_attention(
            _array(_dense(query.transpose(1, 2).float())),
            _array(_dense(key)),
            _array(_dense(value)),
            no_slots,
            0,
            0,
            None,
            scaling,
            rules.get("softcap"),
            window,
            _sink_logits(rules),
        )
        return _torch(output, query)

    def adopt(self, query, keys, values, valid, scaling) -> None:
        """Starts from a shared prefill (:class:`kvpack.hf.Prefill`): keeps this method's
        share of the prompt's keys and values, as its own prefill would have."""
        self.lazy_initialization(keys, values)
        self.seen = keys.shape[-2]
        self._compress(query, keys, values, valid, scaling)
        self.prefilled = True

    def _budget(self, prompt_tokens: int) -> int:
        budget = budget_tokens(self.budget, prompt_tokens)
        if self.pyramid is None:
            return budget
        position, layers, beta = self.pyramid
        return pyramid_budgets(budget, layers, prompt_tokens, beta)[position]

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
    keeps of them as it goes). Each decode step is one core call
    (``_core.held_attention``) over every row, query and head.

    The first ``held`` slots are the kept ones, at ``held_positions`` [batch, heads_kv,
    held] (-1: a padded row's empty slot) with ``held_bias`` (log merge counts, or None);
    the slots after them are the decoded tokens from position ``first_decoded`` on."""

    decode_budget: int | None = None  # set by make_cache
    decode_interval = 1
    window: int | None = None  # a sliding-window layer's own (else the model's kwarg)
    observed = 32  # decoded queries a decode-time compression ranks by
    rotary = None  # set by make_cache: reads the model's (inv_freq, attention_scaling)

    def _rope(self) -> dict:
        """The keywords of :func:`kvpack.compress` that describe the queries' rotation."""
        if self.rotary is None:
            return {}
        inv_freq, scaling = self.rotary()
        return {"inv_freq": inv_freq, "rotary_scaling": scaling}

    def _compress(self, query, keys, values, valid, scaling):
        rows = []
        # Where each row's real tokens start: positions count from there (left padding).
        self._first_real = []
        for b in range(keys.shape[0]):
            tokens, k, v, q = _real_tokens(valid[b], keys[b], values[b], query[b])
            self._first_real.append(int(tokens[0]) if tokens.numel() else 0)
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
                queries=_dense(q.float()),
                **self._rope(),
            )
            kept = torch.from_numpy(c.positions.astype(np.int64)).to(tokens.device)
            # Adaptive head budgets leave a head's unused slots empty (-1), as padding does.
            positions = torch.where(kept >= 0, tokens[kept.clamp(min=0)], -1)
            bias = None
            if self.log_count_bias:
                bias = torch.from_numpy(np.log(np.maximum(c.counts, 1)))
            rows.append((_torch(c.keys, k), _torch(c.values, v), positions, bias))
        self._hold_rows(rows, int(valid.shape[1]))

    def _hold_rows(self, rows, tokens: int) -> None:
        """Holds one (keys, values, positions, log-count bias or None) per batch row, of
        ``tokens`` tokens seen, padding shorter rows with empty slots."""
        slots = max(row[0].shape[1] for row in rows)
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
        if any(r[3] is not None for r in rows):
            zeros = lambda r: torch.zeros(r[2].shape)  # noqa: E731
            bias = torch.stack(
                [pad((r[3] if r[3] is not None else zeros(r)).float(), 0.0) for r in rows]
            )
        positions = torch.stack([pad(r[2], -1) for r in rows])
        self.hold(held_keys, held_values, positions, bias, tokens)

    def hold(self, keys, values, positions, bias, tokens: int) -> None:
        """Holds ``keys`` and ``values`` [batch, heads_kv, slots, dim] standing for the first
        ``tokens`` tokens: per slot the position it keeps (``positions``, -1 for none) and a
        score bias (log merge counts; None when zero everywhere)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.length = int(keys.shape[2])
        # What the core reads every step: int64 and float32 in host memory, contiguous.
        self.held_positions = _dense(positions.to(torch.int64))
        self.held_bias = None if bias is None else _dense(bias.float())
        self._positions_array = _array(self.held_positions)
        self._bias_array = None if bias is None else _array(self.held_bias)
        self.first_decoded = tokens  # position of the first decoded token
        self.seen, self.prefilled = tokens, True

    @property
    def positions(self) -> torch.Tensor:
        """[batch, heads_kv, slots]: the position each slot stands for (-1: none)."""
        held = self.held_positions
        decoded = torch.arange(self.first_decoded, self.seen).expand(*held.shape[:2], -1)
        return torch.cat([held, decoded], dim=-1)

    def decode(self, module, query, key, value, attention_mask, scaling, rules):
        """One decode step of every row: attention over the held slots and the decoded
        tokens, in the core; then, with ``decode_budget``, a compression when one is due.
        Padding is read from the held positions; ``attention_mask`` adds nothing to them."""
        queries = query.transpose(1, 2)  # [batch, new, heads_q, dim]: the output's layout
        output = _core.held_attention(
            _array(_dense(queries.float())),
            _array(key),
            _array(value),
            self._positions_array,
            self.first_decoded,
            self.seen - queries.shape[1],
            self._bias_array,
            scaling,
            rules.get("softcap"),
            self.window or rules.get("sliding_window"),
            _sink_logits(rules),
        )
        if self.decode_budget is not None:
            self._recent_queries = torch.cat(
                [getattr(self, "_recent_queries", query[:, :, :0]), query], dim=2
            )[:, :, -self.observed :]
            due = self.seen - self.first_decoded >= self.decode_interval
            if due and self.length > self.decode_budget:
                self._compress_held(scaling)
        return _torch(output, query)

    def _rows_where(self, keep) -> list:
        """Per batch row, (keys, values, positions, log-count bias or None) of the slots
        ``keep(positions)`` picks ([batch, slots] bool of the slots' positions [batch,
        heads_kv, slots]): what _hold_rows takes."""
        positions, held = self.positions, self.held_positions.shape[-1]
        keep = keep(positions)
        rows = []
        for b in range(positions.shape[0]):
            picked = torch.nonzero(keep[b]).flatten()
            bias = None
            if self.held_bias is not None:  # the held slots carry it, decoded tokens add 0
                bias = torch.nn.functional.pad(self.held_bias[b], (0, self.length - held))
                bias = bias[:, picked]
            k, v = self.keys[b][:, picked], self.values[b][:, picked]
            rows.append((k, v, positions[b][:, picked], bias))
        return rows

    def _compress_held(self, scaling) -> None:
        """Compresses what each row holds back to ``decode_budget`` slots (rows holding no
        more keep everything), as kvpress's DecodingPress does during generation."""
        rows = []
        for b, (k, v, positions, bias) in enumerate(self._rows_where(lambda p: p[:, 0] >= 0)):
            if k.shape[1] <= self.decode_budget:
                rows.append((k, v, positions, bias))
                continue
            # At most one query per key: a small decode_budget holds fewer keys.
            queries = self._recent_queries[b, :, -k.shape[1] :]
            c = compress(
                _dense(k),
                _dense(v),
                self.method,
                self.decode_budget,
                scale=scaling,
                queries=_dense(queries.float()),
                # The latest queries' positions, counted over the row's real tokens.
                first_position=self.seen - queries.shape[1] - self._first_real[b],
                **self._rope(),
            )
            kept = torch.from_numpy(c.positions.astype(np.int64)).to(k.device)
            counts = torch.from_numpy(c.counts.astype(np.int64)).to(k.device)
            new_bias = None if bias is None else _folded_log_counts(bias, kept, counts)
            rows.append(
                (_torch(c.keys, k), _torch(c.values, v), positions.gather(1, kept), new_bias)
            )
        self._hold_rows(rows, self.seen)

    def slots(self) -> int:
        return getattr(self, "length", 0)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the key and value buffers held (spare capacity included)."""
        return {"model": _tensor_bytes(self.keys, self.values)}


class _SlidingLayer(_EvictionLayer):
    """A sliding-window layer: it holds the last ``window - 1`` tokens, all that a later
    query sees (the core's attention applies the window), and drops older ones every
    ``window // 16`` decoded tokens, so it holds at most ``window - 1 + window // 16``, as
    transformers' own sliding layers keep their window."""

    def __init__(self, window: int) -> None:
        super().__init__(_methods.Full(), 1.0)
        self.window, self.slide_interval = window, max(1, window // 16)

    def _compress(self, query, keys, values, valid, scaling):
        recent = valid.clone()
        recent[:, : max(0, valid.shape[1] - self.window + 1)] = False
        super()._compress(query, keys, values, recent, scaling)

    def decode(self, module, query, key, value, attention_mask, scaling, rules):
        output = super().decode(module, query, key, value, attention_mask, scaling, rules)
        if self.length >= self.window - 1 + self.slide_interval:
            recent = self._rows_where(lambda p: p[:, 0] > self.seen - self.window)
            self._hold_rows(recent, self.seen)
        return output


class _RecallLayer(_KVPackLayer):
    """One :class:`kvpack.RecallCache` per sequence holds the whole cache on the host;
    each decode step is one core call (``_core.recall_step``) over every row and query."""

    def _compress(self, query, keys, values, valid, scaling):
        self.recall = []
        for b in range(keys.shape[0]):
            tokens, k, v = _real_tokens(valid[b], keys[b], values[b])
            recall = _core.RecallCache(self._budget(tokens.numel()), self.method)
            recall.prefill(_dense(k), _dense(v))
            self.recall.append(recall)
        self.keys = self.values = None  # the host copies in RecallCache are the cache now

    def _append(self, key_states, value_states):
        return key_states, value_states  # decode() hands them to the core

    def decode(self, module, query, key, value, attention_mask, scaling, rules):
        return _row_objects_step(_core.recall_step, self.recall, query, key, value, scaling, rules)

    def slots(self) -> int:
        return min((r.tokens for r in getattr(self, "recall", [])), default=0)

    def nbytes(self) -> dict[str, int]:
        if not self.prefilled:
            return {"model": _tensor_bytes(self.keys, self.values)}
        tiers = [r.nbytes for r in self.recall]
        return {tier: sum(t[tier] for t in tiers) for tier in ("slow", "fast", "codes")}


class _KiviLayer(_BufferedLayer):
    """KIVI codes of the prompt per sequence, plus the decoded tokens in full precision;
    each decode step is one core call (``_core.quantized_attention``) that attends both in
    one softmax for every row and query."""

    def _compress(self, query, keys, values, valid, scaling):
        bits, group = self.method.bits, self.method.group
        self.quantized = []
        for b in range(keys.shape[0]):
            tokens, k, v = _real_tokens(valid[b], keys[b], values[b])
            residual = self._budget(tokens.numel())
            self.quantized.append(_core.QuantizedKV(_dense(k), _dense(v), bits, group, residual))
        # New tensors: an empty view of the prompt's would keep all of it alive.
        self.keys = keys.new_empty(*keys.shape[:2], 0, keys.shape[-1])
        self.values = values.new_empty(*values.shape[:2], 0, values.shape[-1])
        self.length = 0

    def decode(self, module, query, key, value, attention_mask, scaling, rules):
        return _row_objects_step(
            _core.quantized_attention, self.quantized, query, key, value, scaling, rules
        )

    def slots(self) -> int:
        return min((q.tokens for q in getattr(self, "quantized", [])), default=0)

    def nbytes(self) -> dict[str, int]:
        codes = sum(q.nbytes for q in getattr(self, "quantized", []))
        return {"model": _tensor_bytes(self.keys, self.values), "codes": codes}


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"kvpack"`` attention implementation: the attention a kvpack layer handed on
    from its ``update``, SDPA for every other cache."""
    attend = kwargs.pop(ATTEND, None)
    if attend is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise NotImplementedError("kvpack caches do not support attention dropout")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(module, query, key, value, attention_mask, scaling, kwargs), None


def use_kvpack_attention(model) -> None:
    """Registers :func:`attention` as ``"kvpack"`` and switches ``model`` to it."""
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def _valid_tokens(attention_mask, batch: int, tokens: int, device) -> torch.Tensor:
    """[batch, tokens] True for real tokens: what the prompt's last query may attend."""
    if attention_mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, :tokens]
    return last if last.dtype == torch.bool else last == 0


def _no_padding(attention_mask) -> bool:
    """True when every query of a prompt's mask [batch, 1, tokens, tokens] sees its own
    position: no row is padded (a padded position sees nothing)."""
    if attention_mask is None:
        return True
    own = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    return bool(own.all() if own.dtype == torch.bool else (own == 0).all())


def _real_tokens(valid, *tensors):
    """The positions of one row's real tokens, then each of ``tensors`` [heads, tokens,
    dim] there: views when the real tokens are one run (no padding, or left padding)."""
    tokens = torch.nonzero(valid).flatten()
    first, n = (int(tokens[0]), tokens.numel()) if tokens.numel() else (0, 0)
    run = n and int(tokens[-1]) - first + 1 == n
    picked = slice(first, first + n) if run else tokens
    return (tokens, *(t[:, picked] for t in tensors))


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
    """``t`` in host memory: a host tensor as it is (strides kept, no copy); a device tensor
    is copied to the host, where the core's decode path runs."""
    t = t.detach() if t.requires_grad else t
    return t if t.device.type == "cpu" else t.cpu()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """:func:`_host` of ``t``, C-contiguous (no copy when it already is)."""
    return _host(t).contiguous()


def _array(t: torch.Tensor):
    """:func:`_host` of ``t`` as the core takes it without a copy: a NumPy view (handed over
    in a microsecond, DLPack in several: a decode step hands over four per layer), or the
    tensor itself where NumPy has no dtype for it (bfloat16), read through DLPack."""
    t = _host(t)
    return t if t.dtype == torch.bfloat16 else t.numpy()


def _row_objects_step(core_step, rows, query, key, value, scaling, rules) -> torch.Tensor:
    """One decode step of a layer that keeps a core object per row (``RecallCache``,
    ``QuantizedKV``): ``core_step`` (``_core.recall_step`` or ``_core.quantized_attention``)
    over every row and query, under the model's scale, softcap and sinks."""
    queries = _dense(query.transpose(1, 2).float())  # [batch, new, heads_q, dim]
    output = core_step(
        rows,
        _array(queries),
        _array(key),
        _array(value),
        scaling,
        rules.get("softcap"),
        _sink_logits(rules),
    )
    return _torch(output, query)


def _sink_logits(rules: dict):
    """The attention's sink logit per query head (gpt-oss's ``s_aux``) as the core takes
    them, or None."""
    sinks = rules.get("s_aux")
    return None if sinks is None else _array(_dense(sinks.float()))


def _torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``a`` as a tensor of ``like``'s device and dtype (no copy when they are the host's
    and ``a``'s)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(like.device)
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device, like.dtype)
