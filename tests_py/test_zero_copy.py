import numpy as np
import pytest

import kvpack
from kvpack import _core

from conftest import KV_DTYPES, random_cache


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
