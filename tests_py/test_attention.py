import numpy as np
import pytest

import kvpack

import reference
from conftest import KV_DTYPES, random_cache, random_indices

SHAPES = [  # heads_kv, heads_q, tokens, dim
    (1, 1, 1, 16),
    (2, 8, 7, 64),
    (4, 4, 600, 128),
    (2, 6, 1500, 40),  # groups of 3 (tile 3) and a head_dim that is no multiple of 16
    (3, 9, 700, 64),  # SmolLM2's heads (tile 3)
    (2, 10, 300, 64),  # groups of 5 (tile 1)
    (8, 32, 2100, 128),  # Llama-3-8B heads, several token chunks
    (1, 8, 300, 256),  # tile of 8 query heads
]


def assert_close(actual, expected, atol=2e-5, rtol=2e-5):
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize(("heads_kv", "heads_q", "tokens", "dim"), SHAPES)
def test_dense_matches_float64_reference(rng, dtype, heads_kv, heads_q, tokens, dim):
    q, k, v = random_cache(rng, heads_kv, tokens, dim, dtype, heads_q)
    out, lse, weights = kvpack.attention(q, k, v, return_lse=True, return_weights=True)
    ref_out, ref_lse, ref_weights = reference.decode_attention(q, k, v)
    assert out.dtype == np.float32 and out.shape == (heads_q, dim)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    assert_close(weights, ref_weights, atol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize(("heads_kv", "heads_q", "tokens", "dim"), SHAPES)
@pytest.mark.parametrize("per_query_head", [False, True])
def test_sparse_matches_reference(rng, dtype, heads_kv, heads_q, tokens, dim, per_query_head):
    q, k, v = random_cache(rng, heads_kv, tokens, dim, dtype, heads_q)
    rows = heads_q if per_query_head else heads_kv
    idx = random_indices(rng, rows, tokens, max(1, tokens // 3))
    out, lse, weights = kvpack.attention(q, k, v, idx, return_lse=True, return_weights=True)
    ref_out, ref_lse, ref_weights = reference.decode_attention(q, k, v, indices=idx)
    assert weights.shape == (heads_q, idx.shape[1])
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    assert_close(weights, ref_weights, atol=1e-6)


def test_all_indices_equal_dense(rng):
    q, k, v = random_cache(rng, 2, 777, 64, np.float16, 8)
    idx = np.ascontiguousarray(np.broadcast_to(np.arange(777, dtype=np.int32), (2, 777)))
    assert_close(kvpack.attention(q, k, v, idx), kvpack.attention(q, k, v), atol=1e-6)


def test_bias_and_scale(rng):
    q, k, v = random_cache(rng, 2, 900, 64, np.float32, 4)
    bias = np.log(rng.integers(1, 5, size=(2, 900))).astype(np.float32)
    out, lse = kvpack.attention(q, k, v, bias=bias, scale=0.3, return_lse=True)
    ref_out, ref_lse, _ = reference.decode_attention(q, k, v, bias=bias, scale=0.3)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    # A log-count bias equals attending the token repeated `count` times.
    counts = np.exp(bias).round().astype(int)
    k_rep = np.repeat(k[0], counts[0], axis=0)[None]
    v_rep = np.repeat(v[0], counts[0], axis=0)[None]
    ref_rep, _, _ = reference.decode_attention(q[:2], k_rep, v_rep, scale=0.3)
    assert_close(out[:2], ref_rep)


def test_return_combinations(rng):
    q, k, v = random_cache(rng, 1, 50, 32, np.float32)
    out = kvpack.attention(q, k, v)
    out_l, lse = kvpack.attention(q, k, v, return_lse=True)
    out_w, weights = kvpack.attention(q, k, v, return_weights=True)
    assert isinstance(out, np.ndarray) and lse.shape == (1,) and weights.shape == (1, 50)
    np.testing.assert_array_equal(out, out_l)
    np.testing.assert_array_equal(out, out_w)


def test_query_dtypes_are_converted(rng):
    q, k, v = random_cache(rng, 2, 100, 64, np.float16, 4)
    expected = kvpack.attention(q.astype(np.float16).astype(np.float32), k, v)
    assert_close(kvpack.attention(q.astype(np.float16), k, v), expected, atol=0)
    assert_close(kvpack.attention(q.astype(np.float64), k, v), kvpack.attention(q, k, v), atol=0)


def test_accumulated_attention_does_not_depend_on_threads(rng):
    queries = rng.standard_normal((12, 200, 32)).astype(np.float32)
    keys = rng.standard_normal((4, 300, 32)).astype(np.float16)
    before = kvpack.get_num_threads()
    try:
        kvpack.set_num_threads(1)
        one = kvpack.accumulated_attention(queries, keys)
        kvpack.set_num_threads(3)
        three = kvpack.accumulated_attention(queries, keys)
    finally:
        kvpack.set_num_threads(before)
    np.testing.assert_array_equal(one, three)
    expected = reference.accumulated_attention(queries, keys.astype(np.float32))
    np.testing.assert_allclose(one, expected, rtol=1e-4, atol=1e-5)


def test_result_does_not_depend_on_threads(rng):
    q, k, v = random_cache(rng, 8, 5000, 128, np.float16, 32)
    before = kvpack.get_num_threads()
    try:
        kvpack.set_num_threads(1)
        one = kvpack.attention(q, k, v)
        kvpack.set_num_threads(3)
        three = kvpack.attention(q, k, v)
    finally:
        kvpack.set_num_threads(before)
    assert_close(one, three, atol=1e-6)


def test_large_scores_are_stable(rng):
    q, k, v = random_cache(rng, 1, 300, 64, np.float32)
    q *= 200.0  # scores in the thousands: a naive softmax overflows
    out, lse = kvpack.attention(q, k, v, return_lse=True)
    ref_out, ref_lse, _ = reference.decode_attention(q, k, v)
    assert_close(out, ref_out, atol=1e-4)
    assert_close(lse, ref_lse, rtol=1e-6)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("per_query_head", [False, True])
def test_accumulated_attention(rng, dtype, causal, reduction, per_query_head):
    _, k, _ = random_cache(rng, 2, 150, 48, dtype)
    queries = rng.standard_normal((6, 70, 48), dtype=np.float32)
    got = kvpack.accumulated_attention(
        queries, k, causal=causal, reduction=reduction, per_query_head=per_query_head
    )
    expected = reference.accumulated_attention(queries, k, causal, reduction, per_query_head)
    assert got.shape == expected.shape
    assert_close(got, expected, atol=1e-5)


def test_accumulated_attention_totals(rng):
    _, k, _ = random_cache(rng, 2, 300, 64, np.float16)
    queries = rng.standard_normal((8, 32, 64), dtype=np.float32)
    total = kvpack.accumulated_attention(queries, k)
    # Every query spreads a mass of 1 over its keys; a group of 4 heads x 32 queries.
    np.testing.assert_allclose(total.sum(axis=1), 4 * 32, rtol=1e-5)
    # Keys after the window's first position are seen by fewer queries.
    mean = kvpack.accumulated_attention(queries, k, reduction="mean")
    assert_close(mean[:, -1], total[:, -1] / 4)


def test_accumulated_attention_whole_prompt(rng):
    # window == tokens: full causal prefill evidence, more rows than one query block.
    _, k, _ = random_cache(rng, 1, 130, 32, np.float32)
    queries = rng.standard_normal((2, 130, 32), dtype=np.float32)
    got = kvpack.accumulated_attention(queries, k, per_query_head=True)
    assert_close(got, reference.accumulated_attention(queries, k, per_query_head=True), atol=1e-5)


def held_case(rng, dtype, batch=2, new=3, heads_kv=3, heads_q=9, held=40, decoded=5, dim=64):
    """A batch's cache: held slots with some rows padded (-1) and a permuted head, then
    decoded tokens; keys in a buffer with spare room (strided heads)."""
    slots = held + decoded
    buffer = rng.standard_normal((2, batch, heads_kv, slots + 7, dim), dtype=np.float32)
    keys, values = (x[:, :, :slots] for x in buffer.astype(dtype))
    first_decoded = 2 * held + 20
    positions = np.stack(
        [np.stack([np.sort(rng.choice(first_decoded, held, replace=False))] * heads_kv)] * batch
    ).astype(np.int64)
    positions[-1, :, held - 9 :] = -1  # the last row is shorter
    positions[0, 1] = rng.permutation(positions[0, 1])  # held slots in any order
    queries = rng.standard_normal((batch, new, heads_q, dim), dtype=np.float32)
    first_query = first_decoded + decoded - new
    return queries, keys, values, positions, first_decoded, first_query


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_held_attention_matches_reference(rng, dtype, with_bias):
    case = held_case(rng, dtype)
    bias = None
    if with_bias:
        bias = np.log(rng.integers(1, 5, size=case[3].shape)).astype(np.float32)
    out = kvpack._core.held_attention(*case, bias=bias, scale=0.2)
    assert_close(out, reference.held_attention(*case, bias=bias, scale=0.2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 1, 30, 70])
def test_held_attention_softcap_window_and_sinks(rng, window):
    # What Gemma 2 (softcap, sliding windows) and gpt-oss (sinks) add to the scores.
    case = held_case(rng, np.float16)
    heads_q = case[0].shape[2]
    sinks = rng.standard_normal(heads_q).astype(np.float32) * 3
    options = dict(softcap=2.5, window=window, sinks=sinks, scale=0.3)
    out = kvpack._core.held_attention(*case, **options)
    assert_close(out, reference.held_attention(*case, **options), atol=1e-4, rtol=1e-4)


def test_held_attention_rules_are_checked(rng):
    case = held_case(rng, np.float32)
    with pytest.raises(ValueError, match="softcap: expected a positive"):
        kvpack._core.held_attention(*case, softcap=0.0)
    with pytest.raises(ValueError, match="window: expected an int >= 1"):
        kvpack._core.held_attention(*case, window=0)
    with pytest.raises(ValueError, match=r"sinks: expected shape \(9,\)"):
        kvpack._core.held_attention(*case, sinks=np.zeros(3, np.float32))


def test_held_attention_long_cache_and_one_query(rng):
    # Several token chunks per stream; one query sees every slot.
    case = held_case(rng, np.float32, batch=1, new=1, held=1500, decoded=700, dim=64)
    case = (*case[:3], np.arange(1500, dtype=np.int64)[None, None].repeat(3, 1), 1500, 2199)
    assert case[1].shape[2] == 2200
    assert_close(kvpack._core.held_attention(*case), reference.held_attention(*case))


def test_held_attention_equals_decode_attention(rng):
    # One row, one query, every slot held: kvpack.attention over the same cache.
    q, k, v = random_cache(rng, 2, 300, 32, np.float16, 8)
    positions = np.arange(300, dtype=np.int64)[None, None].repeat(2, 1)
    out = kvpack._core.held_attention(q[None, None], k[None], v[None], positions, 300, 300)
    np.testing.assert_allclose(out[0, 0], kvpack.attention(q, k, v), atol=1e-6)


def test_held_attention_errors(rng):
    queries, keys, values, positions, first_decoded, first_query = held_case(rng, np.float32)
    call = kvpack._core.held_attention
    with pytest.raises(ValueError, match="positions: expected each held position"):
        call(queries, keys, values, positions + first_decoded, first_decoded, first_query)
    with pytest.raises(ValueError, match="queries: expected heads_q to be a positive multiple"):
        call(
            np.ascontiguousarray(queries[:, :, :4]),
            keys,
            values,
            positions,
            first_decoded,
            first_query,
        )
    with pytest.raises(ValueError, match="values: expected shape"):
        call(queries, keys, values[:, :, :3], positions, first_decoded, first_query)
    with pytest.raises(TypeError, match="positions: expected dtype int64"):
        call(queries, keys, values, positions.astype(np.int32), first_decoded, first_query)
    with pytest.raises(ValueError, match="bias: expected shape"):
        call(queries, keys, values, positions, first_decoded, first_query, bias=queries[0])
    with pytest.raises(ValueError, match="first_query: expected at least"):
        call(queries, keys, values, positions, first_decoded, first_decoded - 1)
    with pytest.raises(ValueError, match="sees no slot"):
        empty = np.full_like(positions, -1)
        call(queries, keys[:, :, :40], values[:, :, :40], empty, first_decoded, first_query)
