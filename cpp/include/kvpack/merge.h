// The merging methods: KVMerger (runs of adjacent, nearly identical keys folded into
// one slot with Gaussian-kernel weights around a pivot) and the CaM baseline (values of
// tokens leaving a window merged into the values that stay), plus the adjacent-key
// similarity both the method and its analysis start from. Each works on one KV head
// of one layer; kvpack::compress runs them across heads.
#pragma once

#include <cstdint>

#include "kvpack/common.h"

namespace kvpack {

/// Cosine similarity of each key with the next: out[h * (tokens - 1) + t] =
/// cos(k[h, t], k[h, t + 1]); 0 where either key is zero.
/// @param out  size heads * (tokens - 1)
void adjacent_similarity(const KVView& keys, float* out);

/// Parameters of KVMerger. Protected tokens are never merged.
struct KVMergerParams {
  float protect_recent = -1.0f;  ///< share of tokens in the protected recent window; < 0: default
  float protect_heavy = -1.0f;   ///< share of tokens protected as heavy hitters; < 0: default
  float sigma = 5.0f;            ///< Gaussian kernel width; <= 0: per set, the RMS member-pivot
                                 ///< distance (data-driven)
};

/// The paper's protected shares for a budget of `fraction` of the tokens: 17% recent +
/// 12% heavy at 50% and above, 8% + 2% at 35%, linear between, and scaled down with
/// the budget below 35% so protection never crowds out merging.
void kvmerger_default_protection(double fraction, float* recent, float* heavy);

/// Where one head's compressed slots go: `budget` rows each.
struct HeadSlots {
  void* keys = nullptr;               ///< budget * dim elements in the input dtype
  void* values = nullptr;             ///< budget * dim elements in the input dtype
  std::int32_t* counts = nullptr;     ///< budget: original tokens each slot stands for
  std::int32_t* positions = nullptr;  ///< budget: the position each slot keeps, ascending
};

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

/// Parameters of CaM.
struct CaMParams {
  std::int64_t sinks = 4;          ///< first tokens always kept
  std::int64_t merge_window = 32;  ///< an evicted value is spread over this many successors
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

}  // namespace kvpack
