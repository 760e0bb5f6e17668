"""kvpack.quantize (KIVI codes) and attention over the codes against NumPy references."""

import math

import numpy as np
import pytest

import kvpack

import reference
from conftest import KV_DTYPES


def outlier_cache(rng, heads=2, tokens=300, dim=48, dtype=np.float32):
    """Keys with a few large outlier channels (why KIVI quantizes keys per channel)."""
    keys = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
    keys[:, :, :3] *= 12.0
    values = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
    return keys.astype(dtype), values.astype(dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize(
    ("tokens", "group", "residual"), [(300, 32, 128), (200, 16, 10), (50, 32, 128)]
)
def test_dequantize_matches_reference(rng, bits, dtype, tokens, group, residual):
    keys, values = outlier_cache(rng, tokens=tokens, dtype=dtype)
    qkv = kvpack.quantize(keys, values, bits, group=group, residual=residual)
    ref_k, ref_v, n = reference.kivi_dequantize(keys, values, bits, group, residual)
    assert qkv.quantized == n and qkv.tokens == tokens and qkv.dtype == dtype
    k, v = qkv.dequantize()
    np.testing.assert_allclose(k, ref_k, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, ref_v, rtol=1e-6, atol=1e-6)
    # The residual window is exact.
    np.testing.assert_array_equal(k[:, n:], keys[:, n:].astype(np.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_attention_over_codes_equals_attention_over_dequantized(rng, bits):
    keys, values = outlier_cache(rng, tokens=400, dtype=np.float16)
    qkv = kvpack.quantize(keys, values, bits)
    q = rng.standard_normal((6, 48)).astype(np.float32)
    out, lse, weights = qkv.attend(q, return_lse=True, return_weights=True)
    k, v = qkv.dequantize()
    ref_out, ref_lse, ref_w = reference.decode_attention(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    np.testing.assert_allclose(weights, ref_w, atol=1e-6)


@pytest.mark.parametrize("tail_dtype", [np.float32, np.float16])
def test_attention_over_codes_and_a_tail_in_one_softmax(rng, tail_dtype):
    keys, values = outlier_cache(rng, tokens=200, dtype=np.float16)
    qkv = kvpack.quantize(keys, values, 2, residual=40)
    # The tail is a slice of a buffer with spare room: heads are 50 rows apart.
    buffer = rng.standard_normal((2, 2, 50, 48)).astype(tail_dtype)
    tail_k, tail_v = buffer[0, :, :7], buffer[1, :, :7]
    q = rng.standard_normal((6, 48)).astype(np.float32)
    out, lse, weights = qkv.attend(q, return_lse=True, return_weights=True, tail=(tail_k, tail_v))
    k, v = qkv.dequantize()
    k = np.concatenate([k, tail_k.astype(np.float32)], axis=1)
    v = np.concatenate([v, tail_v.astype(np.float32)], axis=1)
    ref_out, ref_lse, ref_w = reference.decode_attention(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    np.testing.assert_allclose(weights, ref_w, atol=1e-6)
    with pytest.raises(ValueError, match="tail"):
        qkv.attend(q, tail=(tail_k[:1], tail_v[:1]))
    with pytest.raises(ValueError, match="tail keys"):
        qkv.attend(q, tail=(buffer[0, :, :7, ::2], tail_v))
    bad = tail_v.copy()
    bad[1, 3, 5] = np.nan
    with pytest.raises(
        ValueError, match=r"tail values: contains NaN or Inf \(first at \[1, 3, 5\]"
    ):
        qkv.attend(q, tail=(tail_k, bad))


def test_codes_are_packed_densely(rng):
    keys, values = outlier_cache(rng, heads=4, tokens=4096, dim=128, dtype=np.float16)
    for bits in (2, 4, 8):
        qkv = kvpack.quantize(keys, values, bits)
        n = qkv.quantized
        codes = 2 * 4 * n * 128 * bits // 8
        ranges = 2 * 2 * 4 * (n // 32 * 128 + n * math.ceil(128 / 32))  # float16 pairs
        rest = 2 * 4 * (4096 - n) * 128 * 2
        assert qkv.nbytes == codes + ranges + rest
    assert kvpack.quantize(keys, values, 2).compression_ratio > 4.5


def test_error_falls_with_more_bits(rng):
    keys, values = outlier_cache(rng, tokens=600)
    q = rng.standard_normal((2, 48)).astype(np.float32)
    full = kvpack.attention(q, keys, values)
    errors = []
    for bits in (2, 4, 8):
        quantized = kvpack.quantize(keys, values, bits, residual=0)
        k, _ = quantized.dequantize()
        out = quantized.attend(q)
        errors.append((np.abs(k - keys).mean(), np.linalg.norm(out - full) / np.linalg.norm(full)))
    assert errors[0][0] > errors[1][0] > errors[2][0]
    assert errors[0][1] > errors[1][1] > errors[2][1]
    assert errors[2][1] < 1e-2


def test_bad_arguments_raise(rng):
    keys, values = outlier_cache(rng, tokens=64)
    with pytest.raises(ValueError, match="bits: expected 2, 4 or 8, got 3"):
        kvpack.quantize(keys, values, 3)
    with pytest.raises(ValueError, match=r"group: expected 1 to 2\^32 - 1 .*, got 0"):
        kvpack.quantize(keys, values, group=0)
    with pytest.raises(ValueError, match=r"group: .*, got 1099511627776"):
        kvpack.quantize(keys, values, group=2**40)
    with pytest.raises(ValueError, match="residual: expected >= 0, got -1"):
        kvpack.quantize(keys, values, residual=-1)
    bad = keys.copy()
    bad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="keys"):
        kvpack.quantize(bad, values)
    qkv = kvpack.quantize(keys, values)
    with pytest.raises(ValueError, match="q: expected head_dim 48"):
        qkv.attend(np.ones((2, 8), np.float32))


def test_group_beyond_the_context_allocates_for_the_context(rng):
    # 2^31 tokens per group over 64 tokens: nothing quantized, scratch sized by the context
    # (it was sized by the group: 2^31 x head_dim floats, a MemoryError).
    keys, values = outlier_cache(rng, tokens=64)
    q = rng.standard_normal((8, keys.shape[2])).astype(np.float32)
    huge = kvpack.quantize(keys, values, 2, group=2**31 - 1, residual=0)
    assert huge.quantized == 0
    np.testing.assert_allclose(
        huge.attend(q), kvpack.attention(q, keys, values), rtol=1e-5, atol=1e-6
    )
    k, v = huge.dequantize()
    np.testing.assert_array_equal(k, keys)
    np.testing.assert_array_equal(v, values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_into_caller_arrays(rng, bits):
    keys = rng.standard_normal((2, 300, 64)).astype(np.float16)
    values = rng.standard_normal((2, 300, 64)).astype(np.float16)
    quantized = kvpack.quantize(keys, values, bits=bits)
    expected_k, expected_v, _ = reference.kivi_dequantize(keys, values, bits)
    out = (np.empty_like(keys), np.empty_like(values))
    assert quantized.dequantize(out=out)[0] is out[0]
    np.testing.assert_allclose(out[0], expected_k.astype(np.float16), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out[1], expected_v.astype(np.float16), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="out"):
        quantized.dequantize(out=(np.empty((2, 299, 64), np.float16),) * 2)


def test_attention_reads_quantized_cache(rng):
    keys = rng.standard_normal((2, 400, 64)).astype(np.float32)
    values = rng.standard_normal((2, 400, 64)).astype(np.float32)
    q = rng.standard_normal((8, 64)).astype(np.float32)
    quantized = kvpack.quantize(keys, values, bits=4)
    rk, rv, _ = reference.kivi_dequantize(keys, values, 4)
    expected = reference.decode_attention(q, rk, rv)[0]
    np.testing.assert_allclose(kvpack.attention(q, quantized), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="QuantizedKV"):
        kvpack.attention(q, quantized, values)
    with pytest.raises(TypeError, match="values"):
        kvpack.attention(q, keys)


@pytest.mark.parametrize("tail_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scale", [None, 0.05])
def test_quantized_attention_equals_an_attend_per_row_and_position(rng, tail_dtype, scale):
    batch, fresh, decoded, capacity, heads_q, heads, dim = 3, 3, 5, 8, 6, 2, 32
    prompts = [rng.standard_normal((heads, 150 + 20 * b, dim)).astype(np.float16) for b in range(3)]
    quantized = [kvpack.quantize(k, k[:, ::-1].copy(), bits=2, residual=16) for k in prompts]
    queries = rng.standard_normal((batch, fresh, heads_q, dim)).astype(np.float32)
    # The decoded tokens: a slice of a buffer with spare room, read in place.
    buffer = rng.standard_normal((2, batch, heads, capacity, dim)).astype(tail_dtype)
    tail_keys, tail_values = buffer[0, :, :, :decoded], buffer[1, :, :, :decoded]
    cores = [q._core for q in quantized]
    out = kvpack._core.quantized_attention(cores, queries, tail_keys, tail_values, scale)
    assert out.shape == (batch, fresh, heads_q, dim) and out.dtype == np.float32
    for b, q in enumerate(quantized):
        for i in range(fresh):
            seen = decoded - fresh + i + 1
            tail = (tail_keys[b, :, :seen], tail_values[b, :, :seen])
            np.testing.assert_array_equal(
                out[b, i], q.attend(queries[b, i], scale=scale, tail=tail)
            )


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_quantized_attention_caps_scores_and_adds_sinks_like_float64(rng, softcap, with_sinks):
    # Gemma 2's softcap and gpt-oss's sinks over the codes and the decoded tail: float64
    # attention over the dequantized cache under the same rules; lse counts the sink.
    heads_q, heads, dim, fresh = 6, 2, 32, 3
    keys = rng.standard_normal((heads, 150, dim)).astype(np.float16)
    values = rng.standard_normal(keys.shape).astype(np.float16)
    quantized = kvpack.quantize(keys, values, bits=4, residual=16)._core
    codes_keys, codes_values = quantized.dequantize()
    tail = rng.standard_normal((2, 1, heads, fresh, dim)).astype(np.float16)
    queries = 3 * rng.standard_normal((1, fresh, heads_q, dim)).astype(np.float32)
    sinks = rng.standard_normal(heads_q).astype(np.float32) + 2 if with_sinks else None
    out = kvpack._core.quantized_attention(
        [quantized], queries, tail[0], tail[1], 0.2, softcap, sinks
    )
    for i in range(fresh):
        k = np.concatenate([codes_keys, tail[0, 0, :, : i + 1]], 1)
        v = np.concatenate([codes_values, tail[1, 0, :, : i + 1]], 1)
        expected, lse, _ = reference.decode_attention(
            queries[0, i], k, v, scale=0.2, softcap=softcap, sinks=sinks
        )
        np.testing.assert_allclose(out[0, i], expected, rtol=2e-4, atol=2e-5)
        _, got_lse, _ = quantized.attend(
            queries[0, i],
            scale=0.2,
            return_lse=True,
            tail_keys=tail[0, 0, :, : i + 1],
            tail_values=tail[1, 0, :, : i + 1],
            softcap=softcap,
            sinks=sinks,
        )
        np.testing.assert_allclose(got_lse, lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", ["quantized_attention", "recall_step"])
def test_score_rules_are_checked(rng, call):
    keys = rng.standard_normal((2, 100, 32)).astype(np.float16)
    if call == "quantized_attention":
        cores = [kvpack.quantize(keys, keys)._core]
    else:
        cache = kvpack.RecallCache(budget=16)
        cache.prefill(keys, keys)
        cores = [cache._recall]
    queries = np.zeros((1, 1, 4, 32), np.float32)
    tail = np.zeros((1, 2, 1, 32), np.float16)
    step = getattr(kvpack._core, call)
    for kwargs, error, message in [
        ({"softcap": -1.0}, ValueError, "softcap: expected a positive finite float"),
        ({"softcap": float("inf")}, ValueError, "softcap: expected a positive finite float"),
        ({"sinks": np.zeros(3, np.float32)}, ValueError, r"sinks: expected shape \(4,\)"),
        ({"sinks": np.full(4, np.nan, np.float32)}, ValueError, "sinks"),
        ({"scale": 0.0}, ValueError, "scale: expected a positive number"),
        ({"softcap": "x"}, TypeError, "softcap"),
    ]:
        with pytest.raises(error, match=message):
            step(cores, queries, tail, tail, **kwargs)


def test_quantized_attention_rejects_bad_arguments(rng):
    keys = rng.standard_normal((2, 100, 32)).astype(np.float16)
    cores = [kvpack.quantize(keys, keys)._core] * 2
    queries = np.zeros((2, 2, 4, 32), np.float32)
    tail = np.zeros((2, 2, 3, 32), np.float16)
    attend = kvpack._core.quantized_attention
    cases = [
        (lambda: attend(cores[:1], queries, tail, tail), ValueError, "quantized: expected one"),
        (lambda: attend([cores[0], keys], queries, tail, tail), TypeError, r"quantized\[1\]"),
        (lambda: attend(cores, queries[0], tail, tail), ValueError, "queries: expected 4"),
        (lambda: attend(cores, queries, tail[:, :, :1], tail[:, :, :1]), ValueError, "at least"),
        (lambda: attend(cores, queries, tail, tail[:, :, :2]), ValueError, "tail_values"),
        (lambda: attend(cores, queries, tail[:1], tail[:1]), ValueError, "tail_keys: expected"),
        (lambda: attend(cores, queries, tail[:, :1], tail[:, :1]), ValueError, "heads_kv 2"),
        (lambda: attend(cores, queries, tail.astype(np.int16), tail), TypeError, "tail_keys"),
        (lambda: attend(cores, queries, tail, tail, -1.0), ValueError, "scale"),
        (lambda: attend(cores, queries, np.full_like(tail, np.inf), tail), ValueError, "tail_keys"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
