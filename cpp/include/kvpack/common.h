// Types and checks shared by every kvpack capability: the storage dtypes, the
// non-owning views through which KV data crosses every interface, and the
// argument-check macro whose message names the argument, expected and actual value.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kvpack {

/// Storage dtype of KV data. Arithmetic is always float32.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

/// Bytes per element of `dtype`.
inline std::size_t dtype_size(DType dtype) {
  return dtype == DType::Float32 ? 4 : 2;
}

/// The token count a budget given as a `share` of `tokens` stands for: rounded half away
/// from zero, at least 1, at most `tokens`. Every method, codec and facade converts
/// shares here, so one share means one count everywhere.
inline std::int64_t budget_tokens(double share, std::int64_t tokens) {
  const auto count = static_cast<std::int64_t>(std::llround(share * static_cast<double>(tokens)));
  return std::clamp<std::int64_t>(count, 1, std::max<std::int64_t>(1, tokens));
}

/// out = the product of `factors`; false when it does not fit in size_t (sizes read from
/// untrusted bytes are multiplied here before anything is allocated from them).
inline bool checked_product(std::initializer_list<std::size_t> factors, std::size_t& out) {
  out = 1;
  for (const std::size_t f : factors)
    if (__builtin_mul_overflow(out, f, &out)) return false;
  return true;
}

/// Lower-case name of `dtype`, as NumPy spells it.
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return "float32";
    case DType::Float16:
      return "float16";
    case DType::BFloat16:
      return "bfloat16";
  }
  return "unknown";
}

/// Where memory lives: host memory, or the memory of one CUDA device.
enum class DeviceType : int { CPU = 0, CUDA = 1 };

/// A device: host memory (the default) or CUDA device `index`.
struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;  ///< the CUDA device ordinal; 0 on the CPU

  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& other) const {
    return type == other.type && (type == DeviceType::CPU || index == other.index);
  }
  bool operator!=(const Device& other) const { return !(*this == other); }
};

/// "cpu" or "cuda:<index>".
inline std::string device_name(const Device& device) {
  return device.is_cuda() ? "cuda:" + std::to_string(device.index) : "cpu";
}

/// Non-owning view of one layer's keys or values: [heads, tokens, dim] elements of
/// `dtype` at `data`, rows contiguous; heads are head_stride elements apart
/// (0: tokens * dim, the C-contiguous layout), so a growing cache can keep spare room.
struct KVView {
  const void* data = nullptr;  ///< size heads * stride() elements
  DType dtype = DType::Float32;
  std::int64_t heads = 0;
  std::int64_t tokens = 0;
  std::int64_t dim = 0;
  std::int64_t head_stride = 0;
  Device device{};  ///< where `data` lives

  /// Elements from one head to the next.
  std::int64_t stride() const { return head_stride ? head_stride : tokens * dim; }

  /// Address of row (head, token).
  const void* row(std::int64_t head, std::int64_t token) const {
    return static_cast<const char*>(data) +
           static_cast<std::size_t>(head * stride() + token * dim) * dtype_size(dtype);
  }
};

/// Non-owning view of a batch's keys or values: [batch, heads, tokens, dim] elements of
/// `dtype` at `data`, with the strides (in elements) of the first three axes; each row of
/// dim elements is contiguous. Token-major layouts (a transposed [batch, tokens, heads,
/// dim] buffer) and slices of buffers with spare room are read in place.
struct BatchKVView {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  std::int64_t batch = 0;
  std::int64_t heads = 0;
  std::int64_t tokens = 0;
  std::int64_t dim = 0;
  std::int64_t batch_stride = 0;
  std::int64_t head_stride = 0;
  std::int64_t token_stride = 0;
  Device device{};  ///< where `data` lives

  /// Tokens [first, first + n) of batch row b as a [heads, n, dim] view; n > 1 needs
  /// token_stride == dim (each head's rows contiguous).
  KVView row(std::int64_t b, std::int64_t first, std::int64_t n) const {
    const std::int64_t offset = b * batch_stride + first * token_stride;
    return KVView{
        static_cast<const char*>(data) + static_cast<std::size_t>(offset) * dtype_size(dtype),
        dtype,
        heads,
        n,
        dim,
        heads > 1 ? head_stride : 0,
        device};
  }
};

/// Non-owning view of token index sets: C-contiguous int32 [rows, count], each row
/// sorted ascending without duplicates. rows is heads_kv (one set shared by a GQA
/// group) or heads_q (one set per query head).
struct IndexView {
  const std::int32_t* data = nullptr;  ///< size rows * count
  std::int64_t rows = 0;
  std::int64_t count = 0;
  Device device{};  ///< where `data` lives
};

namespace detail {
[[noreturn]] inline void throw_invalid(const char* file, int line, const std::string& msg) {
  std::ostringstream os;
  os << msg << " [" << file << ":" << line << "]";
  throw std::invalid_argument(os.str());
}
}  // namespace detail

}  // namespace kvpack

/// Throws std::invalid_argument (ValueError in Python) with `message` (a stream
/// expression) and the source location when `condition` does not hold.
#define KVPACK_CHECK(condition, message)                                           \
  do {                                                                             \
    if (!(condition)) {                                                            \
      std::ostringstream kvpack_check_os_;                                         \
      kvpack_check_os_ << message;                                                 \
      ::kvpack::detail::throw_invalid(__FILE__, __LINE__, kvpack_check_os_.str()); \
    }                                                                              \
  } while (0)
