import numpy as np
import pytest

import kvpack

import reference


def planted(rng, n=3000, k=12, d=32, noise=0.4, heads=None):
    """Points around k random directions (a clustering with a clear answer)."""
    shape = (heads,) if heads else ()
    centres = rng.standard_normal((*shape, k, d))
    labels = rng.integers(0, k, size=(*shape, n))
    x = np.take_along_axis(centres, labels[..., None], axis=-2) if heads else centres[labels]
    return (x + noise * rng.standard_normal(x.shape)).astype(np.float32)


@pytest.mark.parametrize("spherical", [True, False])
def test_matches_numpy_reference_from_same_start(rng, spherical):
    x = planted(rng)
    init = x[rng.choice(len(x), 12, replace=False)]
    got = kvpack.kmeans(x, 12, iters=15, spherical=spherical, init_centroids=init)
    centroids, labels, history = reference.kmeans(x, init, 15, spherical)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(got.centroids, centroids, atol=1e-5)
    assert got.iterations == len(history)
    np.testing.assert_allclose(got.history, history, rtol=1e-5)


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_objective_never_increases(rng, spherical, init):
    x = rng.standard_normal((4000, 24)).astype(np.float32)  # no clear clusters: many rounds
    result = kvpack.kmeans(x, 40, iters=30, spherical=spherical, init=init, seed=3)
    history = np.array(result.history)
    assert len(history) > 3
    assert np.all(np.diff(history) <= 1e-6 * history[:-1])
    assert result.objective <= history[-1] * (1 + 1e-6)


def test_spherical_centroids_are_unit_and_labels_are_nearest(rng):
    x = planted(rng, noise=1.0)
    result = kvpack.kmeans(x, 12, seed=1)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    best = (xn @ result.centroids.T).argmax(axis=1)
    agree = (best == result.labels).mean()
    assert agree > 0.999  # labels are the argmax of the last assignment


def test_deterministic_for_seed_and_threads(rng):
    x = planted(rng, n=5000, heads=3)
    before = kvpack.get_num_threads()
    try:
        kvpack.set_num_threads(1)
        one = kvpack.kmeans(x, 12, seed=7)
        kvpack.set_num_threads(2)
        two = kvpack.kmeans(x, 12, seed=7)
    finally:
        kvpack.set_num_threads(before)
    np.testing.assert_array_equal(one.labels, two.labels)
    np.testing.assert_array_equal(one.centroids, two.centroids)
    other = kvpack.kmeans(x, 12, seed=8)
    assert not np.array_equal(one.centroids, other.centroids)


def test_batched_equals_per_head(rng):
    x = planted(rng, n=2000, heads=3)
    batched = kvpack.kmeans(x, 12, seed=2)
    assert batched.centroids.shape == (3, 12, 32) and batched.labels.shape == (3, 2000)
    for h in range(3):
        single = kvpack.kmeans(x[h], 12, seed=2)
        np.testing.assert_array_equal(batched.labels[h], single.labels)
        assert batched.objective[h] == pytest.approx(single.objective)


def test_half_storage_equals_float_of_same_values(rng):
    x = planted(rng).astype(np.float16)
    a = kvpack.kmeans(x, 12, seed=4)
    b = kvpack.kmeans(x.astype(np.float32), 12, seed=4)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_recovers_planted_clusters(rng):
    x = planted(rng, noise=0.2)
    result = kvpack.kmeans(x, 12, seed=0)
    # Every cluster is tight: mean cosine to its centroid close to 1.
    assert result.objective / len(x) < 0.05
    assert np.all(np.bincount(result.labels, minlength=12) > 0)


def test_empty_clusters_are_reseeded():
    # Duplicated points with more clusters than distinct values: some start empty.
    x = np.repeat(np.eye(4, dtype=np.float32), 50, axis=0)
    x += 0.01 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    init = np.tile(x[:1], (6, 1))  # all centroids on one point
    result = kvpack.kmeans(x, 6, init_centroids=init, spherical=False)
    assert len(np.unique(result.labels)) >= 4


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            dict(n_clusters=0),
            ValueError,
            "n_clusters: expected 1 <= n_clusters <= points=100, got 0",
        ),
        (dict(n_clusters=101), ValueError, "n_clusters: expected 1 <= n_clusters <= points=100"),
        (dict(iters=0), ValueError, "iters: expected >= 1, got 0"),
        (dict(init="best"), ValueError, "init: expected 'kmeans\\+\\+' or 'random', got 'best'"),
        (
            dict(init_centroids=np.zeros((3, 8), np.float32)),
            ValueError,
            "init_centroids: expected shape",
        ),
        (dict(x=np.zeros(100, np.float32)), ValueError, "x: expected 2 dimensions"),
        (dict(x=np.zeros((100, 8))), TypeError, "x: expected dtype float32, float16 or bfloat16"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, message):
    args = dict(x=np.random.default_rng(0).random((100, 8), dtype=np.float32), n_clusters=5)
    args |= kwargs
    with pytest.raises(error, match=message):
        kvpack.kmeans(**args)
