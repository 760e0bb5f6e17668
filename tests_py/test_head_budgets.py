"""Budgets that adapt: AdaKV's head-wise split of a layer's budget (``adaptive=True`` of
H2O, SnapKV and KeyDiff) and PyramidKV's layer-wise schedule (kvpack.pyramid_budgets),
against float64 references and kvpress's presses at the scoring level."""

import math
import types

import numpy as np
import pytest

import kvpack

import reference
from conftest import generate, padded_prompts, tiny_decoder
from kvpress_reference import press

RANKING = ("h2o", "snapkv", "keydiff")


def concentrated_cache(rng, heads=4, heads_q=8, tokens=96, dim=16):
    """Keys whose heads attend with very different concentration (key scales 0.5 to 4),
    and the prompt's last 16 queries."""
    scales = np.geomspace(0.5, 4.0, heads)[:, None, None]
    keys = (rng.standard_normal((heads, tokens, dim)) * scales).astype(np.float32)
    values = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
    queries = rng.standard_normal((heads_q, 16, dim)).astype(np.float32)
    return keys, values, queries


def reference_ranks(method, keys, scores, budget, **params):
    if method == "h2o":
        return np.stack([reference.ranks_h2o(s, budget, **params) for s in scores])
    if method == "snapkv":
        return np.stack([reference.ranks_snapkv(s, budget, **params) for s in scores])
    return np.stack([reference.keydiff_scores(k) for k in keys])


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5])
@pytest.mark.parametrize(
    "method, params",
    [("h2o", {}), ("h2o", {"recent_ratio": 0.25}), ("snapkv", {"window": 8}), ("keydiff", {})],
)
def test_adaptive_split_matches_the_float64_rule(rng, method, params, floor):
    keys, values, queries = concentrated_cache(rng)
    budget = 20
    scores = kvpack.accumulated_attention(queries, keys)
    c = kvpack.compress(
        keys,
        values,
        method,
        budget,
        attention=scores,
        adaptive=True,
        adaptive_floor=floor,
        **params,
    )
    expected = reference.adaptive_picks(
        reference_ranks(method, keys, scores, budget, **params), budget, floor
    )
    heads = keys.shape[0]
    assert c.kept.tolist() == [len(p) for p in expected]
    assert int(c.kept.sum()) == heads * budget  # the layer's total is the one asked for
    assert len(set(c.kept.tolist())) > 1  # the heads did not split evenly
    assert c.slots == max(len(p) for p in expected)
    assert c.kept.min() >= max(1, math.floor(floor * budget))
    for h, picks in enumerate(expected):
        n = len(picks)
        np.testing.assert_array_equal(c.positions[h, :n], picks)
        np.testing.assert_array_equal(c.keys[h, :n], keys[h, picks])
        np.testing.assert_array_equal(c.values[h, :n], values[h, picks])
        assert (c.counts[h, :n] == 1).all()
        # The rest of the head's slots are empty, as a padded row's.
        assert (c.positions[h, n:] == -1).all() and (c.counts[h, n:] == 0).all()
        assert not c.keys[h, n:].any() and not c.values[h, n:].any()


@pytest.mark.parametrize("method", RANKING)
def test_a_floor_of_the_whole_budget_is_the_uniform_split(rng, method):
    keys, values, queries = concentrated_cache(rng)
    uniform = kvpack.compress(keys, values, method, 24, queries=queries)
    whole = kvpack.compress(
        keys, values, method, 24, queries=queries, adaptive=True, adaptive_floor=1.0
    )
    for name in ("keys", "values", "counts", "positions"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(uniform, name))


def test_spread_attention_gets_more_slots_than_concentrated(rng):
    tokens, budget = 64, 16
    scores = np.full((2, tokens), 1e-3, np.float32)
    scores[0, 5] = 10.0  # head 0 attends one token
    scores[1] = rng.uniform(0.5, 1.0, tokens)  # head 1 attends everything
    keys = rng.standard_normal((2, tokens, 8)).astype(np.float32)
    c = kvpack.compress(
        keys, keys, "h2o", budget, attention=scores, recent_ratio=0.0, adaptive=True
    )
    floor = math.floor(0.2 * budget)
    assert c.kept.tolist() == [floor, 2 * budget - floor]
    assert 5 in c.positions[0]


