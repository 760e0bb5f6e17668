"""The CUDA backend against the CPU reference (skipped without a GPU)."""

import numpy as np
import pytest

import kvpack

from conftest import KV_DTYPES, random_cache, random_indices

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not kvpack.cuda_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize(
    ("heads_kv", "heads_q", "tokens", "dim"), [(2, 8, 3000, 128), (1, 1, 5, 64), (4, 12, 700, 40)]
)
@pytest.mark.parametrize("sparse", [None, "kv", "q"])
def test_decode_attention_matches_cpu(rng, dtype, heads_kv, heads_q, tokens, dim, sparse):
    q, k, v = random_cache(rng, heads_kv, tokens, dim, dtype, heads_q)
    indices = None
    if sparse:
        indices = random_indices(
            rng, heads_kv if sparse == "kv" else heads_q, tokens, max(1, tokens // 4)
        )
    bias = rng.standard_normal((heads_kv, tokens)).astype(np.float32)
    cpu = kvpack.attention(q, k, v, indices, bias=bias, return_lse=True, return_weights=True)
    gpu = kvpack.attention(
        q, k, v, indices, bias=bias, return_lse=True, return_weights=True, device="cuda"
    )
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("per_query_head", [False, True])
def test_accumulated_attention_matches_cpu(rng, dtype, reduction, per_query_head):
    _, k, _ = random_cache(rng, 2, 500, 64, dtype)
    queries = rng.standard_normal((8, 40, 64), dtype=np.float32)
    kwargs = dict(reduction=reduction, per_query_head=per_query_head)
    cpu = kvpack.accumulated_attention(queries, k, **kwargs)
    gpu = kvpack.accumulated_attention(queries, k, device="cuda", **kwargs)
    np.testing.assert_allclose(gpu, cpu, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_kmeans_matches_cpu(rng, spherical, dtype):
    centres = rng.standard_normal((2, 30, 64))
    labels = rng.integers(0, 30, size=(2, 4000))
    x = np.take_along_axis(centres, labels[..., None], axis=1) + 0.3 * rng.standard_normal(
        (2, 4000, 64)
    )
    x = x.astype(dtype)
    cpu = kvpack.kmeans(x, 30, seed=5, spherical=spherical)
    gpu = kvpack.kmeans(x, 30, seed=5, spherical=spherical, device="cuda")
    assert (cpu.labels == gpu.labels).mean() > 0.999
    np.testing.assert_allclose(gpu.objective, cpu.objective, rtol=1e-4)
