"""Expected Attention against a float64 reference and against kvpress's
ExpectedAttentionPress, scored on the same keys, values and queries."""

import numpy as np
import pytest

import kvpack

import reference
from conftest import KV_DTYPES
from kvpress_reference import press


def inv_freq(dim, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, dim, 2) / dim)).astype(np.float32)


def rotated(queries, frequencies, first=0, scaling=1.0):
    """Queries [heads, n, dim] as a model caches them: turned at positions first + i."""
    dim = queries.shape[-1]
    return np.stack(
        [
            np.einsum(
                "ij,hj->hi",
                reference.rope_matrix(first + i, frequencies, dim, scaling),
                queries[:, i].astype(np.float64),
            )
            for i in range(queries.shape[1])
        ],
        axis=1,
    ).astype(np.float32)


def case(rng, heads_kv=2, group=2, tokens=300, dim=32, dtype=np.float32):
    """Keys and values with a few strong tokens, and queries with a common direction."""
    keys = rng.standard_normal((heads_kv, tokens, dim)).astype(np.float32)
    keys[:, ::37] *= 3
    values = rng.standard_normal((heads_kv, tokens, dim)).astype(np.float32)
    values *= rng.uniform(0.2, 2.0, (heads_kv, tokens, 1)).astype(np.float32)
    pre = rng.standard_normal((heads_kv * group, tokens, dim)).astype(np.float32)
    pre += 2 * rng.standard_normal((heads_kv * group, 1, dim)).astype(np.float32)
    return keys.astype(dtype), values.astype(dtype), pre


PARAMS = [
    {},
    {"covariance": False},
    {"value_norm": False},
    {"sinks": 0, "epsilon": 0.05, "future_positions": 7},
    {"sinks": 9, "future_positions": 1},
]


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("rope", ["none", "rope", "scaled_partial"])
def test_matches_the_float64_reference(rng, dtype, params, rope):
    keys, values, pre = case(rng, dtype=dtype)
    rotary = {}
    queries = pre
    if rope == "rope":
        rotary = {"inv_freq": inv_freq(32)}
        queries = rotated(pre, rotary["inv_freq"])
    elif rope == "scaled_partial":  # 24 of 32 channels turn, cos and sin scaled
        rotary = {"inv_freq": inv_freq(24), "rotary_scaling": 1.25}
        queries = rotated(pre, rotary["inv_freq"], scaling=1.25)
    for budget in (40, 150):
        result = kvpack.compress(
            keys, values, "expected_attention", budget, queries=queries, **rotary, **params
        )
        expected = reference.keep_expected_attention(
            keys, values, queries, budget, **rotary, **params
        )
        np.testing.assert_array_equal(result.positions, expected)
        rows = np.arange(2)[:, None]
        np.testing.assert_array_equal(result.keys, keys[rows, expected])
        np.testing.assert_array_equal(result.values, values[rows, expected])
        assert (result.counts == 1).all()


def test_takes_the_rotation_off_the_queries(rng):
    # The same unrotated queries, cached at their positions: one ranking whatever the
    # rotation, with the future averaged from after the last query.
    keys, values, pre = case(rng)
    frequencies = inv_freq(32)
    first = 50
    turned = rotated(pre[:, :200], frequencies, first=first, scaling=0.8)
    result = kvpack.compress(
        keys,
        values,
        "expected_attention",
        60,
        queries=turned,
        inv_freq=frequencies,
        rotary_scaling=0.8,
        first_position=first,
    )
    expected = reference.keep_expected_attention(
        keys,
        values,
        turned,
        60,
        inv_freq=frequencies,
        rotary_scaling=0.8,
        first_position=first,
    )
    np.testing.assert_array_equal(result.positions, expected)
    # Without the frequencies the queries are taken as they are: another ranking.
    plain = kvpack.compress(keys, values, "expected_attention", 60, queries=turned)
    assert not np.array_equal(plain.positions, result.positions)


