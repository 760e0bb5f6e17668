// NumPy <-> core conversion and argument validation for every binding: dtype,
// ndim, shape, contiguity and value checks with messages that name the argument,
// and result arrays that own C++ memory without a copy.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "args.h"
#include "dlpack.h"
#include "kvpack/attention.h"
#include "kvpack/backend.h"
#include "kvpack/common.h"

namespace kvpack::bindings {

namespace py = pybind11;

/// A ValueError (std::invalid_argument) with a streamed message.
#define KVPACK_ARG_CHECK(condition, message) KVPACK_CHECK(condition, message)

/// A TypeError with a streamed message.
#define KVPACK_TYPE_CHECK(condition, message) \
  do {                                        \
    if (!(condition)) {                       \
      std::ostringstream kvpack_os_;          \
      kvpack_os_ << message;                  \
      throw py::type_error(kvpack_os_.str()); \
    }                                         \
  } while (0)

/// `object` as a NumPy array without a copy for NumPy arrays, DLPack producers in host
/// memory (torch CPU tensors of any dtype, bfloat16 included, strides kept) and
/// buffer/array-interface objects. TypeError naming the argument when it cannot be one;
/// ValueError naming it and its device when it lives on a GPU.
py::array as_array(const py::object& object, const char* name);

/// A tensor taken over from a `__dlpack__` capsule; `owner` frees it (and so releases
/// the producer's memory) when the last reference to it goes.
// Hidden like the pybind11 types it holds.
struct __attribute__((visibility("hidden"))) DLPackTensor {
  dlpack::Tensor tensor{};
  bool read_only = false;
  py::capsule owner;
};

/// The tensor of `object.__dlpack__()` (DLPack 1.x, or the older unversioned capsule);
/// `stream`: the consumer's CUDA stream for a device tensor (1: the legacy default).
DLPackTensor dlpack_tensor(const py::object& object, const char* name,
                           std::optional<std::int64_t> stream = std::nullopt);

/// `object.__dlpack_device__()` as (DLPack device type, id); (kCPU, 0) for NumPy arrays
/// and objects that are not DLPack producers.
std::pair<std::int32_t, std::int32_t> dlpack_device(const py::object& object);

std::string shape_string(const py::array& array);
std::string dtype_string(const py::array& array);

/// ValueError unless the array's bytes are in this machine's order (read in place).
void require_native(const py::array& array, const char* name);

/// The storage dtype of a KV array; TypeError unless float32, float16 or bfloat16.
DType kv_dtype(const py::array& array, const char* name);

/// The NumPy dtype of a storage dtype (bfloat16 through ml_dtypes).
py::dtype numpy_dtype(DType dtype);

/// Checks ndim and C-contiguity of `array`.
void require_layout(const py::array& array, const char* name, int ndim, const char* layout);

/// Zero-copy view of a [heads, tokens, dim] KV array, validated.
KVView kv_view(const py::array& array, const char* name);

/// Like kv_view, but also accepts heads further apart than tokens * dim (each head's
/// rows contiguous), as in a slice of a cache buffer with spare room; tokens may be 0.
KVView strided_kv_view(const py::array& array, const char* name);

/// View of a batch's keys or values [batch, heads_kv, tokens, head_dim] (any KV dtype),
/// read in place when each head_dim row is contiguous (a token-major buffer transposed, a
/// slice of a buffer with spare room) and, with `heads_contiguous`, each head's token rows
/// too; `array` is replaced by a C-contiguous copy otherwise (what a step reads is small).
BatchKVView batch_kv_view(py::array& array, const char* name, bool heads_contiguous);

/// The arguments of a batched decode step, checked: float32 queries [batch, new, heads_q,
/// head_dim] and keys and values [batch, heads_kv, tokens, head_dim] (batch_kv_view) of one
/// shape and dtype, heads_q a multiple of heads_kv. The arrays keep the data alive.
// Hidden like the pybind11 types it holds.
struct __attribute__((visibility("hidden"))) BatchStep {
  py::array_t<float> queries;
  py::array keys_array, values_array;
  BatchKVView keys, values;
  std::int64_t batch = 0, fresh = 0, heads_q = 0;  ///< fresh: the new queries per row
};
BatchStep batch_step(const py::object& queries, const py::object& keys, const py::object& values,
                     const char* keys_name, const char* values_name, bool heads_contiguous);

/// Zero-copy views of a layer's keys and values, validated: values must match the
/// shape and dtype of keys.
std::pair<KVView, KVView> kv_pair(const py::array& keys, const py::array& values);

/// One decoded token's keys or values, [heads_kv, head_dim] or [heads_kv, 1, head_dim];
/// a non-contiguous one is copied (it is small).
py::array contiguous_token(const py::object& object, const char* name);

/// A [heads_kv, 1, head_dim] view of one token's keys or values from contiguous_token.
KVView token_view(const py::array& a, const char* name);

/// Views of a decode step's new key and value, checked against the cache's heads, head_dim
/// and dtype and for NaN/Inf (one token is cheap to check). The arrays keep the data alive.
// Hidden like the pybind11 types it holds.
struct __attribute__((visibility("hidden"))) NewToken {
  py::array key_array, value_array;
  KVView key, value;
};
NewToken new_token(const py::object& key, const py::object& value, std::int64_t heads,
                   std::int64_t dim, DType dtype);

/// Checks a decode query against the cache's KV heads and head_dim.
void check_query(const py::array_t<float>& q, std::int64_t heads_kv, std::int64_t dim);

/// Float32 C-contiguous array of `array` with `ndim` dims: the array itself when it
/// already is one, else a converted copy (queries are small). Rejects NaN/Inf.
py::array_t<float> finite_float32(const py::array& array, const char* name, int ndim,
                                  const char* layout);

/// Zero-copy view of int32 index sets [rows, count], each row sorted, unique, in [0, tokens).
IndexView index_view(const py::array& array, const char* name, std::int64_t tokens);

/// A new float32 NumPy array of `shape` whose memory C++ allocated and the array owns.
py::array_t<float> owned_float_array(const std::vector<py::ssize_t>& shape);

/// A NumPy array of `shape` that takes over `values` (moved, not copied).
template <class T>
py::array_t<T> adopt_vector(std::vector<T>&& values, const std::vector<py::ssize_t>& shape) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), owner);
}

