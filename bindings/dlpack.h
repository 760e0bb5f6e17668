// The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared from its
// specification: what the capsule of a `__dlpack__` call points to. The bindings read
// it to take torch (and any other producer's) tensors without a copy.
#pragma once

#include <cstdint>

namespace kvpack::bindings::dlpack {

/// DLDeviceType values kvpack names.
enum DeviceType : std::int32_t {
  kCPU = 1,
  kCUDA = 2,
  kCUDAHost = 3,  ///< pinned host memory, readable by the CPU
  kROCM = 10,
  kCUDAManaged = 13,
};

/// DLDataTypeCode values kvpack reads.
enum TypeCode : std::uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };

struct Device {
  std::int32_t device_type;
  std::int32_t device_id;
};

struct DataType {
  std::uint8_t code;
  std::uint8_t bits;
  std::uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;    ///< size ndim
  std::int64_t* strides;  ///< size ndim, in elements; null for C-contiguous
  std::uint64_t byte_offset;
};

/// The capsule "dltensor" (DLPack before 1.0).
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

struct Version {
  std::uint32_t major;
  std::uint32_t minor;
};

/// The capsule "dltensor_versioned" (DLPack 1.0 and later).
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  std::uint64_t flags;
  Tensor dl_tensor;
};

constexpr std::uint64_t kFlagReadOnly = 1;  ///< DLPACK_FLAG_BITMASK_READ_ONLY

}  // namespace kvpack::bindings::dlpack
