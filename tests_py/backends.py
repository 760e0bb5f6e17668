"""The one driver that runs an op on every backend against the CPU reference (as ggml's
test-backend-ops): "cpu" always runs, so the driver itself is exercised everywhere;
"cuda" (host arrays staged on the GPU) and "cuda-tensor" (torch tensors in GPU memory,
results left there) skip, never fail, without a device."""

import numpy as np
import pytest

import kvpack


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


def _to_gpu(a):
    import torch

    if a is None:
        return None
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def _to_host(out):
    """Results as NumPy: torch tensors must have stayed on the device."""
    if isinstance(out, tuple):
        return tuple(_to_host(o) for o in out)
    if hasattr(out, "is_cuda"):
        assert out.is_cuda  # results stay on the device
        return out.cpu().numpy()
    return out  # NumPy already (e.g. kmeans' result, whatever its input)


def run_on(backend, op, *arrays, **kwargs):
    """op on `backend`: arrays as given (NumPy), staged with device="cuda", or moved into
    GPU memory as torch tensors."""
    if backend == "cpu":
        return op(*arrays, **kwargs)
    if backend == "cuda":
        return op(*arrays, device="cuda", **kwargs)
    return _to_host(op(*(_to_gpu(a) for a in arrays), **kwargs))


def check_against_cpu(backend, op, *arrays, atol=2e-5, rtol=2e-5, compare=None, **kwargs):
    """Runs ``op(*arrays, **kwargs)`` on the CPU and on `backend` and asserts they agree:
    bit for bit on "cpu", within atol/rtol elsewhere, or as ``compare(got, cpu, exact)``
    asserts. Returns the CPU result, for the test's own check against the NumPy reference.
    """
    cpu = op(*arrays, **kwargs)
    got = run_on(backend, op, *arrays, **kwargs)
    exact = backend == "cpu"
    if compare is not None:
        compare(got, cpu, exact)
        return cpu
    for a, b in zip(
        got if isinstance(got, tuple) else (got,), cpu if isinstance(cpu, tuple) else (cpu,)
    ):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)
    return cpu
