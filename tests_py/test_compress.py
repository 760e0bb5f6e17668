"""kvpack.compress, its methods and the decode-time EvictionCache against NumPy float64."""

import numpy as np
import pytest

import kvpack

import reference
from conftest import KV_DTYPES

EVIDENCE_METHODS = ["h2o", "snapkv", "cam", "kvmerger"]


def structured_cache(rng, heads=2, tokens=300, dim=32, noise=0.15, value_noise=0.3):
    """Keys and values in runs of 1-8 near-identical vectors (what KVMerger merges)."""
    keys = np.empty((heads, tokens, dim), np.float32)
    values = np.empty_like(keys)
    for h in range(heads):
        t = 0
        while t < tokens:
            run = min(int(rng.integers(1, 9)), tokens - t)
            keys[h, t : t + run] = rng.standard_normal(dim) + noise * rng.standard_normal(
                (run, dim)
            )
            values[h, t : t + run] = rng.standard_normal(dim) + value_noise * rng.standard_normal(
                (run, dim)
            )
            t += run
    return keys, values


def random_evidence(rng, heads, tokens):
    return rng.random((heads, tokens), dtype=np.float32)


def check_against_reference(result, expected, atol=1e-5):
    np.testing.assert_array_equal(result.positions, expected["positions"])
    np.testing.assert_array_equal(result.counts, expected["counts"])
    np.testing.assert_allclose(result.keys.astype(np.float64), expected["keys"], atol=atol, rtol=0)
    np.testing.assert_allclose(
        result.values.astype(np.float64), expected["values"], atol=atol, rtol=0
    )


@pytest.mark.parametrize("method", kvpack.METHODS)
@pytest.mark.parametrize("budget", [0.5, 0.35, 37])
@pytest.mark.parametrize("structured", [False, True])
def test_methods_match_reference(rng, method, budget, structured):
    if structured:
        keys, values = structured_cache(rng)
    else:
        keys = rng.standard_normal((2, 300, 32), dtype=np.float32)
        values = rng.standard_normal((2, 300, 32), dtype=np.float32)
    scores = random_evidence(rng, 2, 300)
    evidence = {"attention": scores}
    if method == "expected_attention":  # it reads the queries themselves
        evidence = {"queries": rng.standard_normal((4, 300, 32), dtype=np.float32)}
    result = kvpack.compress(keys, values, method, budget, **evidence)
    slots = budget if isinstance(budget, int) else round(budget * 300)
    expected = reference.compress(
        keys, values, method, 300 if method == "full" else slots, scores, evidence.get("queries")
    )
    assert result.keys.shape == (2, expected["positions"].shape[1], 32)
    check_against_reference(result, expected)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("streaming_llm", {"sinks": 9}),
        ("h2o", {"recent_ratio": 0.2}),
        ("snapkv", {"window": 8, "kernel": 3}),
        ("cam", {"sinks": 2, "merge_window": 5}),
        ("kvmerger", {"protect_recent": 0.05, "protect_heavy": 0.0, "sigma": 0.7}),
        ("kvmerger", {"sigma": "auto"}),
    ],
)
def test_method_parameters_match_reference(rng, method, params):
    keys, values = structured_cache(rng, tokens=200)
    scores = random_evidence(rng, 2, 200)
    result = kvpack.compress(keys, values, method, 0.4, attention=scores, **params)
    expected = reference.compress(keys, values, method, 80, scores, **params)
    check_against_reference(result, expected)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("method", ["h2o", "cam", "kvmerger"])
def test_storage_dtypes_are_kept(rng, dtype, method):
    keys, values = structured_cache(rng, tokens=128)
    keys, values = keys.astype(dtype), values.astype(dtype)
    scores = random_evidence(rng, 2, 128)
    result = kvpack.compress(keys, values, method, 0.5, attention=scores)
    assert result.keys.dtype == dtype and result.values.dtype == dtype
    expected = reference.compress(keys, values, method, 64, scores)
    np.testing.assert_array_equal(result.positions, expected["positions"])
    tolerance = 1e-5 if dtype == np.float32 else 2e-2
    for name in ("keys", "values"):
        np.testing.assert_allclose(
            getattr(result, name).astype(np.float64), expected[name], atol=tolerance, rtol=tolerance
        )


