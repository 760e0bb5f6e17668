"""KIVI-style quantization of a layer's KV cache, attended without expanding it."""

from __future__ import annotations

import numpy as np

from . import _core

__all__ = ["QuantizedKV", "quantize"]


class QuantizedKV:
    """One layer's cache in KIVI form: integer codes plus a full-precision recent window.

    Keys are quantized per channel over groups of ``group`` tokens (their outlier
    channels keep their own range), values per token over groups of ``group`` channels;
    each group stores a float16 scale and minimum and ``bits``-bit codes packed densely.
    The latest ``residual`` tokens (plus those short of a whole group) stay in the input
    dtype. Build it with :func:`quantize`.
    """

    def __init__(self, core: _core.QuantizedKV) -> None:
        self._core = core

    def attend(
        self,
        q: np.ndarray,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        return_weights: bool = False,
        tail: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """Decode attention of ``q`` (heads_q, head_dim) over the codes, as
        :func:`kvpack.attention` over the dequantized cache would give.

        ``tail`` = (keys, values), each (heads, n, head_dim) in any KV dtype: full-precision
        tokens that follow the cache (those decoded since it was quantized), attended in
        the same softmax. Each head's rows must be contiguous; heads may be further apart
        (a slice of a buffer with spare room is read in place). Weights then cover
        ``tokens + n`` positions."""
        tail_keys, tail_values = tail if tail is not None else (None, None)
        out, lse, weights = self._core.attend(
            q, scale, return_lse, return_weights, tail_keys, tail_values
        )
        if not (return_lse or return_weights):
            return out
        extra = tuple(x for x, wanted in ((lse, return_lse), (weights, return_weights)) if wanted)
        return (out, *extra)

    def dequantize(self, out: tuple[np.ndarray, np.ndarray] | None = None):
        """The cache the codes stand for: float32 keys and values (heads, tokens, head_dim),
        or written into ``out`` = (keys, values), writable C-contiguous arrays of that shape
        in any KV dtype (a preallocated cache), which are returned."""
        if out is None:
            return self._core.dequantize()
        keys, values = out
        return self._core.dequantize(keys, values)

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales, minima and full-precision rows."""
        return self._core.nbytes

    @property
    def compression_ratio(self) -> float:
        """Bytes of the original keys and values per byte of the quantized form."""
        original = 2 * self.heads * self.tokens * self.head_dim * self.dtype.itemsize
        return original / self.nbytes

    bits = property(lambda self: self._core.bits, doc="Bits per code: 2, 4 or 8.")
    group = property(
        lambda self: self._core.group, doc="Tokens (keys) / channels (values) per group."
    )
    residual = property(lambda self: self._core.residual, doc="Latest tokens kept unquantized.")
    quantized = property(lambda self: self._core.quantized, doc="Tokens per head held as codes.")
    heads = property(lambda self: self._core.heads)
    tokens = property(lambda self: self._core.tokens)
    head_dim = property(lambda self: self._core.head_dim)
    dtype = property(lambda self: np.dtype(self._core.dtype), doc="Dtype of the original cache.")


def quantize(
    keys: np.ndarray,
    values: np.ndarray,
    bits: int = 2,
    *,
    group: int = 32,
    residual: int = 128,
) -> QuantizedKV:
    """Quantizes one layer's cache the KIVI way.

    Parameters
    ----------
    keys, values : ndarray, shape (heads_kv, tokens, head_dim)
        float32, float16 or bfloat16, C-contiguous, same dtype.
    bits : {2, 4, 8}
    group : int
        Tokens per key group and channels per value group (default 32).
    residual : int
        Latest tokens kept in full precision (default 128); the quantized prefix is the
        largest multiple of ``group`` that leaves at least this many.

    Returns
    -------
    QuantizedKV

    Examples
    --------
    >>> import numpy as np, kvpack
    >>> k = np.random.rand(2, 1000, 64).astype(np.float16)
    >>> qkv = kvpack.quantize(k, k, bits=2)
    >>> qkv.quantized, qkv.attend(np.ones((4, 64), np.float32)).shape
    (864, (4, 64))
    """
    return QuantizedKV(_core.QuantizedKV(keys, values, bits, group, residual))
