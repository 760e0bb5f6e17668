#include "kvpack/quest.h"

#include <algorithm>
#include <limits>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"

namespace kvpack {

QuestIndex::QuestIndex(const KVView& keys, std::int64_t page_size) : page_size_(page_size) {
  KVPACK_CHECK(page_size >= 1, "page_size: expected >= 1, got " << page_size);
  KVPACK_CHECK(keys.data && keys.heads >= 1 && keys.tokens >= 1 && keys.dim >= 1,
               "keys: expected a non-empty [heads_kv, tokens, head_dim] cache, got ["
                   << keys.heads << ", " << keys.tokens << ", " << keys.dim << "]");
  heads_ = keys.heads;
  dim_ = keys.dim;
  append(keys);
}

void QuestIndex::grow(std::int64_t pages_needed) {
  if (pages_needed <= capacity_) return;
  const std::int64_t capacity = std::max(pages_needed, 2 * capacity_);
  std::vector<float> new_min(static_cast<std::size_t>(heads_ * capacity * dim_));
  std::vector<float> new_max(new_min.size());
  for (std::int64_t h = 0; h < heads_; ++h) {
    std::copy_n(min_.begin() + h * capacity_ * dim_, capacity_ * dim_,
                new_min.begin() + h * capacity * dim_);
    std::copy_n(max_.begin() + h * capacity_ * dim_, capacity_ * dim_,
                new_max.begin() + h * capacity * dim_);
  }
  min_ = std::move(new_min);
  max_ = std::move(new_max);
  capacity_ = capacity;
}

void QuestIndex::append(const KVView& new_keys) {
  KVPACK_CHECK(new_keys.heads == heads_ && new_keys.dim == dim_,
               "new_keys: expected [" << heads_ << ", n, " << dim_ << "], got [" << new_keys.heads
                                      << ", " << new_keys.tokens << ", " << new_keys.dim << "]");
  const std::int64_t total = tokens_ + new_keys.tokens;
  grow((total + page_size_ - 1) / page_size_);
  parallel_for(heads_, [&](std::int64_t h) {
    std::vector<float> key(static_cast<std::size_t>(dim_));
    for (std::int64_t i = 0; i < new_keys.tokens; ++i) {
      const std::int64_t t = tokens_ + i, page = t / page_size_;
      to_float(new_keys.row(h, i), new_keys.dtype, dim_, key.data());
      float* lo = min_.data() + (h * capacity_ + page) * dim_;
      float* hi = max_.data() + (h * capacity_ + page) * dim_;
      if (t % page_size_ == 0) {  // first token of a page
        std::copy(key.begin(), key.end(), lo);
        std::copy(key.begin(), key.end(), hi);
        continue;
      }
      for (std::int64_t c = 0; c < dim_; ++c) {
        lo[c] = std::min(lo[c], key[c]);
        hi[c] = std::max(hi[c], key[c]);
      }
    }
  });
  tokens_ = total;
}

std::vector<std::int32_t> QuestIndex::always_attended(std::int64_t budget) const {
  const std::int64_t count = selection_size(budget);
  const std::int64_t current =
      std::max<std::int64_t>(0, tokens_ - std::min(count, tokens_ - (pages() - 1) * page_size_));
  std::vector<std::int32_t> always;
  for (std::int64_t t = current; t < tokens_; ++t) always.push_back(static_cast<std::int32_t>(t));
  return always;
}

void QuestIndex::select(const float* q, std::int64_t heads_q, std::int64_t budget,
                        bool per_query_head, std::int32_t* out,
                        std::vector<std::vector<std::int32_t>>* used_pages) const {
  KVPACK_CHECK(heads_q >= 1 && heads_q % heads_ == 0,
               "q: expected heads_q to be a positive multiple of heads_kv=" << heads_ << ", got "
                                                                            << heads_q);
  KVPACK_CHECK(budget >= 1, "budget: expected >= 1, got " << budget);
  const std::int64_t group = heads_q / heads_;
  const std::int64_t rows = per_query_head ? heads_q : heads_;
  const std::int64_t count = selection_size(budget);
  const std::int64_t n_pages = pages();
  if (used_pages) used_pages->assign(static_cast<std::size_t>(rows), {});

  // Pages as CSR groups over the token ids 0..tokens-1; the current page is always kept.
  std::vector<std::int32_t> offsets(static_cast<std::size_t>(n_pages + 1)),
      members(static_cast<std::size_t>(tokens_));
  for (std::int64_t p = 0; p <= n_pages; ++p)
    offsets[p] = static_cast<std::int32_t>(std::min(p * page_size_, tokens_));
  for (std::int64_t t = 0; t < tokens_; ++t) members[t] = static_cast<std::int32_t>(t);
  const std::vector<std::int32_t> always = always_attended(budget);

  parallel_for(rows, [&](std::int64_t r) {
    const std::int64_t head = per_query_head ? r / group : r;
    const std::int64_t first_q = per_query_head ? r : r * group, n_q = per_query_head ? 1 : group;
    std::vector<float> scores(static_cast<std::size_t>(n_pages), 0.0f);
    page_bound_scores(q + first_q * dim_, n_q, min_.data() + head * capacity_ * dim_,
                      max_.data() + head * capacity_ * dim_, n_pages, dim_, scores.data());
    // Pages hold page_size tokens (the last may hold fewer): this many always fill the budget.
    const std::int64_t want = std::min(n_pages, count / page_size_ + 2);
    const std::vector<std::int32_t> ranked = top_k(scores.data(), n_pages, want);
    const RankedGroups groups{ranked.data(), want, offsets.data(), members.data()};
    fill_budget(always, groups, count, out + r * count,
                used_pages ? &(*used_pages)[static_cast<std::size_t>(r)] : nullptr);
  });
}

}  // namespace kvpack
