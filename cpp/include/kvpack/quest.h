// Quest's page index of one layer, the page-level recall baseline: pages of
// consecutive tokens summarised by the channel-wise min and max of their keys, scored
// by an upper bound of q . k within the page.
#pragma once

#include <cstdint>
#include <vector>

#include "kvpack/common.h"
#include "kvpack/method.h"

namespace kvpack {

/// Quest: pages of keys recalled per decode step by their per-channel bounds.
struct QuestParams : RecallParams {
  static constexpr const char* name = "quest";
  static constexpr const char* class_name = "Quest";
  static constexpr const char* summary =
      "Quest: pages of keys recalled per decode step by their per-channel bounds.";
  static constexpr MethodKind kind = MethodKind::Recall;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = -1;  // not a store codec

  std::int64_t page_size = 16;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"page_size", ParamRule::Count, "Tokens per page.", 1}, p.page_size);
    each_recall_param(p, f);
  }
};

class QuestIndex {
 public:
  /// Summarises keys [heads, tokens, dim] in pages of page_size tokens.
  QuestIndex(const KVView& keys, std::int64_t page_size = QuestParams{}.page_size);

  /// Adds new tokens' keys [heads, n, dim] (the last page fills up first).
  void append(const KVView& new_keys);

  /// Selects `budget` tokens (all when budget >= tokens): the current (last) page, then
  /// pages by sum_i max(q_i * min_i, q_i * max_i), the last one cut to fit. Rows are per
  /// KV head (the group's bounds summed) or per query head.
  /// @param out  size rows * selection_size(budget), ascending per row
  void select(const float* q, std::int64_t heads_q, std::int64_t budget, bool per_query_head,
              std::int32_t* out,
              std::vector<std::vector<std::int32_t>>* used_pages = nullptr) const;

  /// Tokens a selection of `budget` holds whatever the query, ascending: the current
  /// page's tokens (its latest ones when the budget is smaller).
  std::vector<std::int32_t> always_attended(std::int64_t budget) const;

  std::int64_t selection_size(std::int64_t budget) const {
    return budget < tokens_ ? budget : tokens_;
  }
  std::int64_t heads() const { return heads_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t tokens() const { return tokens_; }
  std::int64_t page_size() const { return page_size_; }
  std::int64_t pages() const { return (tokens_ + page_size_ - 1) / page_size_; }
  /// heads * capacity * dim channel-wise minima / maxima; pages() of each head are valid.
  const std::vector<float>& page_min() const { return min_; }
  const std::vector<float>& page_max() const { return max_; }
  std::int64_t capacity() const { return capacity_; }

 private:
  void grow(std::int64_t pages_needed);

  std::int64_t heads_ = 0, dim_ = 0, tokens_ = 0, page_size_ = 16, capacity_ = 0;
  std::vector<float> min_, max_;  // heads * capacity_ * dim
};

/// Quest's page scores for the n_q query rows at q (size n_q * dim): scores[p] = the sum over
/// the queries and channels c of max(q[c] * lo[p, c], q[c] * hi[p, c]), an upper bound of
/// the summed q . k of page p's keys. lo, hi: size n_pages * dim, the pages' channel-wise
/// minima and maxima; scores: size n_pages.
void page_bound_scores(const float* q, std::int64_t n_q, const float* lo, const float* hi,
                       std::int64_t n_pages, std::int64_t dim, float* scores);

}  // namespace kvpack
