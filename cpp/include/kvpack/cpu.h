// The CPU backend: the reference implementation of every op that has a CUDA twin. The
// dispatchers (kvpack::decode_attention, ...) call these for host data; the test driver
// compares every backend against them. Same arguments as the dispatchers, host memory only.
#pragma once

#include <cstdint>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/kmeans.h"

namespace kvpack::cpu {

/// kvpack::decode_attention on the CPU.
void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output);

/// kvpack::accumulated_attention on the CPU.
void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out);

/// kvpack::rank_rows on the CPU: inner_products and top_k per head.
void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out);

/// kvpack::kmeans_heads on the CPU: the shared loop over cpu_kmeans_backend, heads in
/// parallel when there are enough of them.
std::vector<KMeansResult> kmeans_heads(const KVView& points, const KMeansParams& params,
                                       const float* init_centroids = nullptr);

}  // namespace kvpack::cpu
