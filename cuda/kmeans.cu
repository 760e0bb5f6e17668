// The CUDA k-means backend (kvpack::KMeansBackend), driven by the loop of
// cpp/src/kmeans.cpp: an assignment kernel that tiles the centroids through shared memory
// (any number of clusters), an update kernel that accumulates member sums with atomics,
// and a normalisation kernel. The points stay on the device.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "device_buffer.cuh"
#include "kvpack/cuda.h"

namespace kvpack::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kCentroidTile = 16;
constexpr int kMaxDim = 256;

__device__ __forceinline__ float to_f32(float x) {
  return x;
}
__device__ __forceinline__ float to_f32(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Points to float32, unit rows when spherical; squared norms.
template <class T>
__global__ void prepare_kernel(const T* in, std::int64_t n, int dim, bool spherical, float* out,
                               float* norms) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float sq = 0.0f;
  for (int c = 0; c < dim; ++c) {
    const float v = to_f32(in[i * dim + c]);
    out[i * dim + c] = v;
    sq += v * v;
  }
  if (spherical && sq > 0.0f) {
    const float inv = rsqrtf(sq);
    for (int c = 0; c < dim; ++c) out[i * dim + c] *= inv;
    sq = 1.0f;
  }
  norms[i] = sq;
}

// Each thread assigns one point; centroid tiles pass through shared memory.
__global__ void assign_kernel(const float* x, const float* x_norms, std::int64_t n, int dim,
                              const float* c, const float* c_norms, int k, bool spherical,
                              std::int32_t* labels, float* costs, int* changed) {
  __shared__ float tile[kCentroidTile * kMaxDim];
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  float best_value = -INFINITY, best_dot = 0.0f;
  int best = 0;
  for (int t0 = 0; t0 < k; t0 += kCentroidTile) {
    const int tile_k = min(kCentroidTile, k - t0);
    __syncthreads();
    for (int e = threadIdx.x; e < tile_k * dim; e += blockDim.x)
      tile[e] = c[static_cast<std::int64_t>(t0) * dim + e];
    __syncthreads();
    if (i < n) {
      for (int j = 0; j < tile_k; ++j) {
        float dot = 0.0f;
        for (int d = 0; d < dim; ++d) dot += x[i * dim + d] * tile[j * dim + d];
        const float value = spherical ? dot : 2.0f * dot - c_norms[t0 + j];
        if (value > best_value) {
          best_value = value;
          best_dot = dot;
          best = t0 + j;
        }
      }
    }
  }
  if (i >= n) return;
  if (labels[i] != best) atomicOr(changed, 1);
  labels[i] = best;
  costs[i] =
      spherical ? 1.0f - best_dot : fmaxf(0.0f, x_norms[i] - 2.0f * best_dot + c_norms[best]);
}

__global__ void accumulate_kernel(const float* x, std::int64_t n, int dim,
                                  const std::int32_t* labels, float* sums, int* counts) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int j = labels[i];
  atomicAdd(counts + j, 1);
  for (int d = 0; d < dim; ++d)
    atomicAdd(sums + static_cast<std::int64_t>(j) * dim + d, x[i * dim + d]);
}

// Centroid j = mean of its members (unit when spherical); empty clusters keep theirs
// (the host re-seeds them).
__global__ void finish_kernel(const float* sums, const int* counts, int k, int dim, bool spherical,
                              float* c, float* c_norms) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= k || counts[j] == 0) return;
  float sq = 0.0f;
  for (int d = 0; d < dim; ++d) {
    const float v = sums[static_cast<std::int64_t>(j) * dim + d] / static_cast<float>(counts[j]);
    c[static_cast<std::int64_t>(j) * dim + d] = v;
    sq += v * v;
  }
  if (spherical && sq > 0.0f) {
    const float inv = rsqrtf(sq);
    for (int d = 0; d < dim; ++d) c[static_cast<std::int64_t>(j) * dim + d] *= inv;
    sq = 1.0f;
  }
  c_norms[j] = sq;
}

// rows[r] = x[indices[r]], norms[r] = x_norms[indices[r]].
__global__ void gather_rows_kernel(const float* x, const float* x_norms,
                                   const std::int64_t* indices, std::int64_t count, int dim,
                                   float* rows, float* norms) {
  const std::int64_t r = blockIdx.x;
  if (r >= count) return;
  const std::int64_t i = indices[r];
  for (int d = threadIdx.x; d < dim; d += blockDim.x) rows[r * dim + d] = x[i * dim + d];
  if (threadIdx.x == 0) norms[r] = x_norms[i];
}

