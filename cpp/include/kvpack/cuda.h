// The CUDA backend: the same operations and contracts as the CPU ones (kvpack/cpu.h),
// declared here so the core's dispatchers reach them without CUDA headers. Only present
// in builds with KVPACK_WITH_CUDA. Call the dispatchers (kvpack::decode_attention, ...):
// they check the arguments and devices, then pick the backend from where the data lives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/backend.h"
#include "kvpack/kmeans.h"

namespace kvpack::cuda {

/// Number of visible CUDA devices (0 when the driver or device is missing).
int device_count();

/// Scratch bytes decode_attention takes for heads_q queries over `count` tokens.
std::size_t decode_attention_scratch_bytes(std::int64_t heads_q, std::int64_t count,
                                           std::int64_t dim);

/// decode_attention with every pointer in the memory of keys.device, on exec.stream,
/// results left on the device (asynchronous: synchronise the stream before reading them).
void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output,
                      const Execution& exec);

/// decode_attention on host data: inputs copied to exec.cuda_device, results copied back.
void decode_attention_staged(const float* q, std::int64_t heads_q, const KVView& keys,
                             const KVView& values, const IndexView* indices, const float* bias,
                             const AttentionParams& params, const AttentionOutput& output,
                             const Execution& exec);

/// accumulated_attention with every pointer in the memory of keys.device, on exec.stream.
void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out,
                           const Execution& exec);

/// accumulated_attention on host data, staged through exec.cuda_device.
void accumulated_attention_staged(const float* queries, std::int64_t heads_q, std::int64_t window,
                                  const KVView& keys, const AccumulateParams& params, float* out,
                                  const Execution& exec);

/// rank_rows with every pointer in the memory of the current device, on exec.stream:
/// a warp per score, then each score's rank counted against all of its head's scores
/// (exact, ties to the lower index, no limit on n).
void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out, int device,
               const Execution& exec);

/// rank_rows on host data, staged through exec.cuda_device.
void rank_rows_staged(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
                      const float* q, std::int64_t k, float* scores, std::int32_t* out,
                      const Execution& exec);

/// The CUDA k-means backend over n points of storage `dtype` at `points` (size n * dim),
/// in the memory of `where` (host memory is copied once to `device`); its work runs on
/// `stream` on `device` and the points stay there.
std::unique_ptr<KMeansBackend> kmeans_backend(const void* points, DType dtype, std::int64_t n,
                                              std::int64_t dim, bool spherical, const Device& where,
                                              int device, void* stream);

}  // namespace kvpack::cuda