/// Raises ValueError naming the first of `arrays` holding a NaN or Inf.
/// When none does, the result overflowed float32: raises ValueError with `otherwise`.
[[noreturn]] void raise_non_finite(
    const std::vector<std::pair<const char*, KVView>>& arrays,
    const char* otherwise =
        "attention scores overflowed float32: q and keys are too large in "
        "magnitude");

/// Raises ValueError naming `name` when the view holds a NaN or Inf.
void require_finite(const KVView& view, const char* name);

/// True when all n floats at data are finite.
bool all_finite(const float* data, std::int64_t n);

/// Parses the `device` argument, "cpu" or "cuda[:N]", into how the op runs on host
/// arrays: "cuda" stages them on that device (the core checks it is usable).
Execution parse_device(const std::string& device);

/// The core device of a DLPack producer: CPU for NumPy arrays, host and pinned memory;
/// CUDA for a tensor on a CUDA device; ValueError naming the argument for any other.
Device device_of(const py::object& object, const char* name);

/// What a call on tensors in CUDA memory needs from their framework (torch): the
/// device's current stream, tensors taken without a copy, and results and scratch
/// allocated on the device, so that results stay there.
// Hidden like the pybind11 types it holds.
struct __attribute__((visibility("hidden"))) CudaCall {
  /// Checks that `device` is usable, naming `name` (the argument on it) when not.
  CudaCall(const Device& device, const char* name);
  /// `object` taken over through DLPack, ordered after the work queued on our stream.
  DLPackTensor take(const py::object& object, const char* name) const;
  /// Zero-copy [heads, tokens, dim] view of a C-contiguous KV tensor on this device.
  KVView kv_view(const py::object& object, const char* name, DLPackTensor& keep) const;
  /// Pointer to a C-contiguous float32 tensor of `ndim` dims on this device; `shape` gets
  /// its shape.
  const float* float32(const py::object& object, const char* name, int ndim,
                       std::vector<std::int64_t>& shape, DLPackTensor& keep) const;
  /// A new float32 tensor of `shape` on this device.
  py::object empty(const std::vector<std::int64_t>& shape) const;
  /// Pointer to the data of a tensor from empty().
  static float* data(const py::object& tensor);

