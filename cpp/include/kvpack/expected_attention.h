// Expected Attention: rank tokens by the attention that queries still to come are
// expected to pay them. The prompt's queries, taken back to no position, give a mean and a
// covariance; turned by the rotation averaged over the next positions, they model a future
// query q ~ N(mu, Sigma), whose expected exp-score on a key has a closed form.
#pragma once

#include <cstdint>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/method.h"

namespace kvpack {

/// Expected Attention (arXiv 2510.00636): per query head, the softmax over the keys of
/// scale * k.mu + scale^2 / 2 * k' Sigma k, the log of E[exp(scale * q.k)] for a query
/// q ~ N(mu, Sigma) (mu, Sigma: the prompt's queries without rotation, then turned by the
/// rotation averaged over `future_positions` positions after the last query), averaged
/// over each GQA group, times (score + epsilon) * ||v||; the first `sinks` tokens are always
/// kept. Defaults are kvpress's (n_future_positions, n_sink, use_covariance, use_vnorm).
struct ExpectedAttentionParams : HeadBudgetParams {
  static constexpr const char* name = "expected_attention";
  static constexpr const char* class_name = "ExpectedAttention";
  static constexpr const char* summary =
      "Expected Attention: the tokens that queries still to come, modelled from the prompt's "
      "query statistics, are expected to attend most, weighted by value norm.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = 8;

  std::int64_t future_positions = 512;
  std::int64_t sinks = 4;
  bool covariance = true;
  bool value_norm = true;
  float epsilon = 0.0f;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"future_positions", ParamRule::Count,
                "Positions after the last query the rotation of future queries is averaged over.",
                1},
      p.future_positions);
    f(ParamSpec{"sinks", ParamRule::Count,
                "First tokens always kept; their queries stay out of the statistics.", 0},
      p.sinks);
    f(ParamSpec{"covariance", ParamRule::Flag,
                "Add the queries' covariance term (False: the mean query alone)."},
      p.covariance);
    f(ParamSpec{"value_norm", ParamRule::Flag, "Scale each score by the norm of its value."},
      p.value_norm);
    f(ParamSpec{"epsilon", ParamRule::NonNegative,
                "Added to each score before the value-norm scaling."},
      p.epsilon);
    each_head_budget_param(p, f);
  }
};

/// Expected Attention reads the queries themselves, not the attention they paid.
constexpr bool reads_queries(const ExpectedAttentionParams&) {
  return true;
}

/// Expected Attention's score of every token of KV head `head` (the first min(sinks,
/// tokens) score +inf): what compress ranks by. `evidence` holds the queries (all heads_q
/// of them, query head h serving KV head h / (heads_q / keys.heads)), their rotation
/// (evidence.rotary; none: the queries carry no position) and where they stand
/// (evidence.first_position); evidence.scale scales the scores.
/// @param out  size keys.tokens
void expected_attention_scores(const ExpectedAttentionParams& params, const KVView& keys,
                               const KVView& values, const Evidence& evidence, std::int64_t head,
                               float* out);

void compress_head(const ExpectedAttentionParams& params, const HeadInput& in,
                   const HeadSlots& out);

/// Expected Attention's ranking of in.head's tokens (in.evidence): the scores above, the
/// sinks at +inf (always kept first).
/// @param out  size in.keys.tokens
void token_ranks(const ExpectedAttentionParams& params, const HeadInput& in, float* out);

}  // namespace kvpack