def test_keeps_the_sinks_and_ranks_the_rest(rng):
    keys, values, queries = case(rng, tokens=64)
    kept = kvpack.compress(keys, values, "expected_attention", 3, queries=queries, sinks=5)
    np.testing.assert_array_equal(kept.positions, [[0, 1, 2]] * 2)
    kept = kvpack.compress(keys, values, "expected_attention", 20, queries=queries, sinks=5)
    assert (kept.positions[:, :5] == np.arange(5)).all()
    # A token no query leans to (a zero key) but with a huge value wins a slot by its
    # value norm, and none without value_norm.
    keys[:, 40], values[:, 40] = 0, 1e5
    kept = kvpack.compress(keys, values, "expected_attention", 6, queries=queries, sinks=5)
    assert (kept.positions == [0, 1, 2, 3, 4, 40]).all()
    kept = kvpack.compress(
        keys, values, "expected_attention", 6, queries=queries, sinks=5, value_norm=False
    )
    assert (kept.positions != 40).all()


@pytest.mark.parametrize(
    "heads_kv, group, tokens, dim, params",
    [
        (2, 2, 300, 32, {}),
        (2, 3, 600, 64, {}),
        (4, 2, 1024, 64, {"n_future_positions": 64, "n_sink": 8}),
        (2, 2, 400, 32, {"use_covariance": False}),
        (2, 2, 400, 32, {"use_vnorm": False}),
    ],
)
def test_matches_kvpress(rng, heads_kv, group, tokens, dim, params):
    """kvpress's score on the same keys, values and queries (its module reads the
    unrotated queries through q_proj and turns them with transformers' rotary embedding;
    kvpack gets them as the model caches them, turned, with the frequencies)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    expected_attention_press = press("expected_attention_press", "ExpectedAttentionPress")
    heads_q = heads_kv * group
    config = transformers.LlamaConfig(
        hidden_size=heads_q * dim,
        num_attention_heads=heads_q,
        num_key_value_heads=heads_kv,
        head_dim=dim,
        max_position_embeddings=4096,
    )
    module = torch.nn.Module()
    module.config, module.head_dim = config, dim
    module.q_proj = torch.nn.Identity()  # hidden states are the unrotated queries
    module.rotary_emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    keys, values, pre = case(rng, heads_kv, group, tokens, dim)
    hidden = torch.from_numpy(np.ascontiguousarray(pre.transpose(1, 0, 2))).reshape(1, tokens, -1)
    pressed = expected_attention_press(**params)
    theirs = pressed.score(
        module, hidden, torch.from_numpy(keys)[None], torch.from_numpy(values)[None], None, {}
    )[0]
    # The queries as the model caches them: transformers' own rotary embedding.
    positions = torch.arange(tokens)[None]
    cos, sin = module.rotary_emb(hidden, positions)
    turned, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        torch.from_numpy(pre)[None], torch.from_numpy(pre)[None], cos, sin
    )
    turned = turned[0].numpy()
    ours = {
        "future_positions": pressed.n_future_positions,
        "sinks": pressed.n_sink,
        "covariance": pressed.use_covariance,
        "value_norm": pressed.use_vnorm,
        "epsilon": pressed.epsilon,
    }
    frequencies = module.rotary_emb.inv_freq.numpy()
    sinks = pressed.n_sink
    expected = reference.expected_attention_scores(
        keys, values, turned, inv_freq=frequencies, **ours
    )
    # kvpress's float32 scores are the float64 ones to a few ulps (2e-7 of the largest).
    ranked = expected[:, sinks:]
    np.testing.assert_allclose(
        theirs[:, sinks:].double().numpy(), ranked, rtol=1e-5, atol=1e-6 * ranked.max()
    )
    for budget in (tokens // 8, tokens // 3):
        mine = kvpack.compress(
            keys, values, "expected_attention", budget, queries=turned, inv_freq=frequencies, **ours
        ).positions
        kept = np.sort(theirs.topk(budget, dim=-1).indices.numpy(), axis=-1)
        for h in range(heads_kv):
            both = len(np.intersect1d(mine[h], kept[h]))
            jaccard = both / len(np.union1d(mine[h], kept[h]))
            assert jaccard >= 0.99, (h, budget, jaccard)
            # Where the sets differ, the scores tie (to kvpress's float32 precision).
            differ = np.setxor1d(mine[h], kept[h])
            if len(differ):
                scores = theirs[h].double().numpy()
                assert np.ptp(scores[differ]) <= 1e-3 * scores[differ].max(), (h, differ)


def test_is_a_store_codec(rng):
    keys, values, _ = case(rng, tokens=64)
    decoded = kvpack.store.decode(kvpack.store.encode([(keys, values)], "expected_attention-0.5"))
    assert decoded.codec == "expected_attention-0.5"
    assert decoded.positions[0].shape == (2, 32)
    assert (decoded.positions[0][:, :4] == np.arange(4)).all()  # the sinks


def test_bad_evidence_is_named(rng):
    keys, values, queries = case(rng, tokens=64)
    attention = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="queries: method 'expected_attention'"):
        kvpack.compress(keys, values, "expected_attention", 8)
    with pytest.raises(ValueError, match="accumulated attention does not serve"):
        kvpack.compress(keys, values, "expected_attention", 8, attention=attention)
    for kwargs, message in [
        ({"inv_freq": np.ones(17, np.float32)}, "inv_freq: expected 1 to head_dim / 2 = 16"),
        ({"inv_freq": np.ones((2, 8), np.float32)}, "inv_freq"),
        ({"inv_freq": np.full(16, np.nan, np.float32)}, "inv_freq"),
        ({"rotary_scaling": 2.0}, "rotary_scaling: given without inv_freq"),
        ({"inv_freq": inv_freq(32), "rotary_scaling": 0.0}, "rotary_scaling: expected a positive"),
        ({"first_position": -1}, "first_position: expected an int >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            kvpack.compress(keys, values, "expected_attention", 8, queries=queries, **kwargs)
    with pytest.raises(ValueError, match="inv_freq, rotary_scaling, first_position: describe"):
        kvpack.compress(keys, values, "streaming_llm", 8, inv_freq=inv_freq(32))
    with pytest.raises(TypeError, match="first_position: expected an int or None"):
        kvpack.compress(keys, values, "expected_attention", 8, queries=queries, first_position=1.5)


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({"future_positions": 0}, ValueError, "future_positions: expected an int from 1"),
        ({"sinks": -1}, ValueError, "sinks: expected an int from 0"),
        ({"epsilon": -0.1}, ValueError, "epsilon: expected a finite number >= 0"),
        ({"epsilon": float("nan")}, ValueError, "epsilon: expected a finite number >= 0"),
        ({"epsilon": "small"}, TypeError, "epsilon: expected a number"),
        ({"covariance": 1}, TypeError, "covariance: expected a bool"),
        ({"value_norm": None}, TypeError, "value_norm: expected a bool"),
        ({"n_sink": 4}, TypeError, "n_sink: method 'expected_attention' does not take"),
    ],
)
def test_bad_parameters_are_named(params, error, message):
    with pytest.raises(error, match=message):
        kvpack.methods.ExpectedAttention(**params)


def test_defaults_are_kvpress_defaults():
    pytest.importorskip("torch")
    pressed = press("expected_attention_press", "ExpectedAttentionPress")()
    method = kvpack.methods.ExpectedAttention()
    assert method.as_dict() == {
        "future_positions": pressed.n_future_positions,
        "sinks": pressed.n_sink,
        "covariance": pressed.use_covariance,
        "value_norm": pressed.use_vnorm,
        "epsilon": pressed.epsilon,
        "adaptive": False,  # AdaKV's split, off as without kvpress's AdaKVPress
        "adaptive_floor": 0.2,
    }
    assert method.kind == "compress" and method.name == "expected_attention"


# Tiny members of the families whose queries differ on the way to RoPE: a fused qkv
# projection (Phi-3), a norm on the queries (Qwen3, Gemma 3), per-layer-type RoPE with the
# method in the global layers only (Gemma 3).
MODEL_FAMILIES = {
    "llama": {"rope_theta": 500.0},
    "qwen3": {"rope_theta": 500.0},
    "phi3": {"pad_token_id": 0},
    "gemma3": {
        "query_pre_attn_scalar": 16,
        "sliding_window": 24,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
}


@pytest.mark.parametrize(
    "family, value_norm",
    [("llama", True), ("llama", False), ("qwen3", False), ("phi3", False), ("gemma3", False)],
)
def test_a_model_cache_keeps_what_kvpress_keeps(family, value_norm):
    """Through kvpack.hf on tiny models, each compressed layer keeps what kvpress's press
    scores highest from the layer's own hidden states (its query projection and norm, its
    rotary embedding): the queries' rotation is taken off as the model put it on. (Without
    value_norm the ranking hangs on the queries alone: left rotated, the Llama's keep
    another set, Jaccard 0.1-0.25.)"""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("kvpack.hf")
    from conftest import tiny_decoder

    expected_attention_press = press("expected_attention_press", "ExpectedAttentionPress")
    model = tiny_decoder(family, head_dim=16, **MODEL_FAMILIES[family])
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(3))
    hidden, hooks = _hidden_states_of_each_attention(model)
    cache = hf.make_cache(model, "expected_attention", 40, value_norm=value_norm)
    with torch.no_grad():
        model(ids, **{hf.cache_argument(model): cache})
    for hook in hooks:
        hook.remove()
    assert cache.compressed_layers == ([3] if family == "gemma3" else [2, 3])
    prompt = hf.prefill(model, ids)
    rotary = model.model.rotary_emb
    for i in cache.compressed_layers:
        module = model.model.layers[i].self_attn
        # Where kvpress looks for the rotary embedding (Gemma 3's takes the layer type).
        module.rotary_emb = (
            (lambda x, positions: rotary(x, positions, "full_attention"))
            if family == "gemma3"
            else rotary
        )
        _, keys, values, _, _ = prompt.layers[i]
        with torch.no_grad():
            scores = expected_attention_press(use_vnorm=value_norm).score(
                module, hidden[i], keys, values, None, {}
            )[0]
        del module.rotary_emb
        theirs = np.sort(scores.topk(40, dim=-1).indices.numpy(), axis=-1)
        ours = cache.layers[i].held_positions[0].numpy()
        for h in range(keys.shape[1]):
            jaccard = len(np.intersect1d(ours[h], theirs[h])) / len(np.union1d(ours[h], theirs[h]))
            assert jaccard >= 0.99, (i, h, jaccard)


def test_decode_time_compression_places_the_latest_queries(monkeypatch):
    """With decode_budget a layer compresses what it holds, ranked by the latest decoded
    queries: they stand at the row's last positions, counted over its real tokens (a
    left-padded row's positions start after its padding)."""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("kvpack.hf")
    from kvpack.hf import cache as cache_module

    from conftest import tiny_decoder

    calls = []
    compress = cache_module.compress

    def recording(keys, values, method, budget, **kwargs):
        calls.append((kwargs.get("first_position"), kwargs["queries"].shape[1]))
        return compress(keys, values, method, budget, **kwargs)

    monkeypatch.setattr(cache_module, "compress", recording)
    model = tiny_decoder(head_dim=16)
    ids = torch.randint(1, 128, (2, 60), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :20], mask[1, :20] = 0, 0
    cache = hf.make_cache(model, "expected_attention", 16, decode_budget=24, decode_interval=4)
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            **{hf.cache_argument(model): cache},
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )
    prefill, decoding = calls[:4], calls[4:]  # 2 layers x 2 rows at the prompt
    assert prefill == [(None, 60), (None, 40)] * 2
    assert decoding and len(decoding) % 2 == 0
    for (first0, n0), (first1, n1) in zip(decoding[::2], decoding[1::2]):
        # Fewer than 32 decoded: every decoded query, from the first decoded position on,
        # 60 in row 0 and 40 in row 1 (its 20 padding tokens have no position).
        assert (first0, first1) == (60, 40) and n0 == n1
    # Compressions once 16 + 9 slots are held, then every 4 decoded tokens.
    assert sorted({first + n for first, n in decoding}) == [49, 53, 57, 69, 73, 77]