@pytest.mark.parametrize("method", kvpack.METHODS)
def test_full_budget_returns_the_cache_unchanged(rng, method):
    keys, values = structured_cache(rng, tokens=100)
    queries = rng.standard_normal((4, 16, 32), dtype=np.float32)
    result = kvpack.compress(keys, values, method, 1.0, queries=queries)
    np.testing.assert_array_equal(result.keys, keys)
    np.testing.assert_array_equal(result.values, values)
    np.testing.assert_array_equal(result.positions, np.tile(np.arange(100), (2, 1)))
    np.testing.assert_array_equal(result.counts, 1)


@pytest.mark.parametrize("method", kvpack.METHODS[1:])
@pytest.mark.parametrize("budget", [1, 2, 17, 0.01, 0.999])
def test_budgets_are_exact(rng, method, budget):
    keys, values = structured_cache(rng, heads=3, tokens=150)
    queries = rng.standard_normal((6, 12, 32), dtype=np.float32)
    result = kvpack.compress(keys, values, method, budget, queries=queries)
    slots = budget if isinstance(budget, int) else max(1, round(budget * 150))
    assert result.keys.shape == result.values.shape == (3, slots, 32)
    assert result.counts.shape == result.positions.shape == (3, slots)
    assert result.slots == slots and result.ratio == slots / 150
    assert np.all(np.diff(result.positions, axis=1) > 0)
    if method == "kvmerger":
        np.testing.assert_array_equal(result.counts.sum(axis=1), 150)
    else:
        np.testing.assert_array_equal(result.counts, 1)


def test_kvmerger_slots_cover_runs_around_their_pivot(rng):
    keys, values = structured_cache(rng, tokens=240)
    scores = random_evidence(rng, 2, 240)
    result = kvpack.compress(keys, values, "kvmerger", 0.35, attention=scores)
    for h in range(2):
        ends = np.cumsum(result.counts[h])
        starts = ends - result.counts[h]
        assert np.all((starts <= result.positions[h]) & (result.positions[h] < ends))
        for start, end, pivot in zip(starts, ends, result.positions[h]):
            assert pivot == start + np.argmax(scores[h, start:end])
    # The searched threshold is the lowest similarity merged.
    expected = [reference.kvmerger_head(keys[h], values[h], scores[h], 84)[4] for h in range(2)]
    np.testing.assert_allclose(result.thresholds, expected, atol=1e-5)


def test_kvmerger_merges_planted_runs_first(rng):
    # When the budget equals the number of runs, every run becomes exactly one slot.
    keys, values = structured_cache(rng, heads=1, tokens=200, noise=0.01)
    sets = kvpack.merging_sets(keys, threshold=0.9)
    runs = int(sets.merged_length()[0])
    scores = np.zeros((1, 200), np.float32)
    result = kvpack.compress(
        keys, values, "kvmerger", runs, attention=scores, protect_recent=0.0, protect_heavy=0.0
    )
    np.testing.assert_array_equal(result.counts[0], sets.sizes[0])


def test_log_count_bias_keeps_the_mass_of_duplicated_tokens(rng):
    # Runs of identical keys and values: merged slots with log(count) attend exactly like
    # the full cache; without the bias each run loses mass.
    base_k = rng.standard_normal((2, 40, 16)).astype(np.float32)
    base_v = rng.standard_normal((2, 40, 16)).astype(np.float32)
    repeats = rng.integers(1, 5, size=40)
    keys = np.ascontiguousarray(np.repeat(base_k, repeats, axis=1))
    values = np.ascontiguousarray(np.repeat(base_v, repeats, axis=1))
    tokens = keys.shape[1]
    q = rng.standard_normal((4, 16)).astype(np.float32)
    scores = np.zeros((2, tokens), np.float32)
    kwargs = {"attention": scores, "protect_recent": 0.0, "protect_heavy": 0.0}
    biased = kvpack.compress(keys, values, "kvmerger", 40, log_count_bias=True, **kwargs)
    plain = kvpack.compress(keys, values, "kvmerger", 40, **kwargs)
    np.testing.assert_array_equal(biased.counts, np.tile(repeats, (2, 1)))
    np.testing.assert_allclose(np.exp(biased.bias), biased.counts, rtol=1e-6)
    full, _, _ = reference.decode_attention(q, keys, values)
    np.testing.assert_allclose(biased.attend(q), full, atol=1e-5)
    assert np.abs(plain.attend(q) - full).max() > 1e-3


