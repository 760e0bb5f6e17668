// CUDA decode attention and accumulated attention, same contracts as
// cpp/src/attention.cpp, on device pointers and a stream. Decode: one thread block per (query head,
// token chunk), each warp streams tokens with an online softmax, chunks merged by log-sum-exp.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "device_buffer.cuh"
#include "kvpack/cuda.h"

namespace kvpack::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxDim = 256;  // per-lane registers hold dim / 32 <= 8 elements
constexpr int kPerLane = kMaxDim / kWarp;
constexpr std::int64_t kMinChunkTokens = 256;

__device__ __forceinline__ float load_float(const float* p, std::int64_t i) {
  return p[i];
}
__device__ __forceinline__ float load_float(const __half* p, std::int64_t i) {
  return __half2float(p[i]);
}
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, std::int64_t i) {
  return __bfloat162float(p[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Partial softmax state per (query head, chunk): max, sum, output[dim].
template <class T>
__global__ void decode_chunks_kernel(const float* q, const T* keys, const T* values,
                                     const std::int32_t* indices, std::int64_t index_rows,
                                     const float* bias, int heads_q, int heads_kv,
                                     std::int64_t tokens, int dim, std::int64_t count,
                                     std::int64_t chunk_len, float scale, float* scores,
                                     float* partials) {
  const int hq = blockIdx.x;
  const int chunk = blockIdx.y;
  const int chunks = gridDim.y;
  const int head = hq / (heads_q / heads_kv);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const std::int64_t begin = chunk * chunk_len;
  const std::int64_t end = min(count, begin + chunk_len);

  float qr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int i = lane + e * kWarp;
    qr[e] = i < dim ? q[hq * dim + i] * scale : 0.0f;
    acc[e] = 0.0f;
  }
  float run_max = -INFINITY, run_sum = 0.0f;
  const std::int32_t* idx =
      indices ? indices + (index_rows == heads_q ? hq : head) * count : nullptr;
  const T* k_head = keys + static_cast<std::int64_t>(head) * tokens * dim;
  const T* v_head = values + static_cast<std::int64_t>(head) * tokens * dim;

  for (std::int64_t p = begin + warp; p < end; p += kWarpsPerBlock) {
    const std::int64_t t = idx ? idx[p] : p;
    const T* k = k_head + t * dim;
    float partial = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int i = lane + e * kWarp;
      if (i < dim) partial += qr[e] * load_float(k, i);
    }
    float s = warp_sum(partial);
    if (bias) s += bias[static_cast<std::int64_t>(head) * tokens + t];
    if (scores && lane == 0) scores[static_cast<std::int64_t>(hq) * count + p] = s;
    const float new_max = fmaxf(run_max, s);
    const float correction = run_max == -INFINITY ? 0.0f : __expf(run_max - new_max);
    const float w = __expf(s - new_max);
    run_sum = run_sum * correction + w;
    const T* v = v_head + t * dim;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int i = lane + e * kWarp;
      if (i < dim) acc[e] = acc[e] * correction + w * load_float(v, i);
    }
    run_max = new_max;
  }

  // Combine the warps of the block.
  __shared__ float warp_max[kWarpsPerBlock], warp_total[kWarpsPerBlock];
  __shared__ float warp_out[kWarpsPerBlock][kMaxDim];
  if (lane == 0) {
    warp_max[warp] = run_max;
    warp_total[warp] = run_sum;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int i = lane + e * kWarp;
    if (i < dim) warp_out[warp][i] = acc[e];
  }
  __syncthreads();
  float* out = partials + (static_cast<std::int64_t>(hq) * chunks + chunk) * (dim + 2);
  float block_max = -INFINITY;
  for (int w = 0; w < kWarpsPerBlock; ++w) block_max = fmaxf(block_max, warp_max[w]);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarpsPerBlock; ++w)
      if (warp_max[w] != -INFINITY) o += warp_out[w][i] * __expf(warp_max[w] - block_max);
    out[2 + i] = o;
  }
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kWarpsPerBlock; ++w)
      if (warp_max[w] != -INFINITY) total += warp_total[w] * __expf(warp_max[w] - block_max);
    out[0] = block_max;
    out[1] = total;
  }
}