unsigned blocks_for(std::int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

template <class T>
void launch_prepare(const void* raw, std::int64_t n, int dim, bool spherical, float* x,
                    float* norms, cudaStream_t stream) {
  prepare_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T*>(raw), n, dim,
                                                         spherical, x, norms);
  KVPACK_CUDA_CHECK(cudaGetLastError());
}

class CudaKMeans final : public KMeansBackend {
 public:
  CudaKMeans(const void* points, DType dtype, std::int64_t n, std::int64_t dim, bool spherical,
             const Device& where, int device, cudaStream_t stream)
      : device_(device),
        stream_(stream),
        n_(n),
        dim_(dim),
        spherical_(spherical),
        host_costs_(static_cast<std::size_t>(n)) {
    KVPACK_CHECK(dim <= kMaxDim,
                 "x: the CUDA k-means supports d <= " << kMaxDim << ", got " << dim);
    const DeviceGuard guard(device_);
    x_ = DeviceBuffer(static_cast<std::size_t>(n * dim) * sizeof(float));
    x_norms_ = DeviceBuffer(static_cast<std::size_t>(n) * sizeof(float));
    labels_ = DeviceBuffer(static_cast<std::size_t>(n) * sizeof(std::int32_t));
    costs_ = DeviceBuffer(static_cast<std::size_t>(n) * sizeof(float));
    changed_ = DeviceBuffer(sizeof(int));
    const DeviceBuffer staged =
        where.is_cuda()
            ? DeviceBuffer()
            : DeviceBuffer(points, static_cast<std::size_t>(n * dim) * dtype_size(dtype));
    const void* raw = where.is_cuda() ? points : staged.data();
    const int d = static_cast<int>(dim);
    switch (dtype) {
      case DType::Float32:
        launch_prepare<float>(raw, n, d, spherical, x_.as<float>(), x_norms_.as<float>(), stream_);
        break;
      case DType::Float16:
        launch_prepare<__half>(raw, n, d, spherical, x_.as<float>(), x_norms_.as<float>(), stream_);
        break;
      case DType::BFloat16:
        launch_prepare<__nv_bfloat16>(raw, n, d, spherical, x_.as<float>(), x_norms_.as<float>(),
                                      stream_);
        break;
    }
    KVPACK_CUDA_CHECK(cudaStreamSynchronize(stream_));  // before `staged` is freed
  }

  std::int64_t size() const override { return n_; }
  std::int64_t dim() const override { return dim_; }

  void gather(const std::int64_t* indices, std::int64_t count, float* rows,
              float* squared_norms) const override {
    if (count == 0) return;
    const DeviceGuard guard(device_);
    const DeviceBuffer d_idx(indices, static_cast<std::size_t>(count) * sizeof(std::int64_t));
    DeviceBuffer d_rows(static_cast<std::size_t>(count * dim_) * sizeof(float)),
        d_norms(static_cast<std::size_t>(count) * sizeof(float));
    gather_rows_kernel<<<static_cast<unsigned>(count), kThreads, 0, stream_>>>(
        x_.as<float>(), x_norms_.as<float>(), d_idx.as<std::int64_t>(), count,
        static_cast<int>(dim_), d_rows.as<float>(), d_norms.as<float>());
    KVPACK_CUDA_CHECK(cudaGetLastError());
    d_rows.copy_to_host(rows, d_rows.size(), stream_);
    d_norms.copy_to_host(squared_norms, d_norms.size(), stream_);
  }

  void set_centroids(const float* centroids, std::int64_t k) override {
    const DeviceGuard guard(device_);
    k_ = k;
    const auto kd = static_cast<std::size_t>(k * dim_);
    centroids_ = DeviceBuffer(centroids, kd * sizeof(float));
    std::vector<float> norms(static_cast<std::size_t>(k));
    for (std::int64_t j = 0; j < k; ++j) {
      double sq = 0.0;
      for (std::int64_t e = 0; e < dim_; ++e)
        sq += double(centroids[j * dim_ + e]) * centroids[j * dim_ + e];
      norms[j] = static_cast<float>(sq);
    }
    c_norms_ = DeviceBuffer(norms.data(), norms.size() * sizeof(float));
    sums_ = DeviceBuffer(kd * sizeof(float));
    counts_ = DeviceBuffer(static_cast<std::size_t>(k) * sizeof(int));
    host_counts_.assign(static_cast<std::size_t>(k), 0);
    KVPACK_CUDA_CHECK(cudaMemsetAsync(labels_.data(), 0xff, labels_.size(), stream_));  // -1
  }

