"""KeyDiff against a float64 reference and against kvpress's KeyDiffPress."""

import numpy as np
import pytest

import kvpack

import reference
from kvpress_reference import press

KV_DTYPES = [np.float32, np.float16]


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("budget", [0.25, 0.5, 1])
def test_keeps_the_least_typical_keys(rng, dtype, budget):
    # Keys around a shared direction plus outliers: KeyDiff keeps the outliers first.
    common = rng.standard_normal(64)
    keys = (common + 0.3 * rng.standard_normal((4, 500, 64))).astype(dtype)
    keys[:, ::50] = rng.standard_normal((4, 10, 64)) * 3
    values = rng.standard_normal((4, 500, 64)).astype(dtype)
    result = kvpack.compress(keys, values, "keydiff", budget)
    slots = budget if isinstance(budget, int) else round(budget * 500)
    expected = reference.compress(keys, values, "keydiff", slots)
    np.testing.assert_array_equal(result.positions, expected["positions"])
    np.testing.assert_array_equal(result.keys, keys[np.arange(4)[:, None], expected["positions"]])
    np.testing.assert_array_equal(result.values, values[np.arange(4)[:, None], result.positions])
    assert (result.counts == 1).all()
    if slots >= 10:
        assert np.isin(np.arange(0, 500, 50), result.positions).all()


def test_a_zero_key_scores_zero(rng):
    keys = rng.standard_normal((1, 40, 16)).astype(np.float32)
    keys[0, 7] = 0
    positions = kvpack.compress(keys, keys, "keydiff", 39).positions[0]
    np.testing.assert_array_equal(positions, reference.keep_keydiff(keys[0], 39))


@pytest.mark.parametrize("heads, tokens, dim", [(2, 300, 32), (8, 1024, 64)])
def test_matches_kvpress_keydiff(rng, heads, tokens, dim):
    import torch

    keydiff_press = press("keydiff_press", "KeyDiffPress")
    keys = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
    keys += rng.standard_normal(dim).astype(np.float32)  # a shared direction, as real keys have
    scores = keydiff_press().score(None, None, torch.from_numpy(keys)[None], None, None, {})[0]
    for h in range(heads):
        np.testing.assert_allclose(
            scores[h].double().numpy(), reference.keydiff_scores(keys[h]), atol=1e-5
        )
    kept = tokens // 4
    ours = kvpack.compress(keys, keys, "keydiff", kept).positions
    theirs = np.sort(scores.topk(kept, dim=-1).indices.numpy(), axis=-1)
    for h in range(heads):
        jaccard = len(np.intersect1d(ours[h], theirs[h])) / len(np.union1d(ours[h], theirs[h]))
        assert jaccard >= 0.99, (h, jaccard)


def test_is_a_store_codec(rng):
    keys = rng.standard_normal((2, 64, 16)).astype(np.float32)
    decoded = kvpack.store.decode(kvpack.store.encode([(keys, keys)], "keydiff-0.5"))
    assert decoded.codec == "keydiff-0.5"
    expected = reference.compress(keys, keys, "keydiff", 32)["positions"]
    np.testing.assert_array_equal(decoded.positions[0], expected)