@pytest.mark.slow
def test_smollm2_keeps_what_kvpress_keeps(smollm2_cache):
    """On the real SmolLM2-135M (RoPE theta 1e5, GQA 9/3) over real text, every
    compressed layer's KV heads keep what kvpress's press keeps from the layer's hidden
    states (here 512 tokens and a budget of 64; at 1024 tokens and 128 too, measured: all
    84 heads keep identical sets)."""
    import pydoc

    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("kvpack.hf")
    from kvpack.models import load_pretrained

    model, tokenizer = load_pretrained("smollm2-135m", cache_dir=smollm2_cache)
    text = " ".join(pydoc.render_doc(obj, renderer=pydoc.plaintext) for obj in (dict, str))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
    hidden, hooks = _hidden_states_of_each_attention(model)
    prompt = hf.prefill(model, ids)
    for hook in hooks:
        hook.remove()
    cache = hf.make_cache(model, "expected_attention", 64, prefill=prompt)
    expected_attention_press = press("expected_attention_press", "ExpectedAttentionPress")
    for i in cache.compressed_layers:
        module = model.model.layers[i].self_attn
        module.rotary_emb = model.model.rotary_emb
        _, keys, values, _, _ = prompt.layers[i]
        with torch.no_grad():
            scores = expected_attention_press().score(module, hidden[i], keys, values, None, {})[0]
        del module.rotary_emb
        theirs = np.sort(scores.topk(64, dim=-1).indices.numpy(), axis=-1)
        ours = cache.layers[i].held_positions[0].numpy()
        for h in range(keys.shape[1]):
            jaccard = len(np.intersect1d(ours[h], theirs[h])) / len(np.union1d(ours[h], theirs[h]))
            assert jaccard >= 0.99, (i, h, jaccard)