  Device device;
  py::object torch;
  Execution exec;
};

/// 0 (the default 1/sqrt(head_dim)) for None, else a positive finite scale.
float resolve_scale_arg(const std::optional<double>& scale);

/// What a model's attention adds to its scores, as a call's arguments give it (the one
/// parser of them): scale (None: 1/sqrt(head_dim)), softcap (None or a positive finite
/// float), window (None or an int >= 1; a null `window` where the call sees every token)
/// and sinks (None or finite float32 [heads_q], held in `sinks_keep` while the rules point
/// at it). Errors name the argument.
ScoreRules score_rules(const Arg<std::optional<double>>& scale,
                       const Arg<std::optional<double>>& softcap,
                       const Arg<std::optional<std::int64_t>>* window, const py::object& sinks,
                       std::int64_t heads_q, std::optional<py::array_t<float>>& sinks_keep);

/// The items of a batched call's `objects` argument, one per batch row (`batch`, read from
/// the argument `batch_from`): ValueError for another count, TypeError naming the argument
/// (and the item) unless a sequence of `T` (bound as `type_name`). `keep` holds the items
/// while the GIL is released.
template <class T>
std::vector<T*> batch_objects(const py::object& objects, const char* name, const char* type_name,
                              std::int64_t batch, const char* batch_from,
                              std::vector<py::object>& keep) {
  KVPACK_TYPE_CHECK(
      py::isinstance<py::sequence>(objects) && !py::isinstance<py::str>(objects),
      name << ": expected a sequence of " << type_name << ", got " << python_type(objects));
  const auto items = py::reinterpret_borrow<py::sequence>(objects);
  KVPACK_ARG_CHECK(static_cast<std::int64_t>(items.size()) == batch,
                   name << ": expected one per batch row of " << batch_from << " (" << batch
                        << "), got " << items.size());
  std::vector<T*> out;
  for (std::size_t b = 0; b < items.size(); ++b) {
    keep.push_back(items[b]);
    KVPACK_TYPE_CHECK(py::isinstance<T>(keep.back()), name << "[" << b << "]: expected a "
                                                           << type_name << ", got "
                                                           << python_type(keep.back()));
    out.push_back(&keep.back().cast<T&>());
  }
  return out;
}

/// One validated decode step of a decode-time cache (RecallCache, EvictionCache): q and the
/// new token checked, the GIL released around cache.step, the output checked for NaN/Inf.
template <class Cache>
py::array_t<float> decode_step(Cache& cache, bool prefilled, const py::object& q_obj,
                               const py::object& key_obj, const py::object& value_obj) {
  KVPACK_ARG_CHECK(prefilled, "step: call prefill(keys, values) first");
  const py::array_t<float> q = finite_float32(as_array(q_obj, "q"), "q", 2, "[heads_q, head_dim]");
  check_query(q, cache.heads(), cache.dim());
  const NewToken token = new_token(key_obj, value_obj, cache.heads(), cache.dim(), cache.dtype());
  py::array_t<float> out = owned_float_array({q.shape(0), cache.dim()});
  {
    py::gil_scoped_release release;
    cache.step(q.data(), q.shape(0), token.key, token.value, out.mutable_data());
  }
  if (!all_finite(out.data(), out.size()))
    raise_non_finite({{"keys", cache.keys()}, {"values", cache.values()}});
  return out;
}

}  // namespace kvpack::bindings
