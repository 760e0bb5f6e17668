// The selection steps every recall and eviction method shares: scoring rows against
// a query, ranking (top-k), and filling a token budget from ranked groups of tokens
// (ClusterKV's clusters, Quest's pages) around tokens that are always kept.
#pragma once

#include <cstdint>
#include <vector>

namespace kvpack {

/// out[i] = rows[i] . q for n rows of dim floats (a GEMV).
void inner_products(const float* rows, std::int64_t n, std::int64_t dim, const float* q,
                    float* out);

/// Indices of the k largest of n scores, highest first, ties to the lower index.
std::vector<std::int32_t> top_k(const float* scores, std::int64_t n, std::int64_t k);

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
