"""Property-based tests (hypothesis): attention, quantized attention, accumulated attention
and compress against the float64 references of reference.py, over random shapes, storage
dtypes, byte orders and GQA ratios. Arrays the core reads in place (keys, values, indices,
bias) must be refused, naming the argument, when their byte order is not native; queries
and evidence are converted; nothing is ever misread."""

import numpy as np
import pytest

import kvpack

import reference as ref
from conftest import BFLOAT16

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Derandomized: the same examples every run (a failure reproduces), no example database.
PROPERTIES = settings(max_examples=60, deadline=None, derandomize=True, database=None)

DTYPES = [np.dtype(np.float32), np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 else [])


@st.composite
def caches(draw, max_tokens=160):
    """(q, keys, values) with GQA: heads_q = heads_kv x group, float32 queries."""
    heads_kv = draw(st.integers(1, 4))
    group = draw(st.sampled_from([1, 2, 3, 4, 5]))
    tokens = draw(st.integers(1, max_tokens))
    dim = draw(st.sampled_from([1, 3, 8, 16, 33, 64, 128]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keys = rng.standard_normal((heads_kv, tokens, dim), dtype=np.float32).astype(dtype)
    values = rng.standard_normal((heads_kv, tokens, dim), dtype=np.float32).astype(dtype)
    q = rng.standard_normal((heads_kv * group, dim), dtype=np.float32)
    return q, keys, values, rng


def swapped(array):
    """The same values stored in the other byte order."""
    return array.astype(array.dtype.newbyteorder("S"))


@PROPERTIES
@given(caches(), st.booleans(), st.booleans(), st.sampled_from([None, 0.05, 0.3]))
def test_attention_matches_float64(cache, sparse, with_bias, scale):
    q, keys, values, rng = cache
    heads_kv, tokens, _ = keys.shape
    indices = bias = None
    if sparse:
        rows = q.shape[0] if rng.random() < 0.5 else heads_kv
        count = int(rng.integers(1, tokens + 1))
        indices = np.sort(
            np.stack([rng.choice(tokens, count, replace=False) for _ in range(rows)]), axis=1
        ).astype(np.int32)
    if with_bias:
        bias = np.log(rng.integers(1, 5, (heads_kv, tokens))).astype(np.float32)
    out, lse = kvpack.attention(
        q, keys, values, indices=indices, bias=bias, scale=scale, return_lse=True
    )
    expected, expected_lse, _ = ref.decode_attention(q, keys, values, indices, bias, scale)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=2e-4, atol=2e-5)
    # A query in the other byte order is converted: the same answer.
    np.testing.assert_array_equal(
        kvpack.attention(swapped(q), keys, values, indices=indices, bias=bias, scale=scale), out
    )
    # Arrays read in place are refused in the other byte order, never misread.
    for name in ("keys", "values") + (("indices",) if sparse else ()):
        args = {"keys": keys, "values": values, "indices": indices}
        args[name] = swapped(args[name])
        with pytest.raises(ValueError, match=f"{name}: expected native byte order"):
            kvpack.attention(q, args["keys"], args["values"], indices=args["indices"])


@PROPERTIES
@given(
    caches(max_tokens=300),
    st.sampled_from([2, 4, 8]),
    st.sampled_from([4, 16, 32]),
    st.sampled_from([0, 16, 128]),
)
def test_quantized_attention_matches_float64_of_the_dequantized_cache(cache, bits, group, residual):
    q, keys, values, _ = cache
    if keys.dtype == BFLOAT16:
        keys, values = keys.astype(np.float32), values.astype(np.float32)
    quantized = kvpack.quantize(keys, values, bits, group=group, residual=residual)
    dequantized_keys, dequantized_values, quantized_tokens = ref.kivi_dequantize(
        keys, values, bits, group, residual
    )
    assert quantized.quantized == quantized_tokens
    expected, _, _ = ref.decode_attention(
        q, dequantized_keys.astype(keys.dtype), dequantized_values.astype(keys.dtype)
    )
    np.testing.assert_allclose(quantized.attend(q), expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(quantized.attend(swapped(q)), quantized.attend(q))


@PROPERTIES
@given(
    caches(),
    st.integers(1, 12),
    st.booleans(),
    st.sampled_from(["sum", "mean"]),
    st.booleans(),
    st.booleans(),
)
def test_accumulated_attention_matches_float64(
    cache, window, causal, reduction, per_query_head, swap
):
    q, keys, _, rng = cache
    heads_q, dim = q.shape
    window = min(window, keys.shape[1])
    queries = rng.standard_normal((heads_q, window, dim), dtype=np.float32)
    got = kvpack.accumulated_attention(
        swapped(queries) if swap else queries,
        keys,
        causal=causal,
        reduction=reduction,
        per_query_head=per_query_head,
    )
    expected = ref.accumulated_attention(queries, keys, causal, reduction, per_query_head)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="keys: expected native byte order"):
        kvpack.accumulated_attention(queries, swapped(keys))


@PROPERTIES
@given(
    caches(max_tokens=240),
    st.sampled_from(["streaming_llm", "h2o", "snapkv"]),
    st.floats(0.05, 1.0),
    st.booleans(),
)
def test_compress_matches_float64(cache, method, share, swap):
    _, keys, values, rng = cache
    heads_kv, tokens, _ = keys.shape
    scores = rng.random((heads_kv, tokens), dtype=np.float32)
    result = kvpack.compress(
        keys, values, method, share, attention=swapped(scores) if swap else scores
    )
    slots = kvpack.budget_tokens(share, tokens)
    expected = ref.compress(keys, values, method, slots, scores)
    np.testing.assert_array_equal(result.positions, expected["positions"])
    np.testing.assert_array_equal(result.counts, expected["counts"])
    assert result.keys.dtype == keys.dtype
    np.testing.assert_array_equal(result.keys.astype(np.float64), expected["keys"])
    np.testing.assert_array_equal(result.values.astype(np.float64), expected["values"])
    with pytest.raises(ValueError, match="values: expected native byte order"):
        kvpack.compress(keys, swapped(values), method, share, attention=scores)
