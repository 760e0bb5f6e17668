"""Every op with a CUDA twin, through the bindings, on random shapes, GQA ratios and KV
dtypes: the CPU result against the NumPy float64 reference, and every backend against the
CPU through the one driver (backends.check_against_cpu; CUDA backends skip without a
device)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kvpack

import reference as ref
from backends import BACKENDS, check_against_cpu
from conftest import KV_DTYPES, random_cache, random_indices

# (heads_kv, heads_q, tokens, dim): GQA ratios 1, 4 and 3, short and long caches (3000
# tokens: the GPU kernels' many-block path).
SHAPES = [
    (1, 1, 7, 16),
    (2, 8, 1500, 128),
    (4, 12, 333, 40),
    (3, 3, 64, 64),
    (2, 8, 3000, 128),
    (1, 1, 5, 64),
    (4, 12, 700, 40),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparse", [None, "kv", "q"])
def test_decode_attention_on_every_backend(rng, backend, dtype, shape, sparse):
    heads_kv, heads_q, tokens, dim = shape
    q, k, v = random_cache(rng, heads_kv, tokens, dim, dtype, heads_q)
    idx = None
    if sparse:
        rows = heads_kv if sparse == "kv" else heads_q
        idx = random_indices(rng, rows, tokens, max(1, tokens // 3))
    bias = rng.standard_normal((heads_kv, tokens), dtype=np.float32)

    def attend(q, k, v, idx, bias, **kwargs):
        return kvpack.attention(
            q, k, v, idx, bias=bias, return_lse=True, return_weights=True, **kwargs
        )

    cpu = check_against_cpu(backend, attend, q, k, v, idx, bias)
    for got, expected in zip(cpu, ref.decode_attention(q, k, v, idx, bias)):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("per_query_head", [False, True])
def test_accumulated_attention_on_every_backend(
    rng, backend, dtype, shape, reduction, per_query_head
):
    heads_kv, heads_q, tokens, dim = shape
    _, k, _ = random_cache(rng, heads_kv, tokens, dim, dtype)
    window = min(tokens, 9)
    queries = rng.standard_normal((heads_q, window, dim), dtype=np.float32)
    kwargs = dict(reduction=reduction, per_query_head=per_query_head)
    cpu = check_against_cpu(
        backend, kvpack.accumulated_attention, queries, k, atol=1e-5, rtol=1e-4, **kwargs
    )
    want = ref.accumulated_attention(queries, k, reduction=reduction, per_query_head=per_query_head)
    np.testing.assert_allclose(cpu, want, atol=1e-5, rtol=1e-4)


def _same_clustering(got, cpu, exact):
    if exact:
        np.testing.assert_array_equal(got.labels, cpu.labels)
        np.testing.assert_array_equal(got.centroids, cpu.centroids)
    else:
        assert (got.labels == cpu.labels).mean() > 0.999
        np.testing.assert_allclose(got.objective, cpu.objective, rtol=1e-4)


def _clustered(rng, clusters, points, dim, noise, dtype):
    """Two heads of `points` rows around `clusters` random centres, stored in `dtype`."""
    centres = rng.standard_normal((2, clusters, dim))
    labels = rng.integers(0, clusters, size=(2, points))
    x = np.take_along_axis(centres, labels[..., None], axis=1)
    return (x + noise * rng.standard_normal(x.shape)).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_on_every_backend(rng, backend, dtype, spherical):
    x = _clustered(rng, 12, 900, 32, 0.2, dtype)
    init = rng.standard_normal((2, 12, 32)).astype(np.float32)
    kwargs = dict(iters=10, spherical=spherical, init_centroids=init)
    cpu = check_against_cpu(backend, kvpack.kmeans, x, 12, compare=_same_clustering, **kwargs)
    for h in range(2):
        _, lab, history = ref.kmeans(x[h], init[h], 10, spherical)
        assert (cpu.labels[h] == lab).mean() > 0.999
        np.testing.assert_allclose(cpu.history[h], history, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("spherical", [True, False])
def test_seeded_kmeans_on_every_backend(rng, backend, dtype, spherical):
    """Each backend's own seeded initialisation, on well-separated clusters."""
    x = _clustered(rng, 30, 4000, 64, 0.3, dtype)
    kwargs = dict(seed=5, spherical=spherical)
    check_against_cpu(backend, kvpack.kmeans, x, 30, compare=_same_clustering, **kwargs)


def _attention_with_cpu_target(target):
    """Dense attention of a fixed cache in a fresh process whose kernels are `target`'s."""
    code = (
        "import json, numpy as np, kvpack\n"
        "rng = np.random.default_rng(0)\n"
        "k = rng.standard_normal((2, 600, 64), dtype=np.float32).astype(np.float16)\n"
        "q = rng.standard_normal((4, 64), dtype=np.float32)\n"
        "print(json.dumps([kvpack.cpu_target(), kvpack.attention(q, k, k).tolist()]))\n"
    )
    env = dict(os.environ, KVPACK_CPU_TARGET=target)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )


def test_cpu_kernels_run_the_best_build_and_every_build_agrees():
    builds = kvpack.cpu_targets()
    assert builds, "no build of the CPU kernels runs here"
    if not os.environ.get("KVPACK_CPU_TARGET"):
        assert kvpack.cpu_target() == builds[0]
    outputs = {}
    for target in builds:
        run = _attention_with_cpu_target(target)
        assert run.returncode == 0, run.stderr
        chosen, out = json.loads(run.stdout)
        assert chosen == target
        outputs[target] = np.array(out)
    for target, out in outputs.items():
        np.testing.assert_allclose(out, outputs[builds[0]], rtol=1e-5, atol=1e-6, err_msg=target)


def test_unknown_cpu_target_is_a_named_error():
    run = _attention_with_cpu_target("z80")
    assert run.returncode != 0
    assert "KVPACK_CPU_TARGET" in run.stderr and "'z80'" in run.stderr
