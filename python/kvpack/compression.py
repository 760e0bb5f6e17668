"""Prefill-time KV cache compression behind one call, and a bounded decode-time cache.

Methods: the ``"compress"`` kind of :mod:`kvpack.methods` (``"full"``,
``"streaming_llm"``, ``"h2o"``, ``"snapkv"``, ``"keydiff"``,
``"expected_attention"``, ``"cam"``, ``"kvmerger"``).
Every method returns the same :class:`CompressedKV`: exactly ``budget`` slots per KV
head, each with the number of original tokens it stands for and the position it keeps,
so methods can be swapped in an experiment without other changes. The methods that keep
the tokens a score ranks highest (``h2o``, ``snapkv``, ``keydiff``,
``expected_attention``) also take ``adaptive=True`` (AdaKV): the heads share
``heads_kv * budget`` slots by their pooled scores, each keeping at least
``adaptive_floor`` of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _core
from . import methods as _methods
from .attention import attention as _attention

__all__ = [
    "METHODS",
    "CompressedKV",
    "EvictionCache",
    "budget_tokens",
    "compress",
    "pyramid_budgets",
]

#: Names of the compression methods.
METHODS: tuple[str, ...] = _methods.names("compress")


def budget_tokens(budget: int | float, tokens: int) -> int:
    """The slots a ``budget`` stands for over ``tokens``: an int is a token count, given
    back as is; a float in (0, 1] is a share of ``tokens``, rounded half away from zero,
    at least 1. The core does the rounding, so every method, codec and facade agrees.
    """
    return _core.budget_tokens(budget, tokens)


def pyramid_budgets(budget: int | float, layers: int, tokens: int, beta: float = 20) -> list[int]:
    """PyramidKV's layer-wise schedule: slots per head for each of ``layers`` layers (the
    lowest first) whose mean is ``budget`` (a token count, or a share of ``tokens``).

    The budgets fall linearly from ``2 * budget - budget / beta`` to ``budget / beta``
    (when the first would exceed ``tokens`` it is capped there and the last raised to keep
    the mean) and are rounded so they add up to ``layers * budget`` exactly. Every layer
    gets ``budget`` when it covers the tokens, for one layer, or when the last would keep
    less than one slot.

    >>> import kvpack
    >>> kvpack.pyramid_budgets(100, 4, 1000, beta=20)
    [195, 132, 68, 5]
    """
    return _core.pyramid_budgets(budget, layers, tokens, beta)


@dataclass(frozen=True)
class CompressedKV:
    """One layer's compressed cache: ``slots`` entries per KV head.

    With adaptive head budgets (``adaptive=True``) heads keep different numbers of
    tokens, ``kept`` of them: each head's first ``kept[h]`` slots hold them and the rest are
    empty (position -1, count 0, zero keys and values); ``slots`` is the most any head
    kept, and ``kept.sum()`` is ``heads_kv * budget``.

    Attributes
    ----------
    keys, values : ndarray, shape (heads_kv, slots, head_dim)
        In the input dtype; merged slots hold the weighted merge.
    counts : ndarray of int32, shape (heads_kv, slots)
        Original tokens each slot stands for (1 unless KVMerger merged a run).
    positions : ndarray of int32, shape (heads_kv, slots)
        Original position of each slot (a merged run's pivot), ascending per head; -1 for
        an empty slot.
    method : str
    tokens : int
        Tokens per head before compression.
    thresholds : ndarray of float32, shape (heads_kv,), or None
        KVMerger only: the lowest adjacent-key similarity merged in each head, the
        threshold its exact-budget search settled on (``inf`` where nothing merged).
    log_count_bias : bool
        Whether :meth:`attend` adds ``log(counts)`` to each slot's score, so a merged slot
        keeps the softmax mass of the tokens it replaced.
    """

    keys: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    positions: np.ndarray
    method: str
    tokens: int
    thresholds: np.ndarray | None = None
    log_count_bias: bool = False

    @property
    def slots(self) -> int:
        """Slots per head."""
        return int(self.keys.shape[1])

    @property
    def kept(self) -> np.ndarray:
        """Non-empty slots per head, (heads_kv,) int64 (``slots`` each unless adaptive)."""
        return (self.counts > 0).sum(axis=1)

    @property
    def ratio(self) -> float:
        """Slots kept per original token (the mean over heads)."""
        return float(self.kept.mean()) / self.tokens

    @property
    def bias(self) -> np.ndarray | None:
        """What :meth:`attend` adds to each slot's score, float32: ``log(counts)`` when
        ``log_count_bias`` is on, and a score no weight survives (-1e30) at empty slots;
        ``None`` when both are zero everywhere."""
        empty = self.counts == 0
        if not self.log_count_bias and not empty.any():
            return None
        counts = np.maximum(self.counts, 1) if self.log_count_bias else np.ones(self.counts.shape)
        return np.where(empty, np.float32(-1e30), np.log(counts)).astype(np.float32)

    def attend(self, q: np.ndarray, **kwargs):
        """:func:`kvpack.attention` over the compressed cache (with the bias when on)."""
        return _attention(q, self.keys, self.values, bias=self.bias, **kwargs)


def compress(
    keys: np.ndarray,
    values: np.ndarray,
    method: str | _methods.Method,
    budget: float | int,
    *,
    queries: np.ndarray | None = None,
    attention: np.ndarray | None = None,
    scale: float | None = None,
    inv_freq: np.ndarray | None = None,
    rotary_scaling: float | None = None,
    first_position: int | None = None,
    log_count_bias: bool = False,
    **params,
) -> CompressedKV:
    """Compresses one layer's KV cache to ``budget`` slots per KV head.

    Parameters
    ----------
    keys, values : ndarray, shape (heads_kv, tokens, head_dim)
        float32, float16 or bfloat16, C-contiguous, same dtype (read in place).
    method : str or kvpack.methods object
        A compression method: ``"full"``, ``"streaming_llm"``, ``"h2o"``, ``"snapkv"``,
        ``"keydiff"``, ``"expected_attention"``, ``"cam"``, ``"kvmerger"`` or its object
        (e.g. ``kvpack.methods.SnapKV(window=16)``). ``"full"`` keeps everything (the
        budget is still checked).
    budget : float or int
        A float in (0, 1] is a fraction of the tokens (rounded, at least 1); an int is a
        token count in [1, tokens].
    queries : ndarray, shape (heads_q, window, head_dim), optional
        The prompt's last queries; the accumulated attention each key received from them
        (causal, GQA groups summed) is the evidence H2O, SnapKV, CaM and KVMerger rank
        by. SnapKV observes only the last ``window`` of them. Expected Attention reads
        the queries themselves (their mean and covariance), so only ``queries`` serve it.
    attention : ndarray of float32, shape (heads_kv, tokens), optional
        The evidence given directly (e.g. from :func:`kvpack.accumulated_attention`).
        Pass ``queries`` or ``attention``, not both.
    scale : float, optional
        Score scale for evidence computed from ``queries``; default ``1/sqrt(head_dim)``.
    inv_freq : ndarray of float32, shape (rotary_dim / 2,), optional
        The rotary embedding (RoPE) the queries carry, for Expected Attention, which takes
        it off the queries and averages it over the positions to come: at position ``p``
        channel ``i`` turns with channel ``i + rotary_dim / 2`` by ``p * inv_freq[i]``
        (transformers' layout; later channels do not turn). None: the queries carry no
        rotation.
    rotary_scaling : float, optional
        transformers' ``attention_scaling`` of the rotary embedding (cos and sin are scaled
        by it); default 1.
    first_position : int, optional
        Position of the first of ``queries``; default ``tokens - window`` (the prompt's
        last queries). Expected Attention's future positions start after the last query.
    log_count_bias : bool
        Record that attention over the result should add ``log(counts)`` to each slot's
        score (see :meth:`CompressedKV.attend`); an extension beyond KVMerger's paper.
    **params
        The method's parameters (see its class in :mod:`kvpack.methods`; a method name
        takes them as keywords, a method object gets a changed copy); rejected, named,
        when the method does not read them:

        - ``sinks`` (4): first tokens always kept (``streaming_llm``, ``cam``).
        - ``recent_ratio`` (0.5): share of the budget held by the latest tokens (``h2o``).
        - ``window`` (32): SnapKV's observation window; ``kernel`` (5): its max-pooling width.
        - ``merge_window`` (32): successors a CaM-evicted value is spread over.
        - ``protect_recent``, ``protect_heavy``: shares of the tokens KVMerger never merges
          (the latest ones; the highest-attention ones). Default: the paper's 17% + 12% at a
          50% budget, 8% + 2% at 35%, linear between, scaled down below 35%.
        - ``sigma`` (5.0): KVMerger's Gaussian kernel width; ``"auto"`` sets it per merged
          run to the RMS distance of the members from the pivot.
        - ``adaptive`` (False): AdaKV's head-wise budgets (``h2o``, ``snapkv``, ``keydiff``,
          ``expected_attention``):
          every head's scores at ``budget`` pooled (the tokens the method always keeps
          first), each head's best ``max(1, floor(adaptive_floor * budget))`` taken first,
          then the best of the rest until the heads hold ``heads_kv * budget`` between them;
          ``adaptive_floor`` (0.2): AdaKV's safeguard.
        - ``future_positions`` (512), ``sinks`` (4), ``covariance`` (True), ``value_norm``
          (True), ``epsilon`` (0.0): Expected Attention's (kvpress's defaults).

    Returns
    -------
    CompressedKV

    Notes
    -----
    KVMerger always meets the budget exactly: it merges the ``tokens - budget`` most
    similar adjacent pairs of unprotected keys (the paper's threshold, searched per head;
    reported in ``thresholds``). CaM merges in expectation (``p * v / merge_window`` rather
    than a Bernoulli draw), so its result is deterministic.

    Examples
    --------
    >>> import numpy as np, kvpack
    >>> k = np.random.rand(2, 100, 64).astype(np.float16)
    >>> v = np.random.rand(2, 100, 64).astype(np.float16)
    >>> q = np.random.rand(8, 16, 64).astype(np.float32)
    >>> kvpack.compress(k, v, "kvmerger", 0.5, queries=q).keys.shape
    (2, 50, 64)
    """
    spec = _methods.resolve(method, **params)
    result = _core.compress(
        keys,
        values,
        spec,
        budget,
        queries,
        attention,
        scale,
        inv_freq,
        rotary_scaling,
        first_position,
    )
    return CompressedKV(
        keys=result["keys"],
        values=result["values"],
        counts=result["counts"],
        positions=result["positions"],
        method=spec.name,
        tokens=int(np.shape(keys)[1]),
        thresholds=result["thresholds"],
        log_count_bias=bool(log_count_bias),
    )


class EvictionCache:
    """A bounded decode-time cache for one layer: StreamingLLM's rolling window or H2O.

    At most ``budget`` tokens per KV head survive each step, so a model generates with
    constant memory. ``"streaming_llm"`` evicts the oldest token after the ``sinks``;
    ``"h2o"`` adds each step's attention weights to every kept token's accumulated
    attention and evicts the lowest outside the latest ``recent_ratio * budget`` tokens.

    Parameters
    ----------
    method : {"h2o", "streaming_llm"} or their kvpack.methods object
    budget : int
        Tokens per KV head kept between steps.
    scale : float, optional
        Attention score scale; default ``1/sqrt(head_dim)``.
    **params
        The method's parameters: ``sinks`` (StreamingLLM: first tokens never evicted, 4)
        or ``recent_ratio`` (H2O: share of the budget held by the latest tokens, 0.5).

    Examples
    --------
    >>> import numpy as np, kvpack
    >>> k = np.random.rand(2, 100, 64).astype(np.float32)
    >>> cache = kvpack.EvictionCache("streaming_llm", budget=32)
    >>> cache.prefill(k, k)
    >>> cache.step(np.ones((4, 64), np.float32), k[:, 0], k[:, 0]).shape
    (4, 64)
    >>> cache.size, cache.seen
    (32, 101)
    """

    def __init__(
        self,
        method: Literal["h2o", "streaming_llm"] | _methods.Method = "h2o",
        budget: int = 1024,
        *,
        scale: float | None = None,
        **params,
    ) -> None:
        spec = _methods.resolve(method, **params)
        self.method = spec.name
        self._cache = _core.EvictionCache(spec, budget, scale)

    def prefill(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        *,
        queries: np.ndarray | None = None,
        attention: np.ndarray | None = None,
    ) -> None:
        """Starts from a prompt's cache, keeping the method's choice of ``budget`` tokens.

        H2O needs the prompt's evidence: ``queries`` (heads_q, window, head_dim) or the
        accumulated ``attention`` (heads_kv, tokens), as for :func:`compress`.
        """
        self._cache.prefill(keys, values, queries, attention)

    def step(self, q: np.ndarray, new_key: np.ndarray, new_value: np.ndarray) -> np.ndarray:
        """Appends the new token, attends ``q`` over the kept tokens, then evicts.

        Parameters
        ----------
        q : ndarray, shape (heads_q, head_dim)
        new_key, new_value : ndarray, shape (heads_kv, head_dim)
            In the dtype of the prefill.

        Returns
        -------
        ndarray of float32, shape (heads_q, head_dim)
        """
        return self._cache.step(q, new_key, new_value)

    @property
    def budget(self) -> int:
        return self._cache.budget

    @property
    def size(self) -> int:
        """Tokens held per head."""
        return self._cache.size

    @property
    def seen(self) -> int:
        """Tokens of the sequence so far (prompt + decoded)."""
        return self._cache.seen

    @property
    def keys(self) -> np.ndarray:
        """Copy of the held keys, (heads_kv, size, head_dim), in slot order."""
        return self._cache.keys

    @property
    def values(self) -> np.ndarray:
        """Copy of the held values, laid out like :attr:`keys`."""
        return self._cache.values

    @property
    def positions(self) -> np.ndarray:
        """Original position of each slot, (heads_kv, size) int32 (slots are unordered)."""
        return self._cache.positions

    @property
    def scores(self) -> np.ndarray:
        """H2O's accumulated attention per slot, (heads_kv, size) float32."""
        return self._cache.scores
