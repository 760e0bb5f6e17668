#include "arrays.h"

#include <cstring>

#include "kvpack/backend.h"
#include "kvpack/convert.h"

namespace kvpack::bindings {

namespace {
constexpr int kNpyFloat = 11;  // NPY_FLOAT
constexpr int kNpyHalf = 23;   // NPY_HALF

std::string device_string(std::int32_t type, std::int32_t id) {
  std::ostringstream os;
  switch (type) {
    case dlpack::kCPU:
      os << "cpu";
      break;
    case dlpack::kCUDA:
      os << "cuda:" << id;
      break;
    case dlpack::kCUDAHost:
      os << "cuda pinned host memory";
      break;
    case dlpack::kCUDAManaged:
      os << "cuda managed memory (device " << id << ")";
      break;
    case dlpack::kROCM:
      os << "rocm:" << id;
      break;
    default:
      os << "DLPack device type " << type << " (id " << id << ")";
  }
  return os.str();
}

// The NumPy dtype of a DLPack element type; TypeError for one NumPy cannot view.
py::dtype numpy_dtype_of(const dlpack::DataType& type, const char* name) {
  const unsigned bits = type.bits;
  if (type.lanes == 1) {
    switch (type.code) {
      case dlpack::kFloat:
        if (bits == 16 || bits == 32 || bits == 64)
          return py::dtype("float" + std::to_string(bits));
        break;
      case dlpack::kBfloat:
        if (bits == 16) return numpy_dtype(DType::BFloat16);
        break;
      case dlpack::kInt:
      case dlpack::kUInt:
        if (bits == 8 || bits == 16 || bits == 32 || bits == 64)
          return py::dtype((type.code == dlpack::kInt ? "int" : "uint") + std::to_string(bits));
        break;
      case dlpack::kBool:
        if (bits == 8) return py::dtype("bool");
        break;
      default:
        break;
    }
  }
  KVPACK_TYPE_CHECK(false, name << ": unsupported DLPack dtype (type code " << unsigned{type.code}
                                << ", " << bits << " bits, " << type.lanes << " lanes)");
}

// A NumPy view of a host DLPack tensor; `owner` keeps the producer's memory alive for as
// long as any view of it lives.
py::array host_view(const dlpack::Tensor& t, const py::capsule& owner, bool read_only,
                    const char* name) {
  const py::dtype dtype = numpy_dtype_of(t.dtype, name);
  const auto item = static_cast<py::ssize_t>(dtype.itemsize());
  std::vector<py::ssize_t> shape(static_cast<std::size_t>(t.ndim)), strides(shape.size());
  py::ssize_t contiguous = item;
  for (std::int32_t i = t.ndim - 1; i >= 0; --i) {
    shape[i] = static_cast<py::ssize_t>(t.shape[i]);
    strides[i] = t.strides ? static_cast<py::ssize_t>(t.strides[i]) * item : contiguous;
    contiguous *= shape[i];
  }
  void* data = static_cast<char*>(t.data) + t.byte_offset;
  py::array array(dtype, shape, strides, data, owner);
  if (read_only)
    py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return array;
}

// Takes over the managed tensor of a `__dlpack__` capsule: renamed so that the producer's
// capsule no longer frees it, owned by the returned capsule, which calls its deleter.
template <class Managed>
py::capsule adopt_managed(PyObject* capsule, const char* name, const char* used_name) {
  auto* managed = static_cast<Managed*>(PyCapsule_GetPointer(capsule, name));
  PyCapsule_SetName(capsule, used_name);
  return py::capsule(managed, [](void* p) {
    auto* m = static_cast<Managed*>(p);
    if (m->deleter) m->deleter(m);
  });
}
}  // namespace

DLPackTensor dlpack_tensor(const py::object& object, const char* name,
                           std::optional<std::int64_t> stream) {
  const py::object stream_arg = stream ? py::object(py::int_(*stream)) : py::object(py::none());
  py::object capsule;
  try {
    capsule = object.attr("__dlpack__")(py::arg("stream") = stream_arg,
                                        py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {  // a producer that predates DLPack 1.0
    if (!e.matches(PyExc_TypeError)) throw;
    capsule = stream ? object.attr("__dlpack__")(py::arg("stream") = stream_arg)
                     : object.attr("__dlpack__")();
  }
  PyObject* raw = capsule.ptr();
  DLPackTensor result;
  if (PyCapsule_IsValid(raw, "dltensor_versioned")) {
    const auto* managed = static_cast<const dlpack::ManagedTensorVersioned*>(
        PyCapsule_GetPointer(raw, "dltensor_versioned"));
    KVPACK_TYPE_CHECK(managed->version.major == 1, name << ": unsupported DLPack version "
                                                        << managed->version.major << "."
                                                        << managed->version.minor);
    result.tensor = managed->dl_tensor;
    result.read_only = managed->flags & dlpack::kFlagReadOnly;
    result.owner = adopt_managed<dlpack::ManagedTensorVersioned>(raw, "dltensor_versioned",
                                                                 "used_dltensor_versioned");
    return result;
  }
  KVPACK_TYPE_CHECK(PyCapsule_IsValid(raw, "dltensor"),
                    name << ": __dlpack__ returned no DLPack capsule");
  result.tensor =
      static_cast<const dlpack::ManagedTensor*>(PyCapsule_GetPointer(raw, "dltensor"))->dl_tensor;
  result.owner = adopt_managed<dlpack::ManagedTensor>(raw, "dltensor", "used_dltensor");
  return result;
}

std::pair<std::int32_t, std::int32_t> dlpack_device(const py::object& object) {
  if (py::isinstance<py::array>(object) || !py::hasattr(object, "__dlpack__") ||
      !py::hasattr(object, "__dlpack_device__"))
    return {dlpack::kCPU, 0};
  return object.attr("__dlpack_device__")().cast<std::pair<std::int32_t, std::int32_t>>();
}

py::array as_array(const py::object& object, const char* name) {
  if (py::isinstance<py::array>(object)) return py::reinterpret_borrow<py::array>(object);
  KVPACK_TYPE_CHECK(!object.is_none(), name << ": expected an array, got None");
  const auto [device_type, device_id] = dlpack_device(object);
  KVPACK_ARG_CHECK(device_type == dlpack::kCPU || device_type == dlpack::kCUDAHost,
                   name << ": expected an array in host memory, got a tensor on "
                        << device_string(device_type, device_id)
                        << " (this operation runs on the CPU only; pass " << name << ".cpu())");
  if (py::hasattr(object, "__dlpack__") && py::hasattr(object, "__dlpack_device__")) {
    const DLPackTensor t = dlpack_tensor(object, name);
    return host_view(t.tensor, t.owner, t.read_only, name);
  }
  try {
    return py::module_::import("numpy").attr("asarray")(object);
  } catch (py::error_already_set&) {
    KVPACK_TYPE_CHECK(false,
                      name << ": expected an array, got "
                           << py::str(py::type::of(object).attr("__name__")).cast<std::string>());
  }
}

std::string shape_string(const py::array& array) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < array.ndim(); ++i) os << (i ? ", " : "") << array.shape(i);
  os << (array.ndim() == 1 ? ",)" : ")");
  return os.str();
}

std::string dtype_string(const py::array& array) {
  return py::str(array.dtype()).cast<std::string>();
}

// Arrays cross into the core without a copy, so their bytes must be in this machine's order:
// a big-endian float32 has the same type number as a native one.
void require_native(const py::array& array, const char* name) {
  KVPACK_ARG_CHECK(array.dtype().attr("isnative").cast<bool>(),
                   name << ": expected native byte order, got dtype " << dtype_string(array)
                        << "; pass " << name << ".astype(" << name << ".dtype.newbyteorder('='))");
}

DType kv_dtype(const py::array& array, const char* name) {
  require_native(array, name);
  const int num = array.dtype().num();
  if (num == kNpyFloat) return DType::Float32;
  if (num == kNpyHalf) return DType::Float16;
  if (dtype_string(array) == "bfloat16" && array.itemsize() == 2) return DType::BFloat16;
  KVPACK_TYPE_CHECK(
      false, name << ": expected dtype float32, float16 or bfloat16, got " << dtype_string(array));
}

py::dtype numpy_dtype(DType dtype) {
  if (dtype == DType::BFloat16)
    return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  return py::dtype(dtype == DType::Float16 ? "float16" : "float32");
}

void require_layout(const py::array& array, const char* name, int ndim, const char* layout) {
  KVPACK_ARG_CHECK(array.ndim() == ndim, name << ": expected " << ndim << " dimensions " << layout
                                              << ", got shape " << shape_string(array));
  KVPACK_ARG_CHECK(array.flags() & py::array::c_style,
                   name << ": expected a C-contiguous array, got strides that are not; "
                           "pass numpy.ascontiguousarray("
                        << name << ")");
}

KVView kv_view(const py::array& array, const char* name) {
  KVView view;
  view.dtype = kv_dtype(array, name);
  require_layout(array, name, 3, "[heads_kv, tokens, head_dim]");
  view.heads = array.shape(0);
  view.tokens = array.shape(1);
  view.dim = array.shape(2);
  KVPACK_ARG_CHECK(view.heads > 0 && view.tokens > 0 && view.dim > 0,
                   name << ": expected a non-empty cache, got shape " << shape_string(array));
  view.data = array.data();
  return view;
}

namespace {

// The KV dtype of a native-order array of `ndim` dimensions `layout`, strides unchecked.
DType strided_kv_dtype(const py::array& array, const char* name, int ndim, const char* layout) {
  const DType dtype = kv_dtype(array, name);
  require_native(array, name);
  KVPACK_ARG_CHECK(array.ndim() == ndim, name << ": expected " << ndim << " dimensions " << layout
                                              << ", got shape " << shape_string(array));
  return dtype;
}

}  // namespace

KVView strided_kv_view(const py::array& array, const char* name) {
  KVView view;
  view.dtype = strided_kv_dtype(array, name, 3, "[heads_kv, tokens, head_dim]");
  view.heads = array.shape(0);
  view.tokens = array.shape(1);
  view.dim = array.shape(2);
  KVPACK_ARG_CHECK(view.heads > 0 && view.dim > 0,
                   name << ": expected heads and head_dim, got shape " << shape_string(array));
  const auto item = static_cast<py::ssize_t>(dtype_size(view.dtype));
  const py::ssize_t head_stride = array.strides(0);
  const bool rows_contiguous = (view.dim == 1 || array.strides(2) == item) &&
                               (view.tokens <= 1 || array.strides(1) == view.dim * item);
  KVPACK_ARG_CHECK(rows_contiguous && head_stride % item == 0 &&
                       (view.heads == 1 || head_stride >= view.tokens * view.dim * item),
                   name << ": expected each head's [tokens, head_dim] rows to be contiguous, got "
                           "strides that are not; pass numpy.ascontiguousarray("
                        << name << ")");
  view.head_stride = view.heads == 1 ? 0 : head_stride / item;
  view.data = array.data();
  return view;
}

BatchKVView batch_kv_view(py::array& array, const char* name, bool heads_contiguous) {
  BatchKVView view;
  view.dtype = strided_kv_dtype(array, name, 4, "[batch, heads_kv, tokens, head_dim]");
  const auto item = static_cast<py::ssize_t>(dtype_size(view.dtype));
  const auto in_place = [&](const py::array& a) {
    for (int axis = 0; axis < 4; ++axis)
      if (a.shape(axis) > 1 && (a.strides(axis) <= 0 || a.strides(axis) % item != 0)) return false;
    if (a.shape(3) > 1 && a.strides(3) != item) return false;
    return !heads_contiguous || a.shape(2) <= 1 || a.strides(2) == a.shape(3) * item;
  };
  if (!in_place(array)) array = py::module_::import("numpy").attr("ascontiguousarray")(array);
  view.batch = array.shape(0);
  view.heads = array.shape(1);
  view.tokens = array.shape(2);
  view.dim = array.shape(3);
  KVPACK_ARG_CHECK(view.heads > 0 && view.dim > 0,
                   name << ": expected heads and head_dim, got shape " << shape_string(array));
  // A stride along an axis of one element is never used: NumPy may give it any value.
  const auto stride = [&](int axis) {
    return array.shape(axis) > 1 ? array.strides(axis) / item : 0;
  };
  view.batch_stride = stride(0);
  view.head_stride = stride(1);
  view.token_stride = array.shape(2) > 1 ? stride(2) : view.dim;
  view.data = array.data();
  return view;
}

BatchStep batch_step(const py::object& queries, const py::object& keys, const py::object& values,
                     const char* keys_name, const char* values_name, bool heads_contiguous) {
  BatchStep step;
  step.queries =
      finite_float32(as_array(queries, "queries"), "queries", 4, "[batch, new, heads_q, head_dim]");
  step.keys_array = as_array(keys, keys_name);
  step.values_array = as_array(values, values_name);
  step.keys = batch_kv_view(step.keys_array, keys_name, heads_contiguous);
  step.values = batch_kv_view(step.values_array, values_name, heads_contiguous);
  const BatchKVView &k = step.keys, &v = step.values;
  KVPACK_ARG_CHECK(
      v.batch == k.batch && v.heads == k.heads && v.tokens == k.tokens && v.dim == k.dim,
      values_name << ": expected shape " << shape_string(step.keys_array) << " like " << keys_name
                  << ", got " << shape_string(step.values_array));
  KVPACK_TYPE_CHECK(v.dtype == k.dtype, values_name << ": expected dtype " << dtype_name(k.dtype)
                                                    << " like " << keys_name << ", got "
                                                    << dtype_name(v.dtype));
  step.batch = step.queries.shape(0);
  step.fresh = step.queries.shape(1);
  step.heads_q = step.queries.shape(2);
  KVPACK_ARG_CHECK(k.batch == step.batch && k.dim == step.queries.shape(3),
                   keys_name << ": expected shape (" << step.batch << ", heads_kv, tokens, "
                             << step.queries.shape(3)
                             << ") to match queries [batch, new, heads_q, head_dim] of shape "
                             << shape_string(step.queries) << ", got "
                             << shape_string(step.keys_array));
  KVPACK_ARG_CHECK(step.heads_q > 0 && step.heads_q % k.heads == 0,
                   "queries: expected heads_q to be a positive multiple of heads_kv="
                       << k.heads << ", got shape " << shape_string(step.queries));
  return step;
}

std::pair<KVView, KVView> kv_pair(const py::array& keys, const py::array& values) {
  const KVView k = kv_view(keys, "keys"), v = kv_view(values, "values");
  KVPACK_ARG_CHECK(v.heads == k.heads && v.tokens == k.tokens && v.dim == k.dim,
                   "values: expected shape " << shape_string(keys) << " like keys, got "
                                             << shape_string(values));
  KVPACK_TYPE_CHECK(v.dtype == k.dtype, "values: expected dtype " << dtype_name(k.dtype)
                                                                  << " like keys, got "
                                                                  << dtype_name(v.dtype));
  return {k, v};
}

py::array contiguous_token(const py::object& object, const char* name) {
  const py::array a = as_array(object, name);
  if (a.flags() & py::array::c_style) return a;
  return py::module_::import("numpy").attr("ascontiguousarray")(a);
}

KVView token_view(const py::array& a, const char* name) {
  if (a.ndim() == 2) {
    require_layout(a, name, 2, "[heads_kv, head_dim]");
    KVView v{a.data(), kv_dtype(a, name), a.shape(0), 1, a.shape(1)};
    KVPACK_ARG_CHECK(v.heads > 0 && v.dim > 0,
                     name << ": expected a non-empty array, got shape " << shape_string(a));
    return v;
  }
  return kv_view(a, name);
}

NewToken new_token(const py::object& key, const py::object& value, std::int64_t heads,
                   std::int64_t dim, DType dtype) {
  NewToken t;
  t.key_array = contiguous_token(key, "new_key");
  t.value_array = contiguous_token(value, "new_value");
  t.key = token_view(t.key_array, "new_key");
  t.value = token_view(t.value_array, "new_value");
  KVPACK_ARG_CHECK(t.key.heads == heads && t.key.tokens == 1 && t.key.dim == dim,
                   "new_key: expected shape (" << heads << ", " << dim << "), got "
                                               << shape_string(t.key_array));
  KVPACK_ARG_CHECK(t.value.heads == heads && t.value.tokens == 1 && t.value.dim == dim,
                   "new_value: expected shape (" << heads << ", " << dim << "), got "
                                                 << shape_string(t.value_array));
  KVPACK_TYPE_CHECK(
      t.key.dtype == dtype && t.value.dtype == dtype,
      "new_key/new_value: expected dtype " << dtype_name(dtype) << " like the prefill");
  require_finite(t.key, "new_key");
  require_finite(t.value, "new_value");
  return t;
}

void check_query(const py::array_t<float>& q, std::int64_t heads_kv, std::int64_t dim) {
  KVPACK_ARG_CHECK(q.shape(1) == dim,
                   "q: expected head_dim " << dim << ", got shape " << shape_string(q));
  KVPACK_ARG_CHECK(q.shape(0) > 0 && q.shape(0) % heads_kv == 0,
                   "q: expected heads_q to be a positive multiple of heads_kv="
                       << heads_kv << ", got shape " << shape_string(q));
}

bool all_finite(const float* data, std::int64_t n) {
  bool finite = true;
  for (std::int64_t i = 0; i < n; ++i) finite &= std::isfinite(data[i]);
  return finite;
}

py::array_t<float> finite_float32(const py::array& array, const char* name, int ndim,
                                  const char* layout) {
  const char kind = array.dtype().kind();
  KVPACK_TYPE_CHECK(kind == 'f' || dtype_string(array) == "bfloat16",
                    name << ": expected a floating-point array, got dtype " << dtype_string(array));
  require_layout(array, name, ndim, layout);
  py::array_t<float> result;
  if (array.dtype().num() == kNpyFloat && array.dtype().attr("isnative").cast<bool>()) {
    result = py::reinterpret_borrow<py::array_t<float>>(array);
  } else {
    result = py::array_t<float>::ensure(array.attr("astype")("float32"));
  }
  KVPACK_ARG_CHECK(all_finite(result.data(), result.size()), name << ": contains NaN or Inf");
  return result;
}

IndexView index_view(const py::array& array, const char* name, std::int64_t tokens) {
  KVPACK_TYPE_CHECK(array.dtype().kind() == 'i' && array.itemsize() == 4,
                    name << ": expected dtype int32, got " << dtype_string(array));
  require_native(array, name);
  require_layout(array, name, 2, "[heads, n]");
  IndexView view{static_cast<const std::int32_t*>(array.data()), array.shape(0), array.shape(1)};
  KVPACK_ARG_CHECK(view.count > 0, name << ": expected at least one index per row, got shape "
                                        << shape_string(array));
  for (std::int64_t r = 0; r < view.rows; ++r) {
    const std::int32_t* row = view.data + r * view.count;
    for (std::int64_t i = 0; i < view.count; ++i) {
      KVPACK_ARG_CHECK(row[i] >= 0 && row[i] < tokens, name << "[" << r << ", " << i
                                                            << "]: expected a token index in [0, "
                                                            << tokens << "), got " << row[i]);
      KVPACK_ARG_CHECK(i == 0 || row[i] > row[i - 1],
                       name << "[" << r
                            << "]: expected indices sorted ascending without duplicates, got "
                            << row[i - 1] << " before " << row[i] << " at position " << i);
    }
  }
  return view;
}

py::array_t<float> owned_float_array(const std::vector<py::ssize_t>& shape) {
  std::size_t n = 1;
  for (py::ssize_t s : shape) n *= static_cast<std::size_t>(s);
  float* data = new float[n == 0 ? 1 : n];
  py::capsule owner(data, [](void* p) { delete[] static_cast<float*>(p); });
  return py::array_t<float>(shape, data, owner);
}

void require_finite(const KVView& view, const char* name) {
  std::int64_t row;
  {
    py::gil_scoped_release release;
    row = first_non_finite_row(view);
  }
  KVPACK_ARG_CHECK(row < 0, name << ": contains NaN or Inf (first in row [" << row / view.tokens
                                 << ", " << row % view.tokens << "])");
}

void raise_non_finite(const std::vector<std::pair<const char*, KVView>>& arrays,
                      const char* otherwise) {
  for (const auto& [name, view] : arrays) {
    const std::int64_t r = first_non_finite_row(view);
    if (r < 0) continue;
    std::vector<float> row(static_cast<std::size_t>(view.dim));
    to_float(view.row(r / view.tokens, r % view.tokens), view.dtype, view.dim, row.data());
    std::int64_t i = 0;
    while (i < view.dim && std::isfinite(row[i])) ++i;
    KVPACK_ARG_CHECK(false, name << ": contains NaN or Inf (first at [" << r / view.tokens << ", "
                                 << r % view.tokens << ", " << i << "])");
  }
  KVPACK_ARG_CHECK(false, otherwise);
}

Execution parse_device(const std::string& device) {
  Execution exec;
  if (device == "cpu") return exec;
  const bool cuda = device.rfind("cuda", 0) == 0;
  int index = 0;
  std::size_t used = 0;
  if (cuda && device.size() > 5 && device[4] == ':') {
    try {
      index = std::stoi(device.substr(5), &used);
    } catch (const std::exception&) {
      used = 0;
    }
  }
  KVPACK_ARG_CHECK(cuda && (device.size() == 4 || (used > 0 && 5 + used == device.size())),
                   "device: expected 'cpu' or 'cuda', got '" << device << "'");
  exec.stage_to_cuda = true;
  exec.cuda_device = index;
  return exec;
}

Device device_of(const py::object& object, const char* name) {
  const auto [type, id] = dlpack_device(object);
  if (type == dlpack::kCPU || type == dlpack::kCUDAHost) return Device{};
  KVPACK_ARG_CHECK(type == dlpack::kCUDA, name << ": expected an array in host or CUDA memory, "
                                                  "got a tensor on "
                                               << device_string(type, id));
  return Device{DeviceType::CUDA, id};
}

CudaCall::CudaCall(const Device& on, const char* name) : device(on) {
  require_device(device, name);
  torch = py::module_::import("torch");
  const py::object stream = torch.attr("cuda").attr("current_stream")(device.index);
  exec.stream = reinterpret_cast<void*>(stream.attr("cuda_stream").cast<std::uintptr_t>());
}

DLPackTensor CudaCall::take(const py::object& object, const char* name) const {
  KVPACK_TYPE_CHECK(!object.is_none(), name << ": expected a tensor, got None");
  const Device where = device_of(object, name);
  KVPACK_ARG_CHECK(where == device, name << ": expected a tensor on " << device_name(device)
                                         << " like keys, got one on " << device_name(where));
  // DLPack's stream argument: the producer orders its pending work before our stream.
  const auto stream = reinterpret_cast<std::uintptr_t>(exec.stream);
  return dlpack_tensor(object, name, stream ? static_cast<std::int64_t>(stream) : 1);
}

namespace {
// Checks a device tensor's rank and C-contiguity; returns its shape.
std::vector<std::int64_t> contiguous_shape(const dlpack::Tensor& t, const char* name, int ndim,
                                           const char* layout) {
  std::vector<std::int64_t> shape(t.shape, t.shape + t.ndim);
  std::ostringstream shown;
  shown << "(";
  for (std::size_t i = 0; i < shape.size(); ++i) shown << (i ? ", " : "") << shape[i];
  shown << ")";
  KVPACK_ARG_CHECK(t.ndim == ndim, name << ": expected " << ndim << " dimensions " << layout
                                        << ", got shape " << shown.str());
  std::int64_t expected = 1;
  bool contiguous = true;
  for (int i = ndim - 1; i >= 0; --i) {
    if (t.strides && shape[i] > 1 && t.strides[i] != expected) contiguous = false;
    expected *= shape[i];
  }
  KVPACK_ARG_CHECK(contiguous, name << ": expected a C-contiguous tensor, got strides that are "
                                       "not; pass "
                                    << name << ".contiguous()");
  for (std::int64_t s : shape)
    KVPACK_ARG_CHECK(s > 0, name << ": expected a non-empty tensor, got shape " << shown.str());
  return shape;
}
}  // namespace

KVView CudaCall::kv_view(const py::object& object, const char* name, DLPackTensor& keep) const {
  keep = take(object, name);
  const dlpack::Tensor& t = keep.tensor;
  const auto shape = contiguous_shape(t, name, 3, "[heads_kv, tokens, head_dim]");
  KVView view;
  const auto code = t.dtype.code;
  const unsigned bits = t.dtype.bits;
  KVPACK_TYPE_CHECK(t.dtype.lanes == 1 && ((code == dlpack::kFloat && (bits == 32 || bits == 16)) ||
                                           (code == dlpack::kBfloat && bits == 16)),
                    name << ": expected dtype float32, float16 or bfloat16");
  view.dtype = code == dlpack::kBfloat ? DType::BFloat16
               : bits == 32            ? DType::Float32
                                       : DType::Float16;
  view.heads = shape[0];
  view.tokens = shape[1];
  view.dim = shape[2];
  view.data = static_cast<const char*>(t.data) + t.byte_offset;
  view.device = device;
  return view;
}

const float* CudaCall::float32(const py::object& object, const char* name, int ndim,
                               std::vector<std::int64_t>& shape, DLPackTensor& keep) const {
  keep = take(object, name);
  const dlpack::Tensor& t = keep.tensor;
  KVPACK_TYPE_CHECK(t.dtype.lanes == 1 && t.dtype.code == dlpack::kFloat && t.dtype.bits == 32,
                    name << ": expected a float32 tensor on " << device_name(device) << "; pass "
                         << name << ".float()");
  shape = contiguous_shape(t, name, ndim, "");
  return reinterpret_cast<const float*>(static_cast<const char*>(t.data) + t.byte_offset);
}

py::object CudaCall::empty(const std::vector<std::int64_t>& shape) const {
  return torch.attr("empty")(py::cast(shape), py::arg("dtype") = torch.attr("float32"),
                             py::arg("device") = device_name(device));
}

float* CudaCall::data(const py::object& tensor) {
  return reinterpret_cast<float*>(tensor.attr("data_ptr")().cast<std::uintptr_t>());
}

float resolve_scale_arg(const std::optional<double>& scale) {
  if (!scale) return 0.0f;
  // 0 means "the default 1/sqrt(head_dim)" to the core: a scale that rounds to 0 (or to
  // infinity) in float32 must not silently become it.
  const float as_float = static_cast<float>(*scale);
  KVPACK_ARG_CHECK(
      std::isfinite(*scale) && *scale > 0.0 && as_float > 0.0f && std::isfinite(as_float),
      "scale: expected a positive number representable in float32 or None, got " << *scale);
  return as_float;
}

ScoreRules score_rules(const Arg<std::optional<double>>& scale,
                       const Arg<std::optional<double>>& softcap,
                       const Arg<std::optional<std::int64_t>>* window, const py::object& sinks,
                       std::int64_t heads_q, std::optional<py::array_t<float>>& sinks_keep) {
  ScoreRules rules;
  rules.scale = resolve_scale_arg(scale.as("scale"));
  const auto cap = softcap.as("softcap");
  KVPACK_ARG_CHECK(!cap || (std::isfinite(*cap) && *cap > 0.0),
                   "softcap: expected a positive finite float or None, got " << *cap);
  rules.softcap = cap ? static_cast<float>(*cap) : 0.0f;
  if (window) {
    const auto w = window->as("window");
    KVPACK_ARG_CHECK(!w || *w >= 1, "window: expected an int >= 1 or None, got " << *w);
    rules.window = w ? *w : 0;
  }
  if (!sinks.is_none()) {
    sinks_keep = finite_float32(as_array(sinks, "sinks"), "sinks", 1, "[heads_q]");
    KVPACK_ARG_CHECK(sinks_keep->shape(0) == heads_q, "sinks: expected shape ("
                                                          << heads_q << ",), got "
                                                          << shape_string(*sinks_keep));
    rules.sinks = sinks_keep->data();
  }
  return rules;
}

}  // namespace kvpack::bindings
