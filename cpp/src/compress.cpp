#include "kvpack/compress.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/evict.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"

namespace kvpack {

namespace {

// The floor of the method's adaptive split at `budget`, or -1 when it keeps `budget` in
// every head.
std::int64_t adaptive_floor(const MethodParams& method, std::int64_t budget) {
  return std::visit(
      [&](const auto& p) -> std::int64_t {
        if constexpr (ranks_tokens<std::decay_t<decltype(p)>>)
          return p.adaptive ? head_budget_floor(p, budget) : -1;
        return -1;
      },
      method);
}

// Where head h of a [heads, slots] output writes.
HeadSlots head_slots(const CompressOutput& out, std::int64_t h, std::int64_t slots,
                     std::size_t row_bytes) {
  HeadSlots head;
  head.keys = static_cast<char*>(out.keys) + h * slots * row_bytes;
  head.values = static_cast<char*>(out.values) + h * slots * row_bytes;
  head.counts = out.counts + h * slots;
  head.positions = out.positions + h * slots;
  head.threshold = out.thresholds ? out.thresholds + h : nullptr;
  return head;
}

// AdaKV: every head's token_ranks at the uniform budget pooled (pooled_top_k), each head's
// picks kept in its first slots, the rest left empty.
template <class Params>
std::int64_t compress_adaptive(const Params& method, const KVView& keys, const KVView& values,
                               const Evidence& evidence, const float* scores, std::int64_t budget,
                               std::int64_t slots, const CompressOutput& out) {
  const std::int64_t tokens = keys.tokens;
  const std::size_t row_bytes = static_cast<std::size_t>(keys.dim) * dtype_size(keys.dtype);
  std::vector<float> ranks(static_cast<std::size_t>(keys.heads * tokens));
  parallel_for(keys.heads, [&](std::int64_t h) {
    const HeadInput input{keys,   values,   h, scores ? scores + h * tokens : nullptr,
                          budget, &evidence};
    token_ranks(method, input, ranks.data() + h * tokens);
  });
  const auto picks =
      pooled_top_k(ranks.data(), keys.heads, tokens, budget, head_budget_floor(method, budget));
  parallel_for(keys.heads, [&](std::int64_t h) {
    const HeadSlots head = head_slots(out, h, slots, row_bytes);
    const auto& kept = picks[static_cast<std::size_t>(h)];
    const auto n = static_cast<std::int64_t>(kept.size());
    std::copy(kept.begin(), kept.end(), head.positions);
    keep_rows(HeadInput{keys, values, h, nullptr, n}, head);
    std::fill(head.positions + n, head.positions + slots, -1);
    std::fill(head.counts + n, head.counts + slots, 0);
    const std::size_t empty = static_cast<std::size_t>(slots - n) * row_bytes;
    std::memset(static_cast<char*>(head.keys) + n * row_bytes, 0, empty);
    std::memset(static_cast<char*>(head.values) + n * row_bytes, 0, empty);
  });
  std::size_t most = 0;
  for (const auto& kept : picks) most = std::max(most, kept.size());
  return static_cast<std::int64_t>(most);
}

}  // namespace

std::vector<std::int64_t> pyramid_budgets(std::int64_t budget, std::int64_t layers,
                                          std::int64_t tokens, double beta) {
  KVPACK_CHECK(budget >= 1 && layers >= 1 && tokens >= 1 && beta >= 1.0,
               "pyramid_budgets: expected budget, layers, tokens >= 1 and beta >= 1, got "
                   << budget << ", " << layers << ", " << tokens << ", " << beta);
  std::vector<std::int64_t> out(static_cast<std::size_t>(layers), budget);
  const auto mean = static_cast<double>(budget), n = static_cast<double>(tokens);
  double low = mean / beta, high = 2.0 * mean - low;
  if (high > n) {  // the lowest layer holds every token: the others share what is left
    high = n;
    low = 2.0 * mean - n;
  }
  if (budget >= tokens || layers == 1 || low < 1.0) return out;
  // Exact shares, floored, then the remaining slots to the largest remainders.
  std::vector<double> share(out.size());
  std::int64_t left = budget * layers;
  for (std::int64_t l = 0; l < layers; ++l) {
    share[l] = high - static_cast<double>(l) * (high - low) / static_cast<double>(layers - 1);
    out[l] = static_cast<std::int64_t>(std::floor(share[l]));
    left -= out[l];
  }
  std::vector<std::int64_t> order(out.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return share[a] - std::floor(share[a]) > share[b] - std::floor(share[b]);
  });
  for (std::int64_t i = 0; left > 0; i = (i + 1) % layers, --left) ++out[order[i]];
  return out;
}

