// The CUDA backend: the same operations and contracts as the CPU ones, declared
// here so C++ callers and the bindings reach them without CUDA headers. Only
// present in builds with KVPACK_WITH_CUDA. Pointers are host pointers: each call
// copies its inputs to the current device and its results back.
#pragma once

#include <cstdint>

#include <vector>

#include "kvpack/attention.h"
#include "kvpack/kmeans.h"

namespace kvpack::cuda {

/// Number of visible CUDA devices (0 when the driver or device is missing).
int device_count();

/// decode_attention on the GPU; same arguments and results as kvpack::decode_attention.
void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output);

/// accumulated_attention on the GPU; same arguments and results as the CPU one.
void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out);

/// kmeans_heads on the GPU: same initialisation (computed on the CPU), Lloyd rounds with
/// assignment and update kernels, early stop when no label changes.
std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids = nullptr);

}  // namespace kvpack::cuda
