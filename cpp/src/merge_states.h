// The combine step of split-K (flash-decoding) attention, written once: the partial
// softmax states of one query head over chunks of keys, merged by log-sum-exp. Internal
// linkage: kernel sources built for several instruction sets each get their own copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace kvpack::detail {

/// Chunk c's state of query head g, of a group of `group` heads, lies at
/// partials + c * stride: its highest score at [g], its sum of exp(score - highest) at
/// [group + g] and its unnormalised output at [2 * group + g * dim, + dim). A chunk with
/// no score (highest -inf) adds nothing.
/// @param out  size dim: the merged, normalised output
/// @return the log-sum-exp of all the head's scores
static inline float merge_states(const float* partials, std::int64_t chunks, std::int64_t stride,
                                 std::int64_t group, std::int64_t g, std::int64_t dim, float* out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float top = kNegInf;
  for (std::int64_t c = 0; c < chunks; ++c) top = std::max(top, partials[c * stride + g]);
  float total = 0.0f;
  std::fill(out, out + dim, 0.0f);
  for (std::int64_t c = 0; c < chunks; ++c) {
    const float* state = partials + c * stride;
    if (state[g] == kNegInf) continue;
    const float weight = std::exp(state[g] - top);
    total += weight * state[group + g];
    const float* partial_out = state + 2 * group + g * dim;
    for (std::int64_t i = 0; i < dim; ++i) out[i] += weight * partial_out[i];
  }
  const float inverse = 1.0f / total;
  for (std::int64_t i = 0; i < dim; ++i) out[i] *= inverse;
  return top + std::log(total);
}

}  // namespace kvpack::detail