bool adaptive_heads(const MethodParams& method) {
  return adaptive_floor(method, 1) >= 0;
}

std::int64_t compressed_length(const CompressParams& params, std::int64_t tokens,
                               std::int64_t heads) {
  if (std::holds_alternative<FullParams>(params.method)) return tokens;
  const std::int64_t floor = adaptive_floor(params.method, params.budget);
  if (floor < 0) return params.budget;
  return std::min(tokens, heads * params.budget - (heads - 1) * floor);
}

void keep_rows(const HeadInput& in, const HeadSlots& out) {
  gather_rows(in.keys, in.head, out.positions, in.slots, out.keys);
  gather_rows(in.values, in.head, out.positions, in.slots, out.values);
  std::fill(out.counts, out.counts + in.slots, 1);
}

void keep_highest_ranked(const float* ranks, const HeadInput& in, const HeadSlots& out) {
  const std::vector<std::int32_t> kept = top_k_set(ranks, in.keys.tokens, in.slots);
  std::copy(kept.begin(), kept.end(), out.positions);
  keep_rows(in, out);
}

std::int64_t compress(const KVView& keys, const KVView& values, const Evidence& evidence,
                      const CompressParams& params, const CompressOutput& out) {
  const std::int64_t tokens = keys.tokens;
  KVPACK_CHECK(method_kind(params.method) == MethodKind::Compress,
               "method: expected a compression method (" << method_names(MethodKind::Compress)
                                                         << "), got '" << method_name(params.method)
                                                         << "'");
  const std::int64_t asked =
      std::holds_alternative<FullParams>(params.method) ? tokens : params.budget;
  KVPACK_CHECK(asked >= 1 && asked <= tokens,
               "budget: expected 1 <= budget <= tokens=" << tokens << ", got " << asked);
  const std::int64_t slots = compressed_length(params, tokens, keys.heads);
  // Accumulated attention for the methods that rank by it; the queries-reading ones get
  // the evidence itself (HeadInput::evidence).
  const bool ranks = std::visit([](const auto& p) { return p.ranks_by_attention; }, params.method);
  const std::vector<float> scores =
      ranks ? evidence_scores(
                  keys, evidence,
                  std::visit([](const auto& p) { return observation_window(p); }, params.method))
            : std::vector<float>();
  const std::size_t row_bytes = static_cast<std::size_t>(keys.dim) * dtype_size(keys.dtype);

  if (adaptive_heads(params.method)) {
    return std::visit(
        [&](const auto& method) -> std::int64_t {
          if constexpr (ranks_tokens<std::decay_t<decltype(method)>>)
            return compress_adaptive(method, keys, values, evidence,
                                     ranks ? scores.data() : nullptr, params.budget, slots, out);
          return slots;  // adaptive_heads holds only for the methods that rank tokens
        },
        params.method);
  }
  parallel_for(keys.heads, [&](std::int64_t h) {
    const HeadSlots head = head_slots(out, h, slots, row_bytes);
    const HeadInput input{keys,  values,   h, ranks ? scores.data() + h * tokens : nullptr,
                          slots, &evidence};
    std::visit(
        [&](const auto& method) {
          if constexpr (std::decay_t<decltype(method)>::kind == MethodKind::Compress)
            compress_head(method, input, head);
        },
        params.method);
  });
  return slots;
}

}  // namespace kvpack