__global__ void merge_chunks_kernel(const float* partials, int chunks, int dim, float* out,
                                    float* lse) {
  const int hq = blockIdx.x;
  const float* p = partials + static_cast<std::int64_t>(hq) * chunks * (dim + 2);
  float global_max = -INFINITY;
  for (int c = 0; c < chunks; ++c) global_max = fmaxf(global_max, p[c * (dim + 2)]);
  float total = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const float m = p[c * (dim + 2)];
    if (m != -INFINITY) total += p[c * (dim + 2) + 1] * expf(m - global_max);
  }
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float o = 0.0f;
    for (int c = 0; c < chunks; ++c) {
      const float m = p[c * (dim + 2)];
      if (m != -INFINITY) o += p[c * (dim + 2) + 2 + i] * expf(m - global_max);
    }
    out[static_cast<std::int64_t>(hq) * dim + i] = o / total;
  }
  if (threadIdx.x == 0) lse[hq] = global_max + logf(total);
}

__global__ void normalise_weights_kernel(float* weights, const float* lse, std::int64_t count) {
  const int hq = blockIdx.y;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    weights[hq * count + i] = expf(weights[hq * count + i] - lse[hq]);
}

// One block per (query head, query): pass 1 finds the softmax max and sum over the
// visible keys, pass 2 adds each key's weight into its accumulator.
template <class T>
__global__ void accumulate_kernel(const float* queries, const T* keys, int heads_q, int heads_kv,
                                  std::int64_t window, std::int64_t tokens, int dim, float scale,
                                  bool causal, bool per_query_head, float* acc) {
  const int hq = blockIdx.x;
  const std::int64_t i = blockIdx.y;
  const int head = hq / (heads_q / heads_kv);
  const float* qv = queries + (static_cast<std::int64_t>(hq) * window + i) * dim;
  const T* k_head = keys + static_cast<std::int64_t>(head) * tokens * dim;
  const std::int64_t visible = causal ? tokens - window + i + 1 : tokens;

  float local_max = -INFINITY, local_sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x) {
    float s = 0.0f;
    for (int c = 0; c < dim; ++c) s += qv[c] * load_float(k_head + j * dim, c);
    s *= scale;
    const float new_max = fmaxf(local_max, s);
    local_sum =
        local_sum * (local_max == -INFINITY ? 0.0f : expf(local_max - new_max)) + expf(s - new_max);
    local_max = new_max;
  }
  __shared__ float block_max[256], block_sum[256];
  block_max[threadIdx.x] = local_max;
  block_sum[threadIdx.x] = local_sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const float m1 = block_max[threadIdx.x], m2 = block_max[threadIdx.x + stride];
      const float m = fmaxf(m1, m2);
      float s = 0.0f;
      if (m1 != -INFINITY) s += block_sum[threadIdx.x] * expf(m1 - m);
      if (m2 != -INFINITY) s += block_sum[threadIdx.x + stride] * expf(m2 - m);
      block_max[threadIdx.x] = m;
      block_sum[threadIdx.x] = s;
    }
    __syncthreads();
  }
  const float m = block_max[0], inv = 1.0f / block_sum[0];
  float* row = acc + static_cast<std::int64_t>(per_query_head ? hq : head) * tokens;
  for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x) {
    float s = 0.0f;
    for (int c = 0; c < dim; ++c) s += qv[c] * load_float(k_head + j * dim, c);
    atomicAdd(row + j, expf(s * scale - m) * inv);
  }
}

__global__ void mean_kernel(float* acc, std::int64_t rows, std::int64_t tokens, std::int64_t window,
                            bool causal, float group_factor) {
  const std::int64_t n = rows * tokens;
  for (std::int64_t x = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t j = x % tokens;
    const std::int64_t seen = causal ? min(window, tokens - j) : window;
    acc[x] /= group_factor * static_cast<float>(seen);
  }
}

std::size_t kv_bytes(const KVView& v) {
  return static_cast<std::size_t>(v.heads * v.tokens * v.dim) * dtype_size(v.dtype);
}

void require_contiguous(const KVView& v, const char* name) {
  KVPACK_CHECK(v.stride() == v.tokens * v.dim,
               name << ": the CUDA backend takes C-contiguous [heads, tokens, dim] caches");
}

// Token chunks per query head: enough blocks to fill the GPU, none shorter than
// kMinChunkTokens.
std::int64_t decode_chunks(std::int64_t heads_q, std::int64_t count) {
  return std::max<std::int64_t>(
      1, std::min<std::int64_t>(1024 / heads_q + 1, count / kMinChunkTokens));
}