def test_queries_give_the_same_result_as_their_accumulated_attention(rng):
    keys, values = structured_cache(rng, tokens=160)
    queries = rng.standard_normal((4, 48, 32), dtype=np.float32)
    for method in ["h2o", "cam", "kvmerger"]:
        from_queries = kvpack.compress(keys, values, method, 0.5, queries=queries)
        evidence = kvpack.accumulated_attention(queries, keys)
        from_scores = kvpack.compress(keys, values, method, 0.5, attention=evidence)
        np.testing.assert_array_equal(from_queries.positions, from_scores.positions)
        np.testing.assert_array_equal(from_queries.values, from_scores.values)
    # SnapKV observes only the last `window` queries.
    snap = kvpack.compress(keys, values, "snapkv", 0.5, queries=queries, window=16)
    evidence = kvpack.accumulated_attention(np.ascontiguousarray(queries[:, -16:]), keys)
    expected = kvpack.compress(keys, values, "snapkv", 0.5, attention=evidence, window=16)
    np.testing.assert_array_equal(snap.positions, expected.positions)


def test_kvmerger_beats_eviction_on_structured_keys(rng):
    # Redundant runs of tokens are where merging loses less than dropping (fixed seed).
    keys, values = structured_cache(rng, heads=2, tokens=400, noise=0.1)
    queries = rng.standard_normal((8, 32, 32), dtype=np.float32)
    probes = rng.standard_normal((8, 32), dtype=np.float32)
    full = kvpack.attention(probes, keys, values)

    def error(method, budget, **kwargs):
        result = kvpack.compress(keys, values, method, budget, queries=queries, **kwargs)
        return np.linalg.norm(result.attend(probes) - full) / np.linalg.norm(full)

    evicting = min(error("h2o", 0.35), error("cam", 0.35))
    assert error("kvmerger", 0.35) < 0.9 * evicting
    # With the log-count bias a merged run keeps its softmax mass: far closer still.
    assert error("kvmerger", 0.35, log_count_bias=True) < 0.2 * evicting


# ---- errors ----


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0, ValueError, r"budget: expected a token count in \[1, 50\]"),
        (51, ValueError, r"budget: expected a token count in \[1, 50\] \(the context\), got 51"),
        (2**70, ValueError, r"budget: expected a token count in \[1, 50\]"),
        (0.0, ValueError, r"budget: expected a fraction in \(0, 1\]"),
        (1.5, ValueError, r"budget: expected a fraction in \(0, 1\]"),
        (float("nan"), ValueError, r"budget: expected a fraction"),
        (True, TypeError, "budget: .* got a bool"),
        ("half", TypeError, "budget: expected a fraction in .* got str"),
    ],
)
def test_bad_budgets_raise(rng, budget, error, match):
    keys = rng.standard_normal((1, 50, 8), dtype=np.float32)
    with pytest.raises(error, match=match):
        kvpack.compress(keys, keys, "streaming_llm", budget)