def test_attention_over_an_adaptive_result_skips_the_empty_slots(rng):
    keys, values, queries = concentrated_cache(rng)
    c = kvpack.compress(keys, values, "snapkv", 24, queries=queries, window=4, adaptive=True)
    q = rng.standard_normal((8, keys.shape[2])).astype(np.float32)
    out = c.attend(q)
    expected = np.stack(
        [
            reference.decode_attention(
                q[g : g + 1],
                keys[g // 2 : g // 2 + 1, c.positions[g // 2][c.counts[g // 2] > 0]],
                values[g // 2 : g // 2 + 1, c.positions[g // 2][c.counts[g // 2] > 0]],
            )[0][0]
            for g in range(8)
        ]
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_only_methods_that_rank_tokens_or_recall_take_adaptive():
    for method in ("streaming_llm", "cam", "kvmerger", "full"):
        with pytest.raises(TypeError, match=f"adaptive: method '{method}' does not take"):
            kvpack.methods.resolve(method, adaptive=True)
    with pytest.raises(ValueError, match="adaptive_floor"):
        kvpack.methods.SnapKV(adaptive=True, adaptive_floor=1.5)
    with pytest.raises(TypeError, match="adaptive"):
        kvpack.methods.H2O(adaptive="yes")
    with pytest.raises(ValueError, match="adaptive: the decode-time EvictionCache"):
        kvpack.EvictionCache("h2o", 16, adaptive=True)
    assert kvpack.methods.H2O(adaptive=True) == kvpack.methods.H2O().replace(adaptive=True)
    # The recall methods share each step's recalled tokens (tests_py/test_clustering.py).
    assert kvpack.methods.resolve("quest", adaptive=True, refine=2).adaptive


def test_adaptive_snapkv_keeps_kvpress_adakv_sets(rng):
    """AdaKVPress(SnapKVPress) and kvpack's adaptive SnapKV on one layer's keys and the
    same window attention. kvpress's SnapKV average-pools where kvpack's max-pools, so both
    run with kernel 1; kvpress means over the window and the group where kvpack sums (the
    same order)."""
    torch = pytest.importorskip("torch")
    AdaKVPress = press("adakv_press", "AdaKVPress")
    SnapKVPress = press("snapkv_press", "SnapKVPress")
    heads, heads_q, tokens, dim, window, budget = 4, 8, 256, 32, 16, 64
    scales = np.geomspace(0.3, 3.0, heads)[:, None, None]
    keys = (rng.standard_normal((heads, tokens, dim)) * scales).astype(np.float32)
    values = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
    queries = rng.standard_normal((heads_q, window, dim)).astype(np.float32)
    ours = kvpack.compress(
        keys, values, "snapkv", budget, queries=queries, window=window, kernel=1, adaptive=True
    )
    # The window's causal attention over every key, as kvpress computes it.
    k = torch.from_numpy(keys).repeat_interleave(heads_q // heads, dim=0)
    logits = torch.from_numpy(queries) @ k.transpose(1, 2) / math.sqrt(dim)
    logits += torch.full((window, tokens), -math.inf).triu(tokens - window + 1)
    attentions = logits.softmax(-1)[None]  # [1, heads_q, window, tokens]
    module = types.SimpleNamespace(
        config=types.SimpleNamespace(
            num_attention_heads=heads_q, num_key_value_heads=heads, _attn_implementation="sdpa"
        )
    )
    adakv = AdaKVPress(
        SnapKVPress(compression_ratio=1 - budget / tokens, window_size=window, kernel_size=1),
        alpha_safeguard=0.2,
    )
    adakv.compress(
        module,
        torch.zeros(1, tokens, 1),
        torch.from_numpy(keys)[None],
        torch.from_numpy(values)[None],
        attentions,
        {},
    )
    _, head_of, token_of = module.masked_key_indices
    theirs = [set(range(tokens)) for _ in range(heads)]
    for h, t in zip(head_of.tolist(), token_of.tolist()):
        theirs[h].discard(t)
    assert sum(len(s) for s in theirs) == heads * budget
    union = inter = 0
    for h in range(heads):
        mine = set(ours.positions[h][ours.counts[h] > 0].tolist())
        inter += len(mine & theirs[h])
        union += len(mine | theirs[h])
    assert inter / union >= 0.99
    assert sorted(ours.kept.tolist()) != [budget] * heads  # the split is not uniform


def pyramid_float64(budget, layers, tokens, beta):
    """PyramidKV's real-valued schedule, as its paper (and kvpress) define it."""
    low = budget / beta
    high = 2 * budget - low
    if high > tokens:
        high, low = tokens, 2 * budget - tokens
    return [high - layer * (high - low) / (layers - 1) for layer in range(layers)]


@pytest.mark.parametrize(
    "budget, layers, tokens, beta",
    [(100, 4, 1000, 20), (64, 30, 512, 20), (37, 7, 100, 5), (300, 12, 400, 20), (17, 3, 50, 1)],
)
def test_pyramid_budgets_fall_linearly_and_keep_the_total(budget, layers, tokens, beta):
    budgets = kvpack.pyramid_budgets(budget, layers, tokens, beta)
    assert sum(budgets) == layers * budget
    assert all(1 <= b <= tokens for b in budgets)
    assert budgets == sorted(budgets, reverse=True)
    exact = pyramid_float64(budget, layers, tokens, beta)
    assert max(abs(b - e) for b, e in zip(budgets, exact)) < 1
    if beta > 1:
        assert budgets[0] > budgets[-1]


def test_pyramid_budgets_match_kvpress_pyramidkv():
    """kvpress's PyramidKVPress.get_layer_budget rounds each layer on its own; kvpack rounds
    to keep the total, so each layer is within one slot of it."""
    PyramidKVPress = press("pyramidkv_press", "PyramidKVPress")
    tokens, layers = 1000, 16
    for kept in (50, 100, 250, 600):
        pyramid = PyramidKVPress(compression_ratio=1 - kept / tokens, window_size=0, beta=20)
        theirs = [
            pyramid.get_layer_budget(
                types.SimpleNamespace(
                    config=types.SimpleNamespace(num_hidden_layers=layers), layer_idx=layer
                ),
                tokens,
            )
            for layer in range(layers)
        ]
        ours = kvpack.pyramid_budgets(kept, layers, tokens, 20)
        assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1
        assert sum(ours) == layers * kept


def test_pyramid_budgets_fall_back_to_uniform_and_are_checked():
    assert kvpack.pyramid_budgets(600, 4, 500, 20) == [600] * 4  # over the context
    assert kvpack.pyramid_budgets(10, 1, 500, 20) == [10]
    assert kvpack.pyramid_budgets(10, 4, 500, 20) == [10] * 4  # the last would keep 0.5
    assert kvpack.pyramid_budgets(0.25, 2, 400, 4) == [175, 25]
    with pytest.raises(ValueError, match="beta"):
        kvpack.pyramid_budgets(10, 4, 500, 0.5)
    with pytest.raises(ValueError, match="layers"):
        kvpack.pyramid_budgets(10, 0, 500, 20)
    with pytest.raises(ValueError, match="budget"):
        kvpack.pyramid_budgets(0, 4, 500, 20)


# ---- through kvpack.hf on a tiny Llama ----


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    return tiny_decoder(head_dim=16)


@pytest.fixture(scope="module")
def prompts():
    pytest.importorskip("torch")
    return padded_prompts()


@pytest.mark.parametrize(
    "method, options",
    [
        *((m, {"adaptive": True}) for m in RANKING),
        ("snapkv", {"layer_budgets": "pyramid"}),
        ("quest", {"layer_budgets": "pyramid"}),
    ],
)
def test_budget_over_context_gives_the_dynamic_cache_tokens(model, prompts, method, options):
    import torch
    from transformers import DynamicCache

    from kvpack import hf

    ids, mask = prompts
    expected = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = hf.make_cache(model, method, budget=4096, skip_layers=0, **options)
    assert torch.equal(generate(model, ids, mask, cache), expected)


@pytest.mark.parametrize(
    "method, params", [("h2o", {"recent_ratio": 0.1}), ("snapkv", {"window": 4}), ("keydiff", {})]
)
def test_adaptive_cache_keeps_each_layers_total(model, prompts, method, params):
    from kvpack import hf

    ids, mask = prompts
    budget, new = 24, 6
    cache = hf.make_cache(model, method, budget=budget, adaptive=True, skip_layers=1, **params)
    out = generate(model, ids, mask, cache, new=new)
    assert out.shape == (2, ids.shape[1] + new)
    heads = model.config.num_key_value_heads
    split = set()
    for index in cache.compressed_layers:
        layer = cache.layers[index]
        held = layer.held_positions  # [batch, heads_kv, held]: -1 for an empty slot
        assert held.shape[-1] == layer.length - (new - 1)  # then the decoded tokens
        per_head = (held >= 0).sum(-1)
        assert per_head.sum(-1).tolist() == [heads * budget] * 2  # per row: what was asked
        assert (per_head >= math.floor(0.2 * budget)).all()
        assert held[1][held[1] >= 0].min() >= 40  # the padding took no slot
        split.update(per_head.flatten().tolist())
    # The tiny random model attends almost uniformly, so H2O's sums over every prompt query
    # follow the position alone, alike in every head: it splits evenly there.
    assert (split != {budget}) == (method != "h2o")


def test_pyramid_cache_keeps_the_total_over_layers(model, prompts):
    from kvpack import hf

    ids, mask = prompts
    budget = 0.25  # a share of each prompt: 30 and 20 slots
    cache = hf.make_cache(model, "h2o", budget=budget, layer_budgets="pyramid", skip_layers=1)
    generate(model, ids, mask, cache, new=3)
    layers = cache.compressed_layers
    for row, real in enumerate((120, 80)):
        kept = [
            int((cache.layers[i].held_positions[row, 0] >= 0).sum()) for i in layers
        ]  # every head holds its layer's budget
        expected = kvpack.pyramid_budgets(budget, len(layers), real, 20)
        assert kept == expected
        assert sum(kept) == len(layers) * kvpack.budget_tokens(budget, real)
        assert kept[0] > kept[-1]


def test_pyramid_recall_recalls_each_layers_budget(model, prompts):
    from kvpack import hf

    ids, _ = prompts
    cache = hf.make_cache(model, "quest", budget=32, layer_budgets="pyramid", skip_layers=0)
    generate(model, ids[:1], None, cache, new=2)
    budgets = [cache.layers[i].recall[0].last_selection.shape[1] for i in cache.compressed_layers]
    assert budgets == kvpack.pyramid_budgets(32, 4, 120, 20)


@pytest.mark.parametrize("method", ["clusterkv", "quest"])
def test_adaptive_recall_shares_each_layers_budget_in_generate(model, prompts, method):
    # Through generate(): every compressed layer's heads recall heads * 32 tokens between
    # them at each step (ClusterKV: and the decoded tokens on top, in every head), in
    # shares that differ (the split itself: tests_py/test_clustering.py).
    from kvpack import hf

    ids, _ = prompts
    options = {"n_clusters": 8} if method == "clusterkv" else {}
    chosen = kvpack.methods.resolve(method, refine=3, adaptive=True, **options)
    cache = hf.make_cache(model, chosen, budget=32, skip_layers=0)
    generate(model, ids[:1], None, cache, new=3)
    shares = set()
    for i in cache.compressed_layers:
        recall = cache.layers[i].recall[0]
        kept = (recall.last_selection >= 0).sum(1)
        on_top = 2 if method == "clusterkv" else 0  # 2 decode steps, not yet clustered
        assert kept.sum() == len(kept) * (32 + on_top)
        shares.update(kept.tolist())
    assert len(shares) > 1


def test_adaptive_and_pyramid_options_are_checked(model):
    from kvpack import hf

    with pytest.raises(NotImplementedError, match="decode_budget: not with adaptive"):
        hf.make_cache(model, "snapkv", 32, adaptive=True, decode_budget=64)
    with pytest.raises(ValueError, match="layer_budgets: expected one of uniform, pyramid"):
        hf.make_cache(model, "snapkv", 32, layer_budgets="triangle")
    with pytest.raises(ValueError, match="pyramid_beta"):
        hf.make_cache(model, "snapkv", 32, layer_budgets="pyramid", pyramid_beta=0.5)
    with pytest.raises(TypeError, match="pyramid_beta"):
        hf.make_cache(model, "snapkv", 32, pyramid_beta="steep")
    for method in ("full", "kivi"):
        with pytest.raises(ValueError, match=f"layer_budgets: method '{method}'"):
            hf.make_cache(model, method, 32, layer_budgets="pyramid")
    with pytest.raises(TypeError, match="adaptive: method 'cam' does not take"):
        hf.make_cache(model, "cam", 32, adaptive=True)