template <class T>
void launch_decode(const float* q, const KVView& keys, const KVView& values,
                   const std::int32_t* indices, std::int64_t index_rows, const float* bias,
                   int heads_q, std::int64_t count, std::int64_t chunks, std::int64_t chunk_len,
                   float scale, float* scores, float* partials, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(heads_q), static_cast<unsigned>(chunks));
  decode_chunks_kernel<T><<<grid, kWarp * kWarpsPerBlock, 0, stream>>>(
      q, static_cast<const T*>(keys.data), static_cast<const T*>(values.data), indices, index_rows,
      bias, heads_q, static_cast<int>(keys.heads), keys.tokens, static_cast<int>(keys.dim), count,
      chunk_len, scale, scores, partials);
  KVPACK_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_accumulate(const float* queries, const KVView& keys, int heads_q, std::int64_t window,
                       const AccumulateParams& params, float scale, float* acc,
                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(heads_q), static_cast<unsigned>(window));
  accumulate_kernel<T><<<grid, 256, 0, stream>>>(
      queries, static_cast<const T*>(keys.data), heads_q, static_cast<int>(keys.heads), window,
      keys.tokens, static_cast<int>(keys.dim), scale, params.causal, params.per_query_head, acc);
  KVPACK_CUDA_CHECK(cudaGetLastError());
}

// A host view's data copied to the current device; the view then points there.
DeviceBuffer stage(KVView& view) {
  DeviceBuffer buffer(view.data, kv_bytes(view));
  view.data = buffer.data();
  return buffer;
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

std::size_t decode_attention_scratch_bytes(std::int64_t heads_q, std::int64_t count,
                                           std::int64_t dim) {
  // The chunks' partial states, then room for lse when the caller wants none.
  return static_cast<std::size_t>(heads_q * decode_chunks(heads_q, count) * (dim + 2) + heads_q) *
         sizeof(float);
}

void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output,
                      const Execution& exec) {
  KVPACK_CHECK(keys.dim <= kMaxDim,
               "keys: the CUDA backend supports head_dim <= " << kMaxDim << ", got " << keys.dim);
  require_contiguous(keys, "keys");
  require_contiguous(values, "values");
  const DeviceGuard guard(keys.device.index);
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  const std::int64_t dim = keys.dim;
  const std::int64_t count = indices ? indices->count : keys.tokens;
  const std::int64_t chunks = decode_chunks(heads_q, count);
  const std::int64_t chunk_len = (count + chunks - 1) / chunks;
  const Scratch scratch(exec.scratch, exec.scratch_bytes,
                        decode_attention_scratch_bytes(heads_q, count, dim));
  float* partials = scratch.as<float>();
  const float scale = resolve_scale(params.scale, dim);
  const std::int32_t* idx = indices ? indices->data : nullptr;
  const std::int64_t index_rows = indices ? indices->rows : 0;
  // The raw scores go straight to the weights, normalised in place once lse is known.
  float* scores = output.weights;
  const int hq = static_cast<int>(heads_q);
  switch (keys.dtype) {
    case DType::Float32:
      launch_decode<float>(q, keys, values, idx, index_rows, bias, hq, count, chunks, chunk_len,
                           scale, scores, partials, stream);
      break;
    case DType::Float16:
      launch_decode<__half>(q, keys, values, idx, index_rows, bias, hq, count, chunks, chunk_len,
                            scale, scores, partials, stream);
      break;
    case DType::BFloat16:
      launch_decode<__nv_bfloat16>(q, keys, values, idx, index_rows, bias, hq, count, chunks,
                                   chunk_len, scale, scores, partials, stream);
      break;
  }
  // lse normalises the weights: without an output for it, it goes after the partials.
  float* lse = output.lse ? output.lse : partials + heads_q * chunks * (dim + 2);
  merge_chunks_kernel<<<hq, 128, 0, stream>>>(partials, static_cast<int>(chunks),
                                              static_cast<int>(dim), output.out, lse);
  KVPACK_CUDA_CHECK(cudaGetLastError());
  if (output.weights) {
    const dim3 grid(static_cast<unsigned>(std::min<std::int64_t>((count + 255) / 256, 1024)),
                    static_cast<unsigned>(heads_q));
    normalise_weights_kernel<<<grid, 256, 0, stream>>>(output.weights, lse, count);
    KVPACK_CUDA_CHECK(cudaGetLastError());
  }
  // A buffer of our own is freed on return: cudaFree waits for the work that uses it.
}

