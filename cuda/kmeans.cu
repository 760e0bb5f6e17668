// CUDA k-means, same contract as cpp/src/kmeans.cpp: an assignment kernel that tiles
// the centroids through shared memory (any number of clusters), an update kernel that
// accumulates member sums with atomics, and a normalisation kernel.

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

unsigned blocks_for(std::int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

KMeansResult kmeans_one(const void* points, DType dtype, std::int64_t n, std::int64_t dim,
                        const KMeansParams& params, const float* init_centroids) {
  const std::int64_t k = params.n_clusters;
  const int d = static_cast<int>(dim), kk = static_cast<int>(k);
  std::vector<float> c = init_centroids
                             ? std::vector<float>(init_centroids, init_centroids + k * dim)
                             : kmeans_initial_centroids(points, dtype, n, dim, params);
  if (init_centroids && params.spherical)
    for (std::int64_t j = 0; j < k; ++j) {
      double sq = 0.0;
      for (std::int64_t e = 0; e < dim; ++e) sq += double(c[j * dim + e]) * c[j * dim + e];
      if (sq > 0.0)
        for (std::int64_t e = 0; e < dim; ++e)
          c[j * dim + e] = static_cast<float>(c[j * dim + e] / std::sqrt(sq));
    }

  DeviceBuffer raw(points, static_cast<std::size_t>(n * dim) * dtype_size(dtype));
  DeviceBuffer x(static_cast<std::size_t>(n * dim) * sizeof(float)),
      x_norms(static_cast<std::size_t>(n) * sizeof(float));
  switch (dtype) {
    case DType::Float32:
      prepare_kernel<<<blocks_for(n), kThreads>>>(raw.as<float>(), n, d, params.spherical,
                                                  x.as<float>(), x_norms.as<float>());
      break;
    case DType::Float16:
      prepare_kernel<<<blocks_for(n), kThreads>>>(raw.as<__half>(), n, d, params.spherical,
                                                  x.as<float>(), x_norms.as<float>());
      break;
    case DType::BFloat16:
      prepare_kernel<<<blocks_for(n), kThreads>>>(raw.as<__nv_bfloat16>(), n, d, params.spherical,
                                                  x.as<float>(), x_norms.as<float>());
      break;
  }
  KVPACK_CUDA_CHECK(cudaGetLastError());
  DeviceBuffer centroids(c.data(), c.size() * sizeof(float)),
      c_norms(static_cast<std::size_t>(k) * sizeof(float));
  std::vector<float> norms(static_cast<std::size_t>(k));
  for (std::int64_t j = 0; j < k; ++j) {
    double sq = 0.0;
    for (std::int64_t e = 0; e < dim; ++e) sq += double(c[j * dim + e]) * c[j * dim + e];
    norms[j] = static_cast<float>(sq);
  }
  KVPACK_CUDA_CHECK(cudaMemcpy(c_norms.data(), norms.data(), norms.size() * sizeof(float),
                               cudaMemcpyHostToDevice));
  DeviceBuffer labels(static_cast<std::size_t>(n) * sizeof(std::int32_t)),
      costs(static_cast<std::size_t>(n) * sizeof(float));
  KVPACK_CUDA_CHECK(cudaMemset(labels.data(), 0xff, labels.size()));  // -1
  DeviceBuffer sums(static_cast<std::size_t>(k * dim) * sizeof(float)),
      counts(static_cast<std::size_t>(k) * sizeof(int));
  DeviceBuffer changed(sizeof(int));

  KMeansResult result;
  std::vector<float> host_costs(static_cast<std::size_t>(n));
  std::vector<int> host_counts(static_cast<std::size_t>(k));
  for (int it = 0; it < params.iterations; ++it) {
    KVPACK_CUDA_CHECK(cudaMemset(changed.data(), 0, sizeof(int)));
    assign_kernel<<<blocks_for(n), kThreads>>>(
        x.as<float>(), x_norms.as<float>(), n, d, centroids.as<float>(), c_norms.as<float>(), kk,
        params.spherical, labels.as<std::int32_t>(), costs.as<float>(), changed.as<int>());
    KVPACK_CUDA_CHECK(cudaGetLastError());
    costs.copy_to_host(host_costs.data());
    double total = 0.0;
    for (float v : host_costs) total += v;
    result.history.push_back(total);
    result.iterations = it + 1;
    int any_changed = 0;
    changed.copy_to_host(&any_changed);
    if (it > 0 && !any_changed) break;
    KVPACK_CUDA_CHECK(cudaMemset(sums.data(), 0, sums.size()));
    KVPACK_CUDA_CHECK(cudaMemset(counts.data(), 0, counts.size()));
    accumulate_kernel<<<blocks_for(n), kThreads>>>(x.as<float>(), n, d, labels.as<std::int32_t>(),
                                                   sums.as<float>(), counts.as<int>());
    finish_kernel<<<blocks_for(k), kThreads>>>(sums.as<float>(), counts.as<int>(), kk, d,
                                               params.spherical, centroids.as<float>(),
                                               c_norms.as<float>());
    KVPACK_CUDA_CHECK(cudaGetLastError());
    counts.copy_to_host(host_counts.data());
    // Re-seed empty clusters with the costliest points, as the CPU does.
    for (std::int64_t j = 0; j < k; ++j) {
      if (host_counts[j] != 0) continue;
      const auto far = std::max_element(host_costs.begin(), host_costs.end()) - host_costs.begin();
      host_costs[far] = -std::numeric_limits<float>::infinity();
      KVPACK_CUDA_CHECK(cudaMemcpy(centroids.as<float>() + j * dim, x.as<float>() + far * dim,
                                   dim * sizeof(float), cudaMemcpyDeviceToDevice));
      KVPACK_CUDA_CHECK(cudaMemcpy(c_norms.as<float>() + j, x_norms.as<float>() + far,
                                   sizeof(float), cudaMemcpyDeviceToDevice));
    }
  }
  result.labels.resize(static_cast<std::size_t>(n));
  labels.copy_to_host(result.labels.data());
  result.centroids.resize(static_cast<std::size_t>(k * dim));
  centroids.copy_to_host(result.centroids.data());
  // Objective of the returned labels under the returned centroids (one more assignment
  // pass would move labels; compute the cost directly on the host).
  std::vector<float> xs(static_cast<std::size_t>(n * dim));
  x.copy_to_host(xs.data());
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float* cj = result.centroids.data() + result.labels[i] * dim;
    double dot = 0.0, xx = 0.0, cc = 0.0;
    for (std::int64_t e = 0; e < dim; ++e) {
      dot += double(xs[i * dim + e]) * cj[e];
      xx += double(xs[i * dim + e]) * xs[i * dim + e];
      cc += double(cj[e]) * cj[e];
    }
    total += params.spherical ? 1.0 - dot : std::max(0.0, xx - 2.0 * dot + cc);
  }
  result.objective = total;
  return result;
}

}  // namespace

std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids) {
  KVPACK_CHECK(points.dim <= kMaxDim,
               "x: the CUDA k-means supports d <= " << kMaxDim << ", got " << points.dim);
  KVPACK_CHECK(params.n_clusters >= 1 && params.n_clusters <= points.tokens,
               "n_clusters: expected 1 <= n_clusters <= points=" << points.tokens << ", got "
                                                                 << params.n_clusters);
  KVPACK_CHECK(params.iterations >= 1, "iters: expected >= 1, got " << params.iterations);
  std::vector<KMeansResult> results;
  for (std::int64_t h = 0; h < points.heads; ++h)
    results.push_back(
        kmeans_one(points.row(h, 0), points.dtype, points.tokens, points.dim, params,
                   init_centroids ? init_centroids + h * params.n_clusters * points.dim : nullptr));
  return results;
}

}  // namespace kvpack::cuda
