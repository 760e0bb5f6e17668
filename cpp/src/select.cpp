#include "kvpack/select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "kvpack/common.h"

namespace kvpack {

namespace {

// Strict total order of the ranking: higher score first, ties to the lower index.
struct Better {
  const float* scores;
  bool operator()(std::int32_t a, std::int32_t b) const {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  }
};

std::vector<std::int32_t> all_indices(std::int64_t n, std::int64_t k) {
  KVPACK_CHECK(k >= 0 && k <= n, "k: expected 0 <= k <= n=" << n << ", got " << k);
  std::vector<std::int32_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  return idx;
}

}  // namespace

std::vector<std::int32_t> top_k(const float* scores, std::int64_t n, std::int64_t k) {
  std::vector<std::int32_t> idx = all_indices(n, k);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), Better{scores});
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

std::vector<std::int32_t> top_k_set(const float* scores, std::int64_t n, std::int64_t k) {
  KVPACK_CHECK(k >= 0 && k <= n, "k: expected 0 <= k <= n=" << n << ", got " << k);
  std::vector<std::int32_t> out;
  out.reserve(static_cast<std::size_t>(k));
  if (k == 0) return out;
  // Select the k-th largest value on plain floats (no index indirection), then take
  // every score above it and the lowest-index ties at it, in index order.
  for (std::int64_t i = 0; i < n; ++i)  // NaN has no rank; callers pass finite scores
    KVPACK_CHECK(!std::isnan(scores[i]),
                 "scores: contain NaN (keys or queries not finite, or their scores overflowed)");
  std::vector<float> copy(scores, scores + n);
  std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<float>());
  const float kth = copy[static_cast<std::size_t>(k - 1)];
  std::int64_t ties = k;
  for (std::int64_t i = 0; i < n; ++i) ties -= scores[i] > kth;
  for (std::int64_t i = 0; i < n; ++i) {
    if (scores[i] > kth || (scores[i] == kth && ties-- > 0))
      out.push_back(static_cast<std::int32_t>(i));
  }
  return out;
}

std::vector<std::vector<std::int32_t>> pooled_top_k(const float* scores, std::int64_t heads,
                                                    std::int64_t n, std::int64_t k,
                                                    std::int64_t floor) {
  KVPACK_CHECK(heads >= 0 && n >= 0 && k >= 0, "pooled_top_k: expected sizes >= 0");
  KVPACK_CHECK(heads * n <= std::numeric_limits<std::int32_t>::max(),
               "pooled_top_k: heads * n = " << heads * n << " scores exceed an int32 index");
  k = std::min(k, n);
  floor = std::clamp<std::int64_t>(floor, 0, k);
  // The floors are ranked first by lifting them to +inf; every row then holds at most k
  // of them (its floor, or its own +inf scores when it has more, at most k: a method's
  // always-kept tokens), so the pooled heads * k highest take them all.
  std::vector<float> pooled(scores, scores + heads * n);
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int32_t i : top_k_set(scores + h * n, n, floor))
      pooled[static_cast<std::size_t>(h * n + i)] = std::numeric_limits<float>::infinity();
  std::vector<std::vector<std::int32_t>> picks(static_cast<std::size_t>(heads));
  for (std::int32_t flat : top_k_set(pooled.data(), heads * n, heads * k))
    picks[static_cast<std::size_t>(flat / n)].push_back(static_cast<std::int32_t>(flat % n));
  return picks;
}

void gather_rows(const KVView& src, std::int64_t head, const std::int32_t* tokens, std::int64_t n,
                 void* dst) {
  const std::size_t row_bytes = static_cast<std::size_t>(src.dim) * dtype_size(src.dtype);
  char* out = static_cast<char*>(dst);
  for (std::int64_t i = 0; i < n; ++i, out += row_bytes)
    std::memcpy(out, src.row(head, tokens[i]), row_bytes);
}

void fill_budget(const std::vector<std::int32_t>& always, const RankedGroups& groups,
                 std::int64_t budget, std::int32_t* out, std::vector<std::int32_t>* used_groups) {
  // Taken tokens as a bitmap (grown to the largest id seen): membership in O(1), and the
  // ascending output is a scan of tokens / 64 words rather than a sort of the budget.
  std::vector<std::uint64_t> taken(always.empty() ? 0 : always.back() / 64 + 1, 0);
  const auto word = [&](std::int32_t t) -> std::uint64_t& {
    KVPACK_CHECK(t >= 0, "tokens: expected ids >= 0, got " << t);
    const auto w = static_cast<std::size_t>(t) / 64;
    if (w >= taken.size()) taken.resize(w + 1, 0);
    return taken[w];
  };
  const auto has = [&](std::int32_t t) { return (word(t) >> (t & 63)) & 1u; };
  const auto take = [&](std::int32_t t) { word(t) |= std::uint64_t{1} << (t & 63); };
  const auto n_always = static_cast<std::int64_t>(always.size());
  std::int64_t remaining = budget;
  if (n_always <= budget) {
    for (std::int32_t t : always) take(t);
    remaining -= n_always;
  } else {  // keep the earliest half and the latest half of the always-kept tokens
    const std::int64_t head = budget / 2;
    for (std::int64_t i = 0; i < head; ++i) take(always[i]);
    for (std::int64_t i = n_always - (budget - head); i < n_always; ++i) take(always[i]);
    remaining = 0;
  }
  for (std::int64_t r = 0; r < groups.count && remaining > 0; ++r) {
    const std::int32_t g = groups.order[r];
    bool used = false;
    for (std::int32_t m = groups.offsets[g]; m < groups.offsets[g + 1] && remaining > 0; ++m) {
      const std::int32_t token = groups.members[m];
      if (has(token)) continue;
      take(token);
      --remaining;
      used = true;
    }
    if (used && used_groups) used_groups->push_back(g);
  }
  KVPACK_CHECK(remaining == 0,
               "budget: only " << budget - remaining << " tokens to fill a budget of " << budget);
  std::int64_t n = 0;
  for (std::size_t w = 0; w < taken.size(); ++w)
    for (std::uint64_t bits = taken[w]; bits; bits &= bits - 1)
      out[n++] =
          static_cast<std::int32_t>(w * 64 + static_cast<std::size_t>(__builtin_ctzll(bits)));
}

}  // namespace kvpack
