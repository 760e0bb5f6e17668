import numpy as np
import pytest

import kvpack
from kvpack import _core

from conftest import KV_DTYPES, random_cache, random_indices


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_inputs_reach_the_core_without_copy(rng, dtype):
    _, k, _ = random_cache(rng, 2, 10, 16, dtype)
    assert _core._data_pointer(k) == k.ctypes.data


def test_views_reach_the_core_without_copy(rng):
    _, k, _ = random_cache(rng, 4, 10, 16, np.float16)
    view = k[1:3]  # a C-contiguous slice of a bigger buffer
    assert _core._data_pointer(view) == view.ctypes.data


def test_outputs_own_core_memory():
    rng = np.random.default_rng(0)
    q, k, v = random_cache(rng, 2, 64, 32, np.float32, 4)
    out, lse, weights = kvpack.attention(q, k, v, return_lse=True, return_weights=True)
    for array in (out, lse, weights):
        assert not array.flags.owndata  # memory allocated by C++, not NumPy
        assert type(array.base).__name__ == "PyCapsule"
        assert array.flags.c_contiguous and array.flags.writeable


def test_outputs_are_dlpack_exportable():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q, k, v = random_cache(rng, 2, 64, 32, np.float32, 4)
    out = kvpack.attention(q, k, v)
    tensor = torch.from_dlpack(out)
    assert tensor.data_ptr() == out.ctypes.data
    tensor[0, 0] = 42.0
    assert out[0, 0] == 42.0


@pytest.mark.parametrize("name", ["keys", "values"])
def test_non_contiguous_kv_is_rejected(rng, name):
    q, k, v = random_cache(rng, 2, 64, 32, np.float16, 2)
    args = {"keys": k, "values": v}
    args[name] = np.swapaxes(np.swapaxes(args[name], 0, 1).copy(), 0, 1)  # same shape, strided
    with pytest.raises(ValueError, match=f"{name}: expected a C-contiguous array"):
        kvpack.attention(q, args["keys"], args["values"])


# ---- DLPack producers (torch tensors) -------------------------------------------------

TORCH_DTYPES = ["float32", "float16", "bfloat16", "float64", "int32", "int64", "bool", "uint8"]


def _torch():
    return pytest.importorskip("torch")


def _to_torch(array):
    """A torch CPU tensor with the values of `array` (bfloat16 through its bits)."""
    torch = _torch()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_torch_tensors_of_every_dtype_are_viewed_in_place(name):
    torch = _torch()
    dtype = getattr(torch, name)
    tensor = (torch.arange(24) % 5).reshape(2, 3, 4).to(dtype)
    array = _core._as_array(tensor)
    assert array.ctypes.data == tensor.data_ptr()
    assert array.dtype.name == name and array.shape == (2, 3, 4)
    np.testing.assert_array_equal(array.astype(np.float64), tensor.double().numpy())
    array[0, 0, 0] = 1  # the same memory, both ways
    assert tensor[0, 0, 0].item() == 1


def test_torch_strided_views_keep_their_strides():
    torch = _torch()
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    for view in (base.transpose(0, 2), base[:, ::2, 1:], base[1:, :, :3]):
        array = _core._as_array(view)
        assert array.ctypes.data == view.data_ptr()
        assert array.strides == tuple(4 * s for s in view.stride())
        np.testing.assert_array_equal(array, view.numpy())


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_torch_kv_reaches_the_core_without_copy(rng, dtype):
    _, k, _ = random_cache(rng, 2, 10, 16, dtype)
    tensor = _to_torch(k)
    assert _core._data_pointer(tensor) == tensor.data_ptr()
    # A slice of a cache buffer with spare room: heads further apart than tokens * dim.
    buffer = _to_torch(random_cache(rng, 2, 40, 16, dtype)[1])
    view = buffer[:, :25]
    assert not view.is_contiguous()
    assert _core._data_pointer(view) == view.data_ptr()


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_torch_inputs_give_the_numpy_results(rng, dtype):
    q, k, v = random_cache(rng, 2, 64, 32, dtype, 4)
    idx = random_indices(rng, 2, 64, 20)
    bias = rng.standard_normal((2, 64), dtype=np.float32)
    want = kvpack.attention(q, k, v, idx, bias=bias, return_lse=True)
    got = kvpack.attention(
        _to_torch(q),
        _to_torch(k),
        _to_torch(v),
        _to_torch(idx),
        bias=_to_torch(bias),
        return_lse=True,
    )
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    queries = rng.standard_normal((4, 8, 32), dtype=np.float32)
    np.testing.assert_array_equal(
        kvpack.accumulated_attention(_to_torch(queries), _to_torch(k)),
        kvpack.accumulated_attention(queries, k),
    )
    want_km = kvpack.kmeans(k, 5, iters=4)
    got_km = kvpack.kmeans(_to_torch(k), 5, iters=4)
    np.testing.assert_array_equal(got_km.labels, want_km.labels)
    np.testing.assert_array_equal(got_km.centroids, want_km.centroids)


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_torch_strided_tail_is_attended_in_place(rng, dtype):
    q, k, v = random_cache(rng, 2, 300, 32, dtype, 4)
    prefix = np.ascontiguousarray(k[:, :200]), np.ascontiguousarray(v[:, :200])
    qkv = kvpack.quantize(*prefix, bits=4, residual=32)
    tk, tv = _to_torch(k), _to_torch(v)
    tail = (tk[:, 200:260], tv[:, 200:260])  # slices of a bigger buffer: heads strided
    assert not tail[0].is_contiguous()
    got = qkv.attend(_to_torch(q), tail=tail)
    want = qkv.attend(q, tail=(k[:, 200:260], v[:, 200:260]))
    np.testing.assert_array_equal(got, want)


