// The selection steps every recall, eviction and merging method shares: scoring rows
// against a query, ranking (top-k), filling a token budget from ranked groups of tokens
// (ClusterKV's clusters, Quest's pages) around tokens that are always kept, and
// gathering the chosen rows.
#pragma once

#include <cstdint>
#include <vector>

#include "kvpack/backend.h"
#include "kvpack/common.h"

namespace kvpack {

/// out[i] = rows[i] . q for n rows of dim floats (a GEMV).
void inner_products(const float* rows, std::int64_t n, std::int64_t dim, const float* q,
                    float* out);

/// out[g * n + j] = q_g . keys[head, tokens[j]] for the n_q queries at q (size n_q *
/// keys.dim float32) and n tokens of one KV head, in float32 from any KV dtype: the scores
/// decode attention computes, for a set of tokens to rank. Host memory.
void gather_scores(const float* q, std::int64_t n_q, const KVView& keys, std::int64_t head,
                   const std::int32_t* tokens, std::int64_t n, float* out);

/// Indices of the k largest of n scores, highest first, ties to the lower index.
std::vector<std::int32_t> top_k(const float* scores, std::int64_t n, std::int64_t k);

/// The k largest of n scores as ascending indices (the same set top_k ranks: ties
/// to the lower index), found by selection rather than a sort of the winners.
std::vector<std::int32_t> top_k_set(const float* scores, std::int64_t n, std::int64_t k);

/// AdaKV's split of heads * k picks among `heads` rows of n scores each (the rows a
/// layer's KV heads): every row's `floor` highest first (top_k_set), then the highest of
/// all the other scores pooled, ties to the lower row, then the lower index. A row can
/// get anything from floor to n picks; together they are min(heads * k, heads * n).
/// @param scores  size heads * n, no NaN (+inf ranks above every finite score)
/// @return each row's picks, ascending
std::vector<std::vector<std::int32_t>> pooled_top_k(const float* scores, std::int64_t heads,
                                                    std::int64_t n, std::int64_t k,
                                                    std::int64_t floor);

/// Scoring and ranking batched over heads, as ClusterIndex ranks its centroids (Quest's
/// page scores are bounds, not inner products, and rank with top_k):
/// scores[h, i] = rows[h, i] . q[h], then the k best of each head's n scores, highest
/// first, ties to the lower index (top_k per head), for any n.
/// @param rows    size heads * n * dim float32, on `device`
/// @param q       size heads * dim float32, on `device`
/// @param scores  size heads * n, on `device`: the scores
/// @param out     size heads * k, on `device`: the ranked indices
/// The backend is the one of `device` (or CUDA with exec.stage_to_cuda for host data).
void rank_rows(const float* rows, std::int64_t heads, std::int64_t n, std::int64_t dim,
               const float* q, std::int64_t k, float* scores, std::int32_t* out,
               const Device& device = {}, const Execution& exec = {});

/// Copies rows tokens[0..n) of `head` of src (unconverted, src's dtype) to dst, one
/// row after the other: dst holds n * src.dim elements.
void gather_rows(const KVView& src, std::int64_t head, const std::int32_t* tokens, std::int64_t n,
                 void* dst);

/// Groups of tokens in rank order: group g holds members[offsets[g] .. offsets[g + 1]),
/// each group's members ascending.
struct RankedGroups {
  const std::int32_t* order = nullptr;    ///< groups, best first
  std::int64_t count = 0;                 ///< number of ranked groups
  const std::int32_t* offsets = nullptr;  ///< CSR offsets of members, per group id
  const std::int32_t* members = nullptr;  ///< token ids
};

/// Fills `budget` tokens: first the `always` tokens (ascending, deduplicated by the
/// caller; if they alone exceed the budget, the first ones and then the latest ones are
/// kept), then whole groups in rank order skipping tokens already taken, the last group
/// cut to fit. Writes the tokens ascending to out (size budget) and, when used_groups is
/// non-null, the ids of the groups that contributed.
void fill_budget(const std::vector<std::int32_t>& always, const RankedGroups& groups,
                 std::int64_t budget, std::int32_t* out, std::vector<std::int32_t>* used_groups);

}  // namespace kvpack
