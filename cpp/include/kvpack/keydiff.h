// KeyDiff: keep the tokens whose keys differ most from the head's average key direction.
// Keys that point where most keys point add little a query could not already find, so
// the budget goes to the distinctive ones. Needs no attention scores (works with any
// attention kernel) and no parameters of its own.
#pragma once

#include <cstdint>

#include "kvpack/common.h"
#include "kvpack/method.h"

namespace kvpack {

/// KeyDiff (arXiv 2504.15364): per KV head, the `budget` tokens with the lowest cosine
/// similarity to the anchor, the mean of the head's L2-normalised keys.
struct KeyDiffParams : HeadBudgetParams {
  static constexpr const char* name = "keydiff";
  static constexpr const char* class_name = "KeyDiff";
  static constexpr const char* summary =
      "KeyDiff: the tokens whose keys are least similar (cosine) to the mean normalised key.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = 7;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    each_head_budget_param(p, f);
  }
};

/// KeyDiff's score of each token of head `head`: -cos(k_t, anchor), 0 for a zero key.
/// @param out  size keys.tokens
void keydiff_scores(const KVView& keys, std::int64_t head, float* out);

void compress_head(const KeyDiffParams& params, const HeadInput& in, const HeadSlots& out);

/// KeyDiff's ranking of in.head's tokens: keydiff_scores (it always keeps none).
/// @param out  size in.keys.tokens
void token_ranks(const KeyDiffParams& params, const HeadInput& in, float* out);

}  // namespace kvpack