void decode_attention_staged(const float* q, std::int64_t heads_q, const KVView& keys,
                             const KVView& values, const IndexView* indices, const float* bias,
                             const AttentionParams& params, const AttentionOutput& output,
                             const Execution& exec) {
  const DeviceGuard guard(exec.cuda_device);
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  const std::int64_t dim = keys.dim;
  const std::int64_t count = indices ? indices->count : keys.tokens;
  KVView k = keys, v = values;
  require_contiguous(k, "keys");
  require_contiguous(v, "values");
  const DeviceBuffer d_k = stage(k), d_v = stage(v);
  k.device = v.device = Device{DeviceType::CUDA, exec.cuda_device};
  const DeviceBuffer d_q(q, static_cast<std::size_t>(heads_q * dim) * sizeof(float));
  IndexView idx;
  DeviceBuffer d_idx;
  if (indices) {
    d_idx = DeviceBuffer(indices->data,
                         static_cast<std::size_t>(indices->rows * indices->count) * sizeof(int));
    idx = IndexView{d_idx.as<std::int32_t>(), indices->rows, indices->count, k.device};
  }
  const DeviceBuffer d_bias =
      bias ? DeviceBuffer(bias, static_cast<std::size_t>(keys.heads * keys.tokens) * sizeof(float))
           : DeviceBuffer();
  DeviceBuffer d_out(static_cast<std::size_t>(heads_q * dim) * sizeof(float));
  DeviceBuffer d_lse(static_cast<std::size_t>(heads_q) * sizeof(float));
  DeviceBuffer d_weights(output.weights ? static_cast<std::size_t>(heads_q * count) * sizeof(float)
                                        : 0);
  cuda::decode_attention(d_q.as<float>(), heads_q, k, v, indices ? &idx : nullptr,
                         d_bias.as<float>(), params,
                         AttentionOutput{d_out.as<float>(), d_lse.as<float>(),
                                         output.weights ? d_weights.as<float>() : nullptr},
                         exec);
  d_out.copy_to_host(output.out, d_out.size(), stream);
  if (output.lse) d_lse.copy_to_host(output.lse, d_lse.size(), stream);
  if (output.weights) d_weights.copy_to_host(output.weights, d_weights.size(), stream);
}

void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out,
                           const Execution& exec) {
  require_contiguous(keys, "keys");
  const DeviceGuard guard(keys.device.index);
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  const std::int64_t group_size = heads_q / keys.heads;
  const std::int64_t rows = params.per_query_head ? heads_q : keys.heads;
  KVPACK_CUDA_CHECK(
      cudaMemsetAsync(out, 0, static_cast<std::size_t>(rows * tokens) * sizeof(float), stream));
  const float scale = resolve_scale(params.scale, dim);
  const int hq = static_cast<int>(heads_q);
  switch (keys.dtype) {
    case DType::Float32:
      launch_accumulate<float>(queries, keys, hq, window, params, scale, out, stream);
      break;
    case DType::Float16:
      launch_accumulate<__half>(queries, keys, hq, window, params, scale, out, stream);
      break;
    case DType::BFloat16:
      launch_accumulate<__nv_bfloat16>(queries, keys, hq, window, params, scale, out, stream);
      break;
  }
  if (params.reduction == Reduction::Mean) {
    const float group_factor = params.per_query_head ? 1.0f : static_cast<float>(group_size);
    mean_kernel<<<256, 256, 0, stream>>>(out, rows, tokens, window, params.causal, group_factor);
    KVPACK_CUDA_CHECK(cudaGetLastError());
  }
}

void accumulated_attention_staged(const float* queries, std::int64_t heads_q, std::int64_t window,
                                  const KVView& keys, const AccumulateParams& params, float* out,
                                  const Execution& exec) {
  const DeviceGuard guard(exec.cuda_device);
  KVView k = keys;
  require_contiguous(k, "keys");
  const DeviceBuffer d_k = stage(k);
  k.device = Device{DeviceType::CUDA, exec.cuda_device};
  const DeviceBuffer d_q(queries,
                         static_cast<std::size_t>(heads_q * window * keys.dim) * sizeof(float));
  const std::int64_t rows = params.per_query_head ? heads_q : keys.heads;
  DeviceBuffer d_acc(static_cast<std::size_t>(rows * keys.tokens) * sizeof(float));
  cuda::accumulated_attention(d_q.as<float>(), heads_q, window, k, params, d_acc.as<float>(), exec);
  d_acc.copy_to_host(out, d_acc.size(), static_cast<cudaStream_t>(exec.stream));
}

}  // namespace kvpack::cuda
