// Owning device allocation with host transfers, the current-device guard, and the CUDA
// error check that turns every failed runtime call into an exception naming the call.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

#include "kvpack/common.h"

#define KVPACK_CUDA_CHECK(call)                                                             \
  do {                                                                                      \
    const cudaError_t kvpack_status_ = (call);                                              \
    if (kvpack_status_ != cudaSuccess)                                                      \
      throw std::runtime_error(std::string("CUDA error in ") + #call + ": " +               \
                               cudaGetErrorString(kvpack_status_) + " [" + __FILE__ + ":" + \
                               std::to_string(__LINE__) + "]");                             \
  } while (0)

namespace kvpack::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : size_(bytes) {
    if (bytes) KVPACK_CUDA_CHECK(cudaMalloc(&data_, bytes));
  }
  /// Allocates `bytes` and copies them from host memory at `host`.
  DeviceBuffer(const void* host, std::size_t bytes) : DeviceBuffer(bytes) {
    if (bytes) KVPACK_CUDA_CHECK(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice));
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }

  void* data() const { return data_; }
  std::size_t size() const { return size_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  /// Copies the whole buffer to host memory at `host`.
  void copy_to_host(void* host) const {
    if (size_) KVPACK_CUDA_CHECK(cudaMemcpy(host, data_, size_, cudaMemcpyDeviceToHost));
  }
  /// Copies `bytes` to host memory at `host`, in order on `stream` (host waits).
  void copy_to_host(void* host, std::size_t bytes, cudaStream_t stream) const {
    if (!bytes) return;
    KVPACK_CUDA_CHECK(cudaMemcpyAsync(host, data_, bytes, cudaMemcpyDeviceToHost, stream));
    KVPACK_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Makes `device` current for its lifetime, then restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    KVPACK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) KVPACK_CUDA_CHECK(cudaSetDevice(device));
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

/// The caller's scratch (std::invalid_argument when it is smaller than `bytes`), or a
/// buffer of our own when the caller gave none.
class Scratch {
 public:
  Scratch(void* given, std::size_t given_bytes, std::size_t bytes)
      : own_(given ? 0 : bytes), data_(given ? given : own_.data()) {
    KVPACK_CHECK(!given || given_bytes >= bytes,
                 "scratch: expected at least " << bytes << " bytes, got " << given_bytes);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  DeviceBuffer own_;
  void* data_;
};

}  // namespace kvpack::cuda
