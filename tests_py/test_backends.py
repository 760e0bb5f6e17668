"""The test driver of every backend through the bindings: each op with a CUDA twin runs on
every backend available here, on random shapes, GQA ratios and KV dtypes, against the
NumPy float64 reference and the CPU backend. "cpu" always runs; "cuda" (host arrays
staged on the GPU) and "cuda-tensor" (torch tensors in GPU memory, results left there)
skip without a device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kvpack

import reference as ref
from conftest import KV_DTYPES, random_cache, random_indices


def _cuda_tensors_usable():
    try:
        import torch
    except ImportError:
        return False
    return kvpack.cuda_available() and torch.cuda.is_available()


BACKENDS = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not kvpack.cuda_available(), reason="needs a CUDA device"),
        ],
    ),
    pytest.param(
        "cuda-tensor",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not _cuda_tensors_usable(), reason="needs torch with CUDA"),
        ],
    ),
]

# (heads_kv, heads_q, tokens, dim): GQA ratios 1, 4 and 3, short and long caches.
SHAPES = [(1, 1, 7, 16), (2, 8, 1500, 128), (4, 12, 333, 40), (3, 3, 64, 64)]


def _run(backend, fn, *arrays, **kwargs):
    """fn on `backend`: arrays as given (NumPy) or moved into GPU memory as torch tensors."""
    if backend == "cpu":
        return fn(*arrays, **kwargs)
    if backend == "cuda":
        return fn(*arrays, device="cuda", **kwargs)
    import torch

    def to_gpu(a):
        if a is None:
            return None
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()

    out = fn(*(to_gpu(a) for a in arrays), **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert o.is_cuda  # results stay on the device
    outs = tuple(o.cpu().numpy() for o in outs)
    return outs if isinstance(out, tuple) else outs[0]


def _tolerance(backend):
    return dict(atol=0, rtol=0) if backend == "cpu" else dict(atol=2e-5, rtol=2e-5)


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
    cpu = kvpack.attention(q, k, v, idx, bias=bias, return_lse=True, return_weights=True)
    want = ref.decode_attention(q, k, v, idx, bias)
    for got, expected in zip(cpu, want):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)

    def attend(q, k, v, idx, bias, **kwargs):
        return kvpack.attention(
            q, k, v, idx, bias=bias, return_lse=True, return_weights=True, **kwargs
        )

    got = _run(backend, attend, q, k, v, idx, bias)
    for a, b in zip(got, cpu):
        np.testing.assert_allclose(a, b, **_tolerance(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("reduction", "per_query_head"), [("sum", False), ("mean", True)])
def test_accumulated_attention_on_every_backend(
    rng, backend, dtype, shape, reduction, per_query_head
):
    heads_kv, heads_q, tokens, dim = shape
    _, k, _ = random_cache(rng, heads_kv, tokens, dim, dtype)
    window = min(tokens, 9)
    queries = rng.standard_normal((heads_q, window, dim), dtype=np.float32)
    kwargs = dict(reduction=reduction, per_query_head=per_query_head)
    cpu = kvpack.accumulated_attention(queries, k, **kwargs)
    want = ref.accumulated_attention(queries, k, reduction=reduction, per_query_head=per_query_head)
    np.testing.assert_allclose(cpu, want, atol=1e-5, rtol=1e-4)
    got = _run(backend, kvpack.accumulated_attention, queries, k, **kwargs)
    exact = backend == "cpu"
    np.testing.assert_allclose(got, cpu, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_on_every_backend(rng, backend, dtype, spherical):
    centres = rng.standard_normal((2, 12, 32))
    labels = rng.integers(0, 12, size=(2, 900))
    x = np.take_along_axis(centres, labels[..., None], axis=1)
    x = (x + 0.2 * rng.standard_normal(x.shape)).astype(dtype)
    init = rng.standard_normal((2, 12, 32)).astype(np.float32)
    cpu = kvpack.kmeans(x, 12, iters=10, spherical=spherical, init_centroids=init)
    for h in range(2):
        _, lab, history = ref.kmeans(x[h], init[h], 10, spherical)
        assert (cpu.labels[h] == lab).mean() > 0.999
        np.testing.assert_allclose(cpu.history[h], history, rtol=1e-4)

    def cluster(x, **kwargs):
        # kmeans' results are NumPy whatever the input: the driver compares them directly.
        return kvpack.kmeans(x, 12, iters=10, spherical=spherical, init_centroids=init, **kwargs)

    if backend == "cuda-tensor":
        import torch

        if dtype.name == "bfloat16":
            got = cluster(torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda())
        else:
            got = cluster(torch.from_numpy(x).cuda())
    else:
        got = cluster(x) if backend == "cpu" else cluster(x, device="cuda")
    if backend == "cpu":
        np.testing.assert_array_equal(got.labels, cpu.labels)
        np.testing.assert_array_equal(got.centroids, cpu.centroids)
    else:
        assert (got.labels == cpu.labels).mean() > 0.999
        np.testing.assert_allclose(got.objective, cpu.objective, rtol=1e-4)


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
