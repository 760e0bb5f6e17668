"""Bad input raises ValueError / TypeError naming the argument; nothing crashes."""

import os

import numpy as np
import pytest

import kvpack

RNG = np.random.default_rng(7)
Q = RNG.standard_normal((4, 32), dtype=np.float32)
K = RNG.standard_normal((2, 50, 32), dtype=np.float32).astype(np.float16)
V = RNG.standard_normal((2, 50, 32), dtype=np.float32).astype(np.float16)


def idx(rows):
    return np.array(rows, dtype=np.int32)


def with_nan(array, where):
    array = array.copy()
    array[where] = np.nan
    return array


ATTENTION_CASES = {
    "keys float64": (
        dict(keys=K.astype(np.float64)),
        TypeError,
        "keys: expected dtype float32, float16 or bfloat16, got float64",
    ),
    "keys int": (dict(keys=K.astype(np.int16)), TypeError, "keys: expected dtype"),
    "keys 2-d": (
        dict(keys=K[0]),
        ValueError,
        r"keys: expected 3 dimensions \[heads_kv, tokens, head_dim\], got shape \(50, 32\)",
    ),
    "keys empty": (
        dict(keys=K[:, :0], values=V[:, :0]),
        ValueError,
        "keys: expected a non-empty cache",
    ),
    "values shape": (
        dict(values=V[:, :49].copy()),
        ValueError,
        r"values: expected shape \(2, 50, 32\) like keys, got \(2, 49, 32\)",
    ),
    "values dtype": (
        dict(values=V.astype(np.float32)),
        TypeError,
        "values: expected dtype float16 like keys, got float32",
    ),
    "q 1-d": (dict(q=Q[0]), ValueError, "q: expected 2 dimensions"),
    "q head_dim": (dict(q=Q[:, :16].copy()), ValueError, "q: expected head_dim 32 like keys"),
    "q heads": (
        dict(q=Q[:3].copy()),
        ValueError,
        "q: expected heads_q to be a positive multiple of heads_kv=2",
    ),
    "q int": (dict(q=Q.astype(np.int32)), TypeError, "q: expected a floating-point array"),
    "q nan": (dict(q=with_nan(Q, (1, 3))), ValueError, "q: contains NaN or Inf"),
    "keys nan": (
        dict(keys=with_nan(K, (1, 7, 2))),
        ValueError,
        r"keys: contains NaN or Inf \(first at \[1, 7, 2\]\)",
    ),
    "values inf": (
        dict(values=np.where(np.arange(32) == 5, np.float16(np.inf), V)),
        ValueError,
        "values: contains NaN or Inf",
    ),
    "indices int64": (
        dict(indices=np.array([[0, 1], [2, 3]])),
        TypeError,
        "indices: expected dtype int32, got int64",
    ),
    "indices 1-d": (dict(indices=idx([0, 1])), ValueError, "indices: expected 2 dimensions"),
    "indices rows": (
        dict(indices=idx([[0], [1], [2]])),
        ValueError,
        r"indices: expected 2 \(heads_kv\) or 4 \(heads_q\) rows",
    ),
    "indices empty": (
        dict(indices=np.zeros((2, 0), np.int32)),
        ValueError,
        "indices: expected at least one index per row",
    ),
    "indices range": (
        dict(indices=idx([[0, 1, 50], [0, 1, 2]])),
        ValueError,
        r"indices\[0, 2\]: expected a token index in \[0, 50\), got 50",
    ),
    "indices negative": (
        dict(indices=idx([[0, 1, 2], [-1, 1, 2]])),
        ValueError,
        r"indices\[1, 0\]: expected a token index in \[0, 50\), got -1",
    ),
    "indices unsorted": (
        dict(indices=idx([[0, 5, 2], [0, 1, 2]])),
        ValueError,
        r"indices\[0\]: expected indices sorted ascending without duplicates, got 5 before 2",
    ),
    "indices duplicate": (
        dict(indices=idx([[0, 1, 2], [3, 3, 4]])),
        ValueError,
        "without duplicates, got 3 before 3",
    ),
    "indices strided": (
        dict(indices=idx([[0, 1, 2, 3], [4, 5, 6, 7]])[:, ::2]),
        ValueError,
        "indices: expected a C-contiguous array",
    ),
    "bias shape": (
        dict(bias=np.zeros((2, 49), np.float32)),
        ValueError,
        r"bias: expected shape \(2, 50\)",
    ),
    "bias nan": (
        dict(bias=with_nan(np.zeros((2, 50), np.float32), (0, 0))),
        ValueError,
        "bias: contains NaN or Inf",
    ),
    "scale negative": (dict(scale=-1.0), ValueError, "scale: expected a positive number"),
    "scale nan": (dict(scale=float("nan")), ValueError, "scale: expected a positive number"),
    "device": (dict(device="tpu"), ValueError, "device: expected 'cpu' or 'cuda', got 'tpu'"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_rejects(case):
    overrides, error, message = ATTENTION_CASES[case]
    args = dict(q=Q, keys=K, values=V) | overrides
    q, keys, values = args.pop("q"), args.pop("keys"), args.pop("values")
    with pytest.raises(error, match=message):
        kvpack.attention(q, keys, values, **args)


@pytest.mark.skipif(kvpack.cuda_available(), reason="a GPU is present")
def test_cuda_requested_without_gpu():
    with pytest.raises(ValueError, match=r"device: 'cuda' requested .* but"):
        kvpack.attention(Q, K, V, device="cuda")


ACCUMULATE_CASES = {
    "window > tokens": (
        dict(queries=np.zeros((4, 51, 32), np.float32)),
        ValueError,
        "queries: a causal window of 51 queries needs at least as many keys, got 50",
    ),
    "queries 2-d": (dict(queries=Q), ValueError, "queries: expected 3 dimensions"),
    "queries empty": (
        dict(queries=np.zeros((4, 0, 32), np.float32)),
        ValueError,
        "queries: expected at least one query per head",
    ),
    "queries head_dim": (
        dict(queries=np.zeros((4, 3, 8), np.float32)),
        ValueError,
        "queries: expected head_dim 32",
    ),
    "queries nan": (
        dict(queries=np.full((4, 3, 32), np.nan, np.float32)),
        ValueError,
        "queries: contains NaN or Inf",
    ),
    "reduction": (
        dict(reduction="max"),
        ValueError,
        "reduction: expected 'sum' or 'mean', got 'max'",
    ),
    "keys dtype": (dict(keys=K.astype(np.float64)), TypeError, "keys: expected dtype"),
}


@pytest.mark.parametrize("case", sorted(ACCUMULATE_CASES))
def test_accumulated_attention_rejects(case):
    overrides, error, message = ACCUMULATE_CASES[case]
    args = dict(queries=np.zeros((4, 3, 32), np.float32), keys=K) | overrides
    queries, keys = args.pop("queries"), args.pop("keys")
    with pytest.raises(error, match=message):
        kvpack.accumulated_attention(queries, keys, **args)


def test_non_causal_window_may_exceed_tokens():
    out = kvpack.accumulated_attention(np.zeros((4, 60, 32), np.float32), K, causal=False)
    np.testing.assert_allclose(out.sum(axis=1), 2 * 60, rtol=1e-5)


def test_thread_count_must_be_positive():
    with pytest.raises(ValueError, match="n: expected 1 to 1024 threads, got 0"):
        kvpack.set_num_threads(0)


def test_not_an_array():
    with pytest.raises(TypeError, match="keys: expected dtype"):
        kvpack.attention(Q, "not an array", V)


def test_big_endian_arrays_are_converted_or_refused_never_misread():
    """A '>f4' array has the type number of a native float32: the bindings must look at
    its byte order. Small float32 inputs (queries, evidence) are converted; arrays the
    core reads in place (keys, values, indices, out=) are refused, naming the argument."""
    big = lambda a: a.astype(a.dtype.newbyteorder(">"))  # noqa: E731
    expected = kvpack.attention(Q, K, V)
    np.testing.assert_array_equal(kvpack.attention(big(Q), K, V), expected)
    for name, args in {"keys": (Q, big(K), V), "values": (Q, K, big(V))}.items():
        with pytest.raises(ValueError, match=rf"{name}: expected native byte order, got dtype >f2"):
            kvpack.attention(*args)
    with pytest.raises(ValueError, match="indices: expected native byte order"):
        kvpack.attention(Q, K, V, big(idx([[0, 3, 9], [1, 2, 4]])))
    keys32 = K.astype(np.float32)
    scores = RNG.random((2, 50), dtype=np.float32)
    native = kvpack.compress(keys32, keys32, "h2o", 20, attention=scores)
    swapped = kvpack.compress(keys32, keys32, "h2o", 20, attention=big(scores))
    np.testing.assert_array_equal(swapped.positions, native.positions)
    quantized = kvpack.quantize(keys32, keys32, 4, residual=0)
    with pytest.raises(ValueError, match="out: expected native byte order"):
        quantized.dequantize(out=(big(np.empty_like(keys32)), big(np.empty_like(keys32))))


def test_small_gaps_name_the_argument(tmp_path):
    with pytest.raises(TypeError, match="tokens: expected integer token ids, got dtype float64"):
        kvpack.context_key([1.5, 2.5])
    assert kvpack.context_key(np.array([1, 2], np.int32)) == kvpack.context_key([1, 2])
    with pytest.raises(ValueError, match="threshold: expected a cosine similarity"):
        kvpack.merging_sets(K, threshold=float("nan"))
    with pytest.raises(ValueError, match="scale: expected a positive number representable"):
        kvpack.attention(Q, K, V, scale=1e-50)
    with pytest.raises(ValueError, match="n: expected 1 to 1024 threads, got 65536"):
        kvpack.set_num_threads(65536)
    for url in ("redis://h:0", "redis://h:70000"):
        with pytest.raises(ValueError, match="redis_url: expected a port from 1 to 65535"):
            kvpack.TieredStore(0, redis_url=url, bandwidths=[1e10, 1e8])
    for directory in ("", str(tmp_path / "a\0b")):
        with pytest.raises(ValueError, match="ssd_dir: expected a directory path"):
            kvpack.TieredStore(0, directory, 1 << 20, bandwidths=[1e10, 1e9])
    with pytest.raises(ValueError, match="bandwidths: expected one per tier, got an empty list"):
        kvpack.TieredStore(1 << 20, bandwidths=[])


def test_make_cache_of_something_that_is_no_model():
    hf = pytest.importorskip("kvpack.hf")
    with pytest.raises(TypeError, match="model: expected a transformers model, got NoneType"):
        hf.make_cache(None)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: kvpack.set_num_threads("2"), "n: expected an int, got str"),
        (lambda: kvpack.set_num_threads(2.5), "n: expected an int, got float"),
        (lambda: kvpack.TieredStore("1MB"), "dram_bytes: expected an int, got str"),
        (lambda: kvpack.TieredStore(0, alpha="high"), "alpha: expected a number, got str"),
        (lambda: kvpack.TieredStore(1 << 20, codecs="none"), "codecs: expected a list, got str"),
        (
            lambda: kvpack.TieredStore(1 << 20, bandwidths=["fast"]),
            r"bandwidths: expected a list of numbers or None, got list",
        ),
        (lambda: kvpack.attention(Q, K, V, scale="1"), "scale: expected a number or None, got str"),
        (lambda: kvpack.quantize(K, V, group=2.5), "group: expected an int, got float"),
        (lambda: kvpack.kmeans(K[0], "4"), "n_clusters: expected an int, got str"),
        (lambda: kvpack.RecallCache("1k"), "budget: expected an int, got str"),
        (lambda: kvpack.store.encode([(K, V)], 2), "codec: expected a str, got int"),
        (lambda: kvpack.store.decode("blob"), "blob: expected bytes, got str"),
    ],
)
def test_argument_type_errors_name_the_argument(call, message):
    # pybind11 alone answers "incompatible function arguments" and lists signatures.
    with pytest.raises(TypeError, match=message) as raised:
        call()
    assert "incompatible" not in str(raised.value)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: kvpack.TieredStore(2**63), "dram_bytes"),
        (lambda: kvpack.TieredStore(0, io_threads=2**40), "io_threads"),
        (lambda: kvpack.TieredStore(0, timeout=2.0**40), "timeout_ms"),
        (lambda: kvpack.RecallCache(2**63), "budget"),
        (lambda: kvpack.set_num_threads(2**40), "n"),
        (lambda: kvpack.EvictionCache("h2o", budget=2**64), "budget"),
    ],
)
def test_out_of_range_integers_name_their_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}: expected an int from"):
        call()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("budget", [2**22, 2**40])
def test_eviction_cache_holds_what_it_keeps_not_its_budget(rng, budget):
    keys = rng.standard_normal((2, 64, 16)).astype(np.float32)
    before = _resident_bytes()
    cache = kvpack.EvictionCache("h2o", budget=budget)
    cache.prefill(keys, keys, attention=rng.random((2, 64), dtype=np.float32))
    for _ in range(100):
        token = rng.standard_normal((2, 16)).astype(np.float32)
        cache.step(rng.standard_normal((4, 16)).astype(np.float32), token, token)
    assert cache.size == 164
    # 164 tokens of 2 x 16 float32 keys and values are 42 KB; buffers sized by a budget of
    # 2**22 were 1 GB (and 2**40 a MemoryError).
    assert _resident_bytes() - before < 64 << 20
