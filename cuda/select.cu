// CUDA twins of the selection steps (cpp/src/select.cpp): scoring rows against a query
// and ranking them, batched over heads. The ranking counts, for each score, the scores
// of its head that beat it, so it is exact for any number of rows (no fixed-size buffer
// as in the public ClusterKV kernel, which ignores clusters past 256).

#include <algorithm>

#include "device_buffer.cuh"
#include "kvpack/cuda.h"

namespace kvpack::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kTile = 1024;  // scores per shared-memory tile of the ranking

// scores[h, i] = rows[h, i] . q[h]: one warp per row.
__global__ void score_rows_kernel(const float* rows, std::int64_t heads, std::int64_t n, int dim,
                                  const float* q, float* scores) {
  const std::int64_t warp =
      (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= heads * n) return;
  const std::int64_t h = warp / n;
  const float* row = rows + warp * dim;
  const float* qh = q + h * dim;
  float partial = 0.0f;
  for (int d = lane; d < dim; d += kWarp) partial += row[d] * qh[d];
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  if (lane == 0) scores[warp] = partial;
}

// Score j beats score i when it is larger, or equal at a lower index (top_k's order).
__device__ __forceinline__ bool beats(float sj, std::int64_t j, float si, std::int64_t i) {
  return sj > si || (sj == si && j < i);
}

// Block (x, h): the scores i = x * blockDim + t of head h find their rank by counting the
// scores of the head that beat them, tile by tile; ranks below k write their index.
__global__ void rank_kernel(const float* scores, std::int64_t n, std::int64_t k,
                            std::int32_t* out) {
  __shared__ float tile[kTile];
  const std::int64_t h = blockIdx.y;
  const float* s = scores + h * n;
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const float si = i < n ? s[i] : 0.0f;
  std::int64_t rank = 0;
  for (std::int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int len = static_cast<int>(n - t0 < kTile ? n - t0 : kTile);
    __syncthreads();
    for (int e = threadIdx.x; e < len; e += blockDim.x) tile[e] = s[t0 + e];
    __syncthreads();
    if (i < n)
      for (int e = 0; e < len; ++e) rank += beats(tile[e], t0 + e, si, i);
  }
  if (i < n && rank < k) out[h * k + rank] = static_cast<std::int32_t>(i);
}

}  // namespace

void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out, int device,
               const Execution& exec) {
  const DeviceGuard guard(device);
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  const std::int64_t warps = heads * n;
  const auto score_blocks = static_cast<unsigned>((warps * kWarp + kThreads - 1) / kThreads);
  score_rows_kernel<<<score_blocks, kThreads, 0, stream>>>(rows, heads, n, static_cast<int>(dim), q,
                                                           scores);
  KVPACK_CUDA_CHECK(cudaGetLastError());
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                  static_cast<unsigned>(heads));
  rank_kernel<<<grid, kThreads, 0, stream>>>(scores, n, k, out);
  KVPACK_CUDA_CHECK(cudaGetLastError());
}

void rank_rows_staged(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
                      const float* q, std::int64_t k, float* scores, std::int32_t* out,
                      const Execution& exec) {
  const DeviceGuard guard(exec.cuda_device);
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  const DeviceBuffer d_rows(rows, static_cast<std::size_t>(heads * n * dim) * sizeof(float));
  const DeviceBuffer d_q(q, static_cast<std::size_t>(heads * dim) * sizeof(float));
  DeviceBuffer d_scores(static_cast<std::size_t>(heads * n) * sizeof(float));
  DeviceBuffer d_out(static_cast<std::size_t>(heads * k) * sizeof(std::int32_t));
  rank_rows(d_rows.as<float>(), heads, n, dim, d_q.as<float>(), k, d_scores.as<float>(),
            d_out.as<std::int32_t>(), exec.cuda_device, exec);
  d_scores.copy_to_host(scores, d_scores.size(), stream);
  d_out.copy_to_host(out, d_out.size(), stream);
}

}  // namespace kvpack::cuda