@pytest.mark.parametrize("method", EVIDENCE_METHODS)
def test_missing_evidence_raises(rng, method):
    keys = rng.standard_normal((1, 50, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=f"queries, attention: method '{method}' ranks tokens"):
        kvpack.compress(keys, keys, method, 0.5)


def test_bad_arguments_raise(rng):
    keys = rng.standard_normal((2, 50, 8), dtype=np.float32)
    scores = rng.random((2, 50), dtype=np.float32)
    queries = rng.standard_normal((4, 5, 8), dtype=np.float32)
    cases = [
        ({"method": "lru"}, ValueError, "method: expected one of"),
        ({"attention": scores, "queries": queries}, ValueError, "not both"),
        ({"attention": scores[:1]}, ValueError, r"attention: expected shape \(2, 50\)"),
        (
            {"attention": np.full((2, 50), np.nan, np.float32)},
            ValueError,
            "attention: contains NaN",
        ),
        ({"queries": queries[:3]}, ValueError, "queries: expected heads_q to be a positive"),
        (
            {"queries": np.ascontiguousarray(queries[:, :, :4])},
            ValueError,
            "queries: expected head_dim 8",
        ),
        ({"attention": scores, "window": 8}, TypeError, "window: method 'kvmerger' does not take"),
        ({"attention": scores, "sigma": -1.0}, ValueError, "sigma: expected a positive width"),
        ({"attention": scores, "sigma": "wide"}, ValueError, "sigma: expected a positive width"),
        ({"attention": scores, "sigma": True}, ValueError, "sigma: expected a positive width"),
        ({"attention": scores, "protect_recent": 1.5}, ValueError, "protect_recent: expected"),
        (
            {"attention": scores, "protect_recent": 0.4, "protect_heavy": 0.3},
            ValueError,
            "protect_recent, protect_heavy: protecting 20 recent",
        ),
        (
            {"attention": scores, "protect_recent": 0.0, "protect_heavy": 0.48},
            ValueError,
            "budget: KVMerger can fold at most",
        ),
    ]
    for kwargs, error, match in cases:
        args = {"method": "kvmerger", **kwargs}
        with pytest.raises(error, match=match):
            kvpack.compress(keys, keys, budget=0.5, **args)
    with pytest.raises(ValueError, match="kernel: expected an odd int >= 1"):
        kvpack.compress(keys, keys, "snapkv", 0.5, attention=scores, kernel=4)
    with pytest.raises(ValueError, match="values: expected shape"):
        kvpack.compress(keys, keys[:1], "full", 1.0)
    bad = keys.copy()
    bad[1, 7, 3] = np.inf
    with pytest.raises(ValueError, match=r"keys.*(NaN|Inf)"):
        kvpack.compress(bad, keys, "kvmerger", 0.5, attention=scores)


# ---- decode-time eviction ----


@pytest.mark.parametrize("method", ["streaming_llm", "h2o"])
@pytest.mark.parametrize("prompt", [20, 64])
def test_eviction_cache_matches_reference(rng, method, prompt):
    heads, heads_q, dim, budget = 2, 4, 16, 32
    keys = rng.standard_normal((heads, prompt, dim), dtype=np.float32)
    values = rng.standard_normal((heads, prompt, dim), dtype=np.float32)
    scores = rng.random((heads, prompt), dtype=np.float32)
    params = {"sinks": 3} if method == "streaming_llm" else {"recent_ratio": 0.25}
    cache = kvpack.EvictionCache(method, budget, **params)
    ref = reference.EvictionReference(method, budget, sinks=3, recent_ratio=0.25)
    cache.prefill(keys, values, attention=scores)
    ref.prefill(keys, values, scores)
    for _ in range(40):
        q = rng.standard_normal((heads_q, dim), dtype=np.float32)
        k = rng.standard_normal((heads, dim), dtype=np.float32)
        v = rng.standard_normal((heads, dim), dtype=np.float32)
        np.testing.assert_allclose(cache.step(q, k, v), ref.step(q, k, v), atol=1e-5)
        assert cache.size == min(budget, ref.seen) == len(ref.kept[0])
        for h in range(heads):
            assert sorted(cache.positions[h]) == sorted(ref.kept[h])
    assert cache.seen == prompt + 40
    # Held rows are the rows of the positions they claim.
    order = np.argsort(cache.positions[0])
    np.testing.assert_array_equal(cache.keys[0][order], ref.k[0][sorted(ref.kept[0])])
    if method == "h2o":
        for h in range(heads):
            expected = [ref.score[h][int(t)] for t in cache.positions[h]]
            np.testing.assert_allclose(cache.scores[h], expected, rtol=1e-5)


def test_eviction_cache_errors(rng):
    keys = rng.standard_normal((2, 10, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="method: expected 'streaming_llm' or 'h2o'"):
        kvpack.EvictionCache("snapkv", 8)
    with pytest.raises(ValueError, match="budget: expected a token count >= 1"):
        kvpack.EvictionCache("h2o", 0)
    cache = kvpack.EvictionCache("h2o", 8)
    with pytest.raises(ValueError, match="step: call prefill"):
        cache.step(np.ones((2, 8), np.float32), keys[:, 0], keys[:, 0])
    with pytest.raises(ValueError, match="queries, attention: method 'h2o' ranks tokens"):
        cache.prefill(keys, keys)
    cache.prefill(keys, keys, queries=rng.standard_normal((4, 3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"new_key: expected shape \(2, 8\)"):
        cache.step(np.ones((2, 8), np.float32), keys[:1, 0], keys[:, 0])
    with pytest.raises(TypeError, match="new_key/new_value: expected dtype float32"):
        cache.step(np.ones((2, 8), np.float32), keys[:, 0].astype(np.float16), keys[:, 0])
    # A rejected step leaves the cache as it was.
    for _ in range(3):
        with pytest.raises(ValueError, match="q: expected heads_q to be a positive multiple"):
            cache.step(np.ones((0, 8), np.float32), keys[:, 0], keys[:, 0])
    assert cache.size == 8 and cache.seen == 10
    cache.step(np.ones((2, 8), np.float32), keys[:, 0], keys[:, 0])
    assert cache.size == 8 and cache.seen == 11
    # Queries whose scores overflow float32 give no ranking.
    huge = np.full((4, 3, 8), 3e38, np.float32)
    with pytest.raises(ValueError, match=r"(scores|keys)"):
        kvpack.EvictionCache("h2o", 8).prefill(keys, keys, queries=huge)
    with pytest.raises(ValueError, match=r"(scores|keys)"):
        kvpack.compress(keys, keys, "h2o", 0.5, queries=huge)


# ---- analysis helpers ----


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_adjacent_similarity_matches_reference(rng, dtype):
    keys, _ = structured_cache(rng, tokens=120)
    keys = keys.astype(dtype)
    keys[0, 5] = 0  # a zero key has similarity 0 with its neighbours
    sim = kvpack.adjacent_similarity(keys)
    k = keys.astype(np.float64)
    expected = [[reference.cosine(k[h, t], k[h, t + 1]) for t in range(119)] for h in range(2)]
    np.testing.assert_allclose(sim, expected, atol=1e-5)
    assert sim[0, 4] == 0 and sim[0, 5] == 0


def test_merging_sets_histogram_and_fraction(rng):
    keys, _ = structured_cache(rng, tokens=150)
    sim = reference.as64(kvpack.adjacent_similarity(keys))
    sets = kvpack.merging_sets(keys, threshold=0.8)
    for h in range(2):
        sizes, run = [], 1
        for s in sim[h]:
            if s >= 0.8:
                run += 1
            else:
                sizes.append(run)
                run = 1
        sizes.append(run)
        np.testing.assert_array_equal(sets.sizes[h], sizes)
        np.testing.assert_array_equal(sets.starts[h], np.cumsum([0, *sizes[:-1]]))
    histogram = sets.histogram()
    assert (histogram * np.arange(len(histogram))).sum() == 2 * 150
    fraction = kvpack.mergeable_fraction(keys, 0.8)
    expected = [sizes[sizes > 1].sum() / 150 for sizes in sets.sizes]
    np.testing.assert_allclose(fraction, expected)
    assert np.all(fraction > 0.3)  # the planted runs are found
    profile = kvpack.similarity_profile([keys, np.ascontiguousarray(keys[:, :50])])
    assert profile.shape == (2, 2)
    np.testing.assert_allclose(profile[0], sim.mean(axis=1), rtol=1e-6)


def test_cam_merge_probability_is_relative_to_the_recent_window():
    """CaM's reference divides an evicted token's score by the mean over the recent window
    after it, not over sinks and window: sinks holding most of the attention must not
    make it merge less."""
    tokens, slots, sinks, spread = 12, 6, 2, 4
    keys = np.zeros((1, tokens, 4), np.float32)
    values = np.zeros((1, tokens, 4), np.float32)
    values[0, :, 0] = np.arange(1, tokens + 1)  # value of token t: t + 1 in channel 0
    scores = np.full((1, tokens), 0.02, np.float32)
    scores[0, :sinks] = 0.4  # the sinks draw most of the attention
    result = kvpack.compress(
        keys, values, "cam", slots, attention=scores, sinks=sinks, merge_window=spread
    )
    merged = values[0, :, 0].astype(np.float64)
    for e in range(sinks, tokens - (slots - sinks)):
        p = min(1.0, scores[0, e] / scores[0, e + 1 : e + 1 + slots - sinks].mean())
        assert p == pytest.approx(1.0)  # as large as its successors: merged in full
        for j in range(e + 1, min(e + spread, e + slots - sinks) + 1):
            merged[j] += p / spread * merged[e]
    np.testing.assert_array_equal(result.positions[0], [0, 1, 8, 9, 10, 11])
    np.testing.assert_allclose(result.values[0, :, 0], merged[[0, 1, 8, 9, 10, 11]], rtol=1e-6)


def test_a_share_means_one_token_count_everywhere(rng):
    # Halves round away from zero in the core; kvpack.budget_tokens, compress and the
    # HF caches all convert through it (Python's round would give 2 here).
    keys = rng.standard_normal((2, 5, 16)).astype(np.float32)
    assert kvpack.budget_tokens(0.5, 5) == 3
    assert kvpack.compress(keys, keys, "streaming_llm", 0.5).slots == 3
    assert kvpack.budget_tokens(64, 5) == 64  # a count is a count
    with pytest.raises(ValueError, match="budget"):
        kvpack.budget_tokens(0.0, 5)
    with pytest.raises(TypeError, match="budget"):
        kvpack.budget_tokens("half", 5)
