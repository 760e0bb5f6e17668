"""Decode attention and accumulated attention: the step every kvpack method shares."""

from __future__ import annotations

from typing import Literal

import numpy as np

from . import _core

__all__ = ["accumulated_attention", "attention"]


def attention(
    q: np.ndarray,
    keys,
    values: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    *,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    device: Literal["cpu", "cuda"] = "cpu",
):
    """Attention of one decode step over a layer's KV cache, dense or over index sets.

    Grouped-query aware: query head ``h`` reads KV head ``h // (heads_q // heads_kv)``.
    Arithmetic is float32 whatever the storage dtype; K and V are read in place.

    Parameters
    ----------
    q : ndarray, shape (heads_q, head_dim)
        The step's queries (any float dtype; converted to float32, it is small).
    keys, values : ndarray, shape (heads_kv, tokens, head_dim)
        float32, float16 or bfloat16 (``ml_dtypes``), C-contiguous, same dtype. Or
        ``keys`` a :class:`kvpack.QuantizedKV` and no ``values``: attention reads the
        codes directly, without expanding them (dense, no bias).
    indices : ndarray of int32, shape (heads_kv, n) or (heads_q, n), optional
        Token indices to attend, each row sorted ascending without duplicates. One
        row per KV head is shared by its query group; one row per query head lets
        every query head choose its own tokens. ``None`` attends every token.
    bias : ndarray of float32, shape (heads_kv, tokens), optional
        Added to each scaled score, e.g. ``log(counts)`` for merged slots.
    scale : float, optional
        Score scale; default ``1 / sqrt(head_dim)``.
    return_lse, return_weights : bool
        Also return the log-sum-exp ``(heads_q,)`` and/or the softmax weights
        ``(heads_q, n)`` (``n`` = tokens, or the number of indices per row).
    device : {"cpu", "cuda"}
        Backend; ``"cuda"`` needs :func:`kvpack.cuda_available`.

    Returns
    -------
    out : ndarray of float32, shape (heads_q, head_dim)
        Followed by ``lse`` and/or ``weights`` when requested.

    Examples
    --------
    >>> import numpy as np, kvpack
    >>> k = np.random.rand(2, 100, 64).astype(np.float16)
    >>> v = np.random.rand(2, 100, 64).astype(np.float16)
    >>> q = np.random.rand(8, 64).astype(np.float32)
    >>> kvpack.attention(q, k, v).shape
    (8, 64)
    """
    from .quantization import QuantizedKV

    if isinstance(keys, QuantizedKV):
        if values is not None or indices is not None or bias is not None or device != "cpu":
            raise ValueError(
                "keys: a QuantizedKV is attended whole on the CPU; pass no values, indices or bias"
            )
        return keys.attend(q, scale=scale, return_lse=return_lse, return_weights=return_weights)
    if values is None:
        raise TypeError("values: required with keys given as an array")
    out, lse, weights = _core.attention(
        q, keys, values, indices, bias, scale, return_lse, return_weights, device
    )
    if not (return_lse or return_weights):
        return out
    extra = tuple(x for x, wanted in ((lse, return_lse), (weights, return_weights)) if wanted)
    return (out, *extra)


def accumulated_attention(
    queries: np.ndarray,
    keys: np.ndarray,
    *,
    causal: bool = True,
    reduction: Literal["sum", "mean"] = "sum",
    per_query_head: bool = False,
    scale: float | None = None,
    device: Literal["cpu", "cuda"] = "cpu",
) -> np.ndarray:
    """Attention each key receives from a window of queries (H2O / SnapKV / KVMerger evidence).

    Parameters
    ----------
    queries : ndarray, shape (heads_q, window, head_dim)
        The last ``window`` queries of a prompt (any float dtype; used as float32).
    keys : ndarray, shape (heads_kv, tokens, head_dim)
        float32, float16 or bfloat16, C-contiguous.
    causal : bool
        Query ``i`` sits at position ``tokens - window + i`` and sees keys up to it.
    reduction : {"sum", "mean"}
        ``"mean"`` divides each key's sum by the number of queries that can see it
        (times the group size when groups are reduced).
    per_query_head : bool
        ``False`` sums each GQA group onto its KV head: shape ``(heads_kv, tokens)``;
        ``True`` keeps one row per query head: ``(heads_q, tokens)``.
    scale : float, optional
        Score scale; default ``1 / sqrt(head_dim)``.
    device : {"cpu", "cuda"}

    Returns
    -------
    ndarray of float32, shape (heads_kv, tokens) or (heads_q, tokens)
    """
    return _core.accumulated_attention(
        queries, keys, causal, reduction, per_query_head, scale, device
    )