class _Producer:
    """A DLPack producer whose tensor exists only in the capsule it hands out."""

    def __init__(self, make):
        self.make = make

    def __dlpack_device__(self):
        return self.make().__dlpack_device__()

    def __dlpack__(self, **kwargs):
        return self.make().__dlpack__(**kwargs)  # the tensor is dropped on return


def test_a_freed_producer_stays_valid_during_the_call(rng):
    torch = _torch()
    q, k, v = random_cache(rng, 2, 128, 32, np.float16, 4)
    want = kvpack.attention(q, k, v)
    got = kvpack.attention(
        q,
        _Producer(lambda: torch.from_numpy(k.copy())),
        _Producer(lambda: torch.from_numpy(v.copy())),
    )
    np.testing.assert_array_equal(got, want)
    view = _core._as_array(_Producer(lambda: torch.from_numpy(k.copy())))
    torch.randn(1 << 16)  # reuse of freed memory would show below
    np.testing.assert_array_equal(view, k)


def test_the_producer_is_released_with_the_last_view():
    import gc
    import weakref

    holder = [np.arange(12, dtype=np.float32)]
    alive = weakref.ref(holder[0])
    view = _core._as_array(_Producer(lambda: holder[0]))
    holder.clear()
    gc.collect()
    assert alive() is not None  # held by the view through the DLPack deleter
    del view
    gc.collect()
    assert alive() is None


def test_read_only_producers_stay_read_only(rng):
    _, k, v = random_cache(rng, 2, 64, 32, np.float32)
    qkv = kvpack.quantize(k, v, bits=8, residual=0)
    out_k, out_v = np.empty_like(k), np.empty_like(v)
    out_k.flags.writeable = False
    view = _core._as_array(_Producer(lambda: out_k))
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="out: expected writable arrays"):
        qkv.dequantize(out=(_Producer(lambda: out_k), _Producer(lambda: out_v)))


class _DeviceTensor:
    """Stands for a tensor in GPU memory: only its device can be asked."""

    def __init__(self, device_type, device_id):
        self.device = (device_type, device_id)

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, **kwargs):
        raise AssertionError("a GPU tensor must not be exported to a CPU-only operation")


@pytest.mark.parametrize(("device", "where"), [((2, 1), "cuda:1"), ((10, 0), "rocm:0")])
def test_gpu_tensors_are_named_with_their_device(rng, device, where):
    _, k, v = random_cache(rng, 2, 64, 32, np.float32)
    with pytest.raises(
        ValueError, match=f"keys: expected an array in host memory, got a tensor on {where}"
    ):
        kvpack.quantize(_DeviceTensor(*device), v)
    with pytest.raises(ValueError, match=f"values: .* on {where}"):
        kvpack.quantize(k, _DeviceTensor(*device))


@pytest.mark.skipif(kvpack.cuda_available(), reason="a GPU is present")
def test_gpu_tensors_need_a_usable_device(rng):
    q, _, _ = random_cache(rng, 2, 64, 32, np.float32)
    with pytest.raises(ValueError, match=r"keys: 'cuda' requested \(cuda:1\) but"):
        kvpack.attention(q, _DeviceTensor(2, 1), _DeviceTensor(2, 1))
    with pytest.raises(ValueError, match=r"x: 'cuda' requested \(cuda:0\) but"):
        kvpack.kmeans(_DeviceTensor(2, 0), 4)
    with pytest.raises(
        ValueError, match="x: expected an array in host or CUDA memory, got a tensor on rocm:0"
    ):
        kvpack.kmeans(_DeviceTensor(10, 0), 4)