@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_adaptive_heads_split_by_expected_attention(rng, floor):
    """AdaKV over Expected Attention's ranking: the layer's heads share heads * budget
    slots by their pooled scores, the sinks first."""
    keys, values, pre = case(rng, heads_kv=4, tokens=200)
    keys *= np.geomspace(0.3, 3.0, 4)[:, None, None].astype(np.float32)  # unlike heads
    frequencies = inv_freq(32)
    queries = rotated(pre, frequencies)
    budget = 30
    c = kvpack.compress(
        keys,
        values,
        "expected_attention",
        budget,
        queries=queries,
        inv_freq=frequencies,
        adaptive=True,
        adaptive_floor=floor,
    )
    scores = reference.expected_attention_scores(keys, values, queries, inv_freq=frequencies)
    expected = reference.adaptive_picks(scores, budget, floor)
    assert c.kept.tolist() == [len(p) for p in expected]
    assert int(c.kept.sum()) == 4 * budget and len(set(c.kept.tolist())) > 1
    for h, picks in enumerate(expected):
        np.testing.assert_array_equal(c.positions[h, : len(picks)], picks)
        assert (picks[:4] == np.arange(4)).all()  # the sinks
        assert (c.positions[h, len(picks) :] == -1).all()


def _hidden_states_of_each_attention(model):
    """Hooks keeping each layer's first attention input: (layer -> hidden states, hooks)."""
    hidden = {}

    def keep_hidden_states(index):
        def hook(module, args, kwargs):
            hidden.setdefault(index, kwargs["hidden_states"])

        return hook

    hooks = [
        layer.self_attn.register_forward_pre_hook(keep_hidden_states(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    return hidden, hooks
