// Owning device allocation with host transfers, and the CUDA error check that
// turns every failed runtime call into an exception naming the call.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>

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

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace kvpack::cuda