  double assign(bool* changed) override {
    const DeviceGuard guard(device_);
    KVPACK_CUDA_CHECK(cudaMemsetAsync(changed_.data(), 0, sizeof(int), stream_));
    assign_kernel<<<blocks_for(n_), kThreads, 0, stream_>>>(
        x_.as<float>(), x_norms_.as<float>(), n_, static_cast<int>(dim_), centroids_.as<float>(),
        c_norms_.as<float>(), static_cast<int>(k_), spherical_, labels_.as<std::int32_t>(),
        costs_.as<float>(), changed_.as<int>());
    KVPACK_CUDA_CHECK(cudaGetLastError());
    costs_.copy_to_host(host_costs_.data(), costs_.size(), stream_);
    int any_changed = 0;
    changed_.copy_to_host(&any_changed, sizeof(int), stream_);
    *changed = any_changed != 0;
    double total = 0.0;
    for (float v : host_costs_) total += v;
    return total;
  }

  void update() override {
    const DeviceGuard guard(device_);
    const int d = static_cast<int>(dim_), kk = static_cast<int>(k_);
    KVPACK_CUDA_CHECK(cudaMemsetAsync(sums_.data(), 0, sums_.size(), stream_));
    KVPACK_CUDA_CHECK(cudaMemsetAsync(counts_.data(), 0, counts_.size(), stream_));
    accumulate_kernel<<<blocks_for(n_), kThreads, 0, stream_>>>(
        x_.as<float>(), n_, d, labels_.as<std::int32_t>(), sums_.as<float>(), counts_.as<int>());
    finish_kernel<<<blocks_for(k_), kThreads, 0, stream_>>>(
        sums_.as<float>(), counts_.as<int>(), kk, d, spherical_, centroids_.as<float>(),
        c_norms_.as<float>());
    KVPACK_CUDA_CHECK(cudaGetLastError());
    counts_.copy_to_host(host_counts_.data(), counts_.size(), stream_);
    // Re-seed empty clusters with the costliest points, as the CPU does.
    for (std::int64_t j = 0; j < k_; ++j) {
      if (host_counts_[j] != 0) continue;
      const auto far =
          std::max_element(host_costs_.begin(), host_costs_.end()) - host_costs_.begin();
      host_costs_[far] = -std::numeric_limits<float>::infinity();
      KVPACK_CUDA_CHECK(cudaMemcpyAsync(centroids_.as<float>() + j * dim_,
                                        x_.as<float>() + far * dim_, dim_ * sizeof(float),
                                        cudaMemcpyDeviceToDevice, stream_));
      KVPACK_CUDA_CHECK(cudaMemcpyAsync(c_norms_.as<float>() + j, x_norms_.as<float>() + far,
                                        sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    }
  }

  void finish(KMeansResult& result) override {
    const DeviceGuard guard(device_);
    result.labels.resize(static_cast<std::size_t>(n_));
    labels_.copy_to_host(result.labels.data(), labels_.size(), stream_);
    result.centroids.resize(static_cast<std::size_t>(k_ * dim_));
    centroids_.copy_to_host(result.centroids.data(), centroids_.size(), stream_);
    // Objective of the returned labels under the returned centroids, in double.
    std::vector<float> xs(static_cast<std::size_t>(n_ * dim_));
    x_.copy_to_host(xs.data(), x_.size(), stream_);
    double total = 0.0;
    for (std::int64_t i = 0; i < n_; ++i) {
      const float* cj = result.centroids.data() + result.labels[i] * dim_;
      double dot = 0.0, xx = 0.0, cc = 0.0;
      for (std::int64_t e = 0; e < dim_; ++e) {
        dot += double(xs[i * dim_ + e]) * cj[e];
        xx += double(xs[i * dim_ + e]) * xs[i * dim_ + e];
        cc += double(cj[e]) * cj[e];
      }
      total += spherical_ ? 1.0 - dot : std::max(0.0, xx - 2.0 * dot + cc);
    }
    result.objective = total;
  }

 private:
  int device_;
  cudaStream_t stream_;
  std::int64_t n_, dim_, k_ = 0;
  bool spherical_;
  DeviceBuffer x_, x_norms_, labels_, costs_, changed_;
  DeviceBuffer centroids_, c_norms_, sums_, counts_;
  std::vector<float> host_costs_;
  std::vector<int> host_counts_;
};

}  // namespace

std::unique_ptr<KMeansBackend> kmeans_backend(const void* points, DType dtype, std::int64_t n,
                                              std::int64_t dim, bool spherical, const Device& where,
                                              int device, void* stream) {
  return std::make_unique<CudaKMeans>(points, dtype, n, dim, spherical, where, device,
                                      static_cast<cudaStream_t>(stream));
}

}  // namespace kvpack::cuda
