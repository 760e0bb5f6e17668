// The merging methods: KVMerger (runs of adjacent, nearly identical keys folded into
// one slot with Gaussian-kernel weights around a pivot) and the CaM baseline (values of
// tokens leaving a window merged into the values that stay), plus the adjacent-key
// similarity both the method and its analysis start from. Each works on one KV head
// of one layer; kvpack::compress runs them across heads.
#pragma once

#include <cstdint>

#include "kvpack/common.h"
#include "kvpack/method.h"

namespace kvpack {

/// Cosine similarity of each key with the next: out[h * (tokens - 1) + t] =
/// cos(k[h, t], k[h, t + 1]); 0 where either key is zero.
/// @param out  size heads * (tokens - 1)
void adjacent_similarity(const KVView& keys, float* out);

/// KVMerger: runs of adjacent similar keys merged with Gaussian weights. Protected
/// tokens are never merged.
struct KVMergerParams {
  static constexpr const char* name = "kvmerger";
  static constexpr const char* class_name = "KVMerger";
  static constexpr const char* summary =
      "KVMerger: runs of adjacent similar keys merged with Gaussian weights.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = true;
  static constexpr int blob_code = 5;

  float protect_recent = -1.0f;
  float protect_heavy = -1.0f;
  float sigma = 5.0f;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"protect_recent", ParamRule::OptionalShare,
                "Share of the tokens in the never-merged recent window (None: the paper's "
                "schedule, 17% at a 50% budget to 8% at 35%)."},
      p.protect_recent);
    f(ParamSpec{"protect_heavy", ParamRule::OptionalShare,
                "Share of the tokens protected as heavy hitters (None: 12% at 50% to 2% at 35%)."},
      p.protect_heavy);
    f(ParamSpec{"sigma", ParamRule::Width,
                "Gaussian kernel width, or 'auto': per run, the RMS member-pivot distance."},
      p.sigma);
  }
};

/// The paper's protected shares for a budget of `fraction` of the tokens: 17% recent +
/// 12% heavy at 50% and above, 8% + 2% at 35%, linear between, and scaled down with
/// the budget below 35% so protection never crowds out merging.
void kvmerger_default_protection(double fraction, float* recent, float* heavy);

/// KVMerger on head `head`: protects the recent window and the heavy hitters, merges
/// the tokens - budget most similar adjacent unprotected pairs (the similarity threshold
/// searched so the budget is met exactly), and folds each resulting run into one slot at
/// its pivot (the member with the highest score): key and value are the normalised
/// sums with weights exp(-|k_i - k_pivot|^2 / (2 sigma^2)).
/// @param scores  size keys.tokens: accumulated attention of the head's tokens
/// @return the lowest similarity merged (the searched threshold); +inf when none is
float kvmerger_head(const KVView& keys, const KVView& values, std::int64_t head,
                    const float* scores, std::int64_t budget, const KVMergerParams& params,
                    const HeadSlots& out);

/// CaM: StreamingLLM's choice, each evicted value merged into the kept ones.
struct CaMParams {
  static constexpr const char* name = "cam";
  static constexpr const char* class_name = "CaM";
  static constexpr const char* summary =
      "CaM: StreamingLLM's choice, each evicted value merged into the kept ones with the "
      "probability its attention gives.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = true;
  static constexpr int blob_code = 6;

  std::int64_t sinks = 4;
  std::int64_t merge_window = 32;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"sinks", ParamRule::Count, "First tokens always kept.", 0}, p.sinks);
    f(ParamSpec{"merge_window", ParamRule::Count, "Successors an evicted value is spread over.", 1},
      p.merge_window);
  }
};

/// CaM on head `head`: keeps the sinks and the latest budget - sinks tokens. Walking
/// the sequence as a window slides over it, each token that leaves adds p / m of its
/// (already merged) value to each of the next m tokens still in the window, with
/// p = min(1, its score / the mean score of the recent window after it: the tokens
/// e + 1 .. e + budget - sinks, as CaM's reference code) — the expectation of the
/// paper's Bernoulli merge, so results are deterministic. A share is
/// always p / merge_window; successors past the window's end receive none (as in the
/// paper's code, that part of the mass is dropped). Keys of
/// evicted tokens are dropped; counts are 1.
void cam_head(const KVView& keys, const KVView& values, std::int64_t head, const float* scores,
              std::int64_t budget, const CaMParams& params, const HeadSlots& out);

/// Each method's compression of one head (see compress.h).
void compress_head(const KVMergerParams& params, const HeadInput& in, const HeadSlots& out);
void compress_head(const CaMParams& params, const HeadInput& in, const HeadSlots& out);

}  // namespace kvpack
