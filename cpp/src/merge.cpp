#include "kvpack/merge.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"
#include "vec.h"

namespace kvpack {

namespace {

using detail::floatv;
using detail::kLanes;
using detail::load_lanes;

// y += w * x over n elements, x widened from storage.
template <class T>
inline void axpy(float w, const T* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    detail::store_lanes(y + i, load_lanes(y + i) + w * load_lanes(x + i));
  for (; i < n; ++i) y[i] += w * detail::widen(x[i]);
}

// Squared distance of a and b, n elements each.
template <class T>
inline float squared_distance(const T* a, const T* b, std::int64_t n) {
  floatv acc = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const floatv d = load_lanes(a + i) - load_lanes(b + i);
    acc += d * d;
  }
  float sum = detail::reduce_add(acc);
  for (; i < n; ++i)
    sum +=
        (detail::widen(a[i]) - detail::widen(b[i])) * (detail::widen(a[i]) - detail::widen(b[i]));
  return sum;
}

// Cosine similarities of one head's adjacent keys into out (tokens - 1): one pass over
// the rows, each read straight from storage.
template <class T>
void head_similarity(const KVView& keys, std::int64_t head, float* out) {
  const std::int64_t dim = keys.dim;
  const T* prev = static_cast<const T*>(keys.row(head, 0));
  float prev_norm = std::sqrt(detail::dot(prev, prev, dim));
  for (std::int64_t t = 1; t < keys.tokens; ++t) {
    const T* cur = static_cast<const T*>(keys.row(head, t));
    const float norm = std::sqrt(detail::dot(cur, cur, dim));
    const float denom = prev_norm * norm;
    // A zero key has similarity 0; NaN (from a NaN or Inf key) stays NaN for the caller.
    out[t - 1] = denom == 0.0f ? 0.0f : detail::dot(prev, cur, dim) / denom;
    prev = cur;
    prev_norm = norm;
  }
}

void similarity_of_head(const KVView& keys, std::int64_t head, float* out) {
  detail::with_storage_type(
      keys.dtype, [&](auto element) { head_similarity<decltype(element)>(keys, head, out); });
}

void copy_row(const KVView& src, std::int64_t head, std::int64_t token, void* dst,
              std::int64_t slot) {
  const std::size_t bytes = static_cast<std::size_t>(src.dim) * dtype_size(src.dtype);
  std::memcpy(static_cast<char*>(dst) + slot * bytes, src.row(head, token), bytes);
}

void* row_at(void* base, const KVView& like, std::int64_t slot) {
  return static_cast<char*>(base) +
         static_cast<std::size_t>(slot * like.dim) * dtype_size(like.dtype);
}

// Folds tokens [first, last] of `head` into slot `slot`: Gaussian weights around the
// highest-scoring member. scratch holds the weights and the two float sums.
template <class T>
void merge_run(const KVView& keys, const KVView& values, std::int64_t head, const float* scores,
               std::int64_t first, std::int64_t last, float sigma, std::int64_t slot,
               const HeadSlots& out, std::vector<float>& scratch) {
  const std::int64_t dim = keys.dim, n = last - first + 1;
  const std::int64_t pivot =
      std::max_element(scores + first, scores + last + 1) - scores;  // ties: first
  scratch.resize(static_cast<std::size_t>(n + 2 * dim));
  float* weights = scratch.data();
  float* key_sum = weights + n;
  float* value_sum = key_sum + dim;
  const T* pivot_key = static_cast<const T*>(keys.row(head, pivot));
  double spread = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    weights[i] = squared_distance(static_cast<const T*>(keys.row(head, first + i)), pivot_key, dim);
    spread += weights[i];
  }
  // Data-driven width: the RMS distance of the other members to the pivot.
  const double var =
      sigma > 0.0f ? static_cast<double>(sigma) * sigma : spread / static_cast<double>(n - 1);
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    weights[i] = var > 0.0 ? static_cast<float>(std::exp(-weights[i] / (2.0 * var))) : 1.0f;
    total += weights[i];
  }
  std::fill(key_sum, key_sum + 2 * dim, 0.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    const float w = static_cast<float>(weights[i] / total);
    axpy(w, static_cast<const T*>(keys.row(head, first + i)), key_sum, dim);
    axpy(w, static_cast<const T*>(values.row(head, first + i)), value_sum, dim);
  }
  from_float(key_sum, dim, keys.dtype, row_at(out.keys, keys, slot));
  from_float(value_sum, dim, values.dtype, row_at(out.values, values, slot));
  out.counts[slot] = static_cast<std::int32_t>(n);
  out.positions[slot] = static_cast<std::int32_t>(pivot);
}

}  // namespace

void adjacent_similarity(const KVView& keys, float* out) {
  if (keys.tokens < 2) return;
  parallel_for(keys.heads,
               [&](std::int64_t h) { similarity_of_head(keys, h, out + h * (keys.tokens - 1)); });
}

void kvmerger_default_protection(double fraction, float* recent, float* heavy) {
  if (fraction >= 0.5) {
    *recent = 0.17f;
    *heavy = 0.12f;
  } else if (fraction >= 0.35) {
    const double t = (fraction - 0.35) / 0.15;
    *recent = static_cast<float>(0.08 + t * (0.17 - 0.08));
    *heavy = static_cast<float>(0.02 + t * (0.12 - 0.02));
  } else {
    *recent = static_cast<float>(0.08 * fraction / 0.35);
    *heavy = static_cast<float>(0.02 * fraction / 0.35);
  }
}

float kvmerger_head(const KVView& keys, const KVView& values, std::int64_t head,
                    const float* scores, std::int64_t budget, const KVMergerParams& params,
                    const HeadSlots& out) {
  const std::int64_t tokens = keys.tokens;
  float share_recent = params.protect_recent, share_heavy = params.protect_heavy;
  float default_recent = 0.0f, default_heavy = 0.0f;
  kvmerger_default_protection(static_cast<double>(budget) / static_cast<double>(tokens),
                              &default_recent, &default_heavy);
  if (share_recent < 0.0f) share_recent = default_recent;
  if (share_heavy < 0.0f) share_heavy = default_heavy;
  const auto recent = static_cast<std::int64_t>(
      std::llround(static_cast<double>(share_recent) * static_cast<double>(tokens)));
  const auto heavy = static_cast<std::int64_t>(
      std::llround(static_cast<double>(share_heavy) * static_cast<double>(tokens)));
  KVPACK_CHECK(recent + heavy <= budget, "protect_recent, protect_heavy: protecting "
                                             << recent << " recent + " << heavy
                                             << " heavy tokens leaves no room in a "
                                                "budget of "
                                             << budget);

  std::vector<std::uint8_t> keep(static_cast<std::size_t>(tokens), 0);  // protected tokens
  std::fill(keep.end() - recent, keep.end(), 1);
  for (std::int32_t t : top_k_set(scores, tokens - recent, heavy)) keep[t] = 1;

  // Candidate links: adjacent pairs of unprotected tokens, ranked by similarity.
  std::vector<float> similarity(static_cast<std::size_t>(std::max<std::int64_t>(tokens - 1, 0)));
  similarity_of_head(keys, head, similarity.data());
  for (const float s : similarity)  // NaN would break the ranking; Inf keys give NaN here
    KVPACK_CHECK(!std::isnan(s), "keys: contain NaN or Inf (head " << head << ")");
  std::vector<std::int32_t> link_at;
  std::vector<float> link_similarity;
  link_at.reserve(similarity.size());
  link_similarity.reserve(similarity.size());
  for (std::int64_t t = 0; t + 1 < tokens; ++t) {
    if (keep[t] || keep[t + 1]) continue;
    link_at.push_back(static_cast<std::int32_t>(t));
    link_similarity.push_back(similarity[t]);
  }
  const std::int64_t merges = tokens - budget;
  KVPACK_CHECK(merges <= static_cast<std::int64_t>(link_at.size()),
               "budget: KVMerger can fold at most "
                   << link_at.size() << " tokens of head " << head << " (" << recent + heavy
                   << " protected), not the " << merges << " a budget of " << budget
                   << " needs; lower protect_recent / protect_heavy or raise the budget");
  std::vector<std::uint8_t> linked(static_cast<std::size_t>(tokens), 0);  // t merges with t+1
  float threshold = std::numeric_limits<float>::infinity();
  for (std::int32_t c : top_k_set(link_similarity.data(), link_at.size(), merges)) {
    linked[link_at[c]] = 1;
    threshold = std::min(threshold, link_similarity[c]);
  }

  std::vector<float> scratch;
  std::int64_t slot = 0;
  detail::with_storage_type(keys.dtype, [&](auto element) {
    using T = decltype(element);
    for (std::int64_t first = 0; first < tokens; ++slot) {
      std::int64_t last = first;
      while (linked[last]) ++last;
      if (last == first) {
        copy_row(keys, head, first, out.keys, slot);
        copy_row(values, head, first, out.values, slot);
        out.counts[slot] = 1;
        out.positions[slot] = static_cast<std::int32_t>(first);
      } else {
        merge_run<T>(keys, values, head, scores, first, last, params.sigma, slot, out, scratch);
      }
      first = last + 1;
    }
  });
  KVPACK_CHECK(slot == budget,
               "kvmerger: produced " << slot << " slots for a budget of " << budget);
  return threshold;
}

void cam_head(const KVView& keys, const KVView& values, std::int64_t head, const float* scores,
              std::int64_t budget, const CaMParams& params, const HeadSlots& out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  const std::int64_t sinks = std::min(params.sinks, budget), window = budget - sinks;
  const std::int64_t evicted_end = tokens - window;  // tokens [sinks, evicted_end) leave
  std::vector<float> merged;                         // float values of tokens >= sinks
  if (window > 0 && evicted_end > sinks) {
    merged.resize(static_cast<std::size_t>((tokens - sinks) * dim));
    for (std::int64_t t = sinks; t < tokens; ++t)
      to_float(values.row(head, t), values.dtype, dim, merged.data() + (t - sinks) * dim);
    std::vector<double> prefix(static_cast<std::size_t>(tokens + 1), 0.0);
    for (std::int64_t t = 0; t < tokens; ++t) prefix[t + 1] = prefix[t] + scores[t];
    const std::int64_t spread = params.merge_window;
    for (std::int64_t e = sinks; e < evicted_end; ++e) {
      // When e leaves, the window holds e + 1 .. e + window; as CaM's reference code, its
      // score is compared with their mean (the sinks, which often draw most attention,
      // would make every merge improbable).
      const double kept_mean =
          (prefix[e + window + 1] - prefix[e + 1]) / static_cast<double>(window);
      const double p = kept_mean > 0.0 ? std::min(1.0, std::max(0.0, scores[e] / kept_mean)) : 0.0;
      if (p == 0.0) continue;
      const float share = static_cast<float>(p / static_cast<double>(spread));
      const float* from = merged.data() + (e - sinks) * dim;
      const std::int64_t last = std::min(e + spread, e + window);
      for (std::int64_t j = e + 1; j <= last; ++j) {
        float* to = merged.data() + (j - sinks) * dim;
#pragma omp simd
        for (std::int64_t c = 0; c < dim; ++c) to[c] += share * from[c];
      }
    }
  }
  for (std::int64_t slot = 0; slot < budget; ++slot) {
    const std::int64_t t = slot < sinks ? slot : evicted_end + (slot - sinks);
    copy_row(keys, head, t, out.keys, slot);
    if (merged.empty() || t < sinks) {
      copy_row(values, head, t, out.values, slot);
    } else {
      from_float(merged.data() + (t - sinks) * dim, dim, values.dtype,
                 row_at(out.values, values, slot));
    }
    out.counts[slot] = 1;
    out.positions[slot] = static_cast<std::int32_t>(t);
  }
}

void compress_head(const KVMergerParams& params, const HeadInput& in, const HeadSlots& out) {
  const float threshold =
      kvmerger_head(in.keys, in.values, in.head, in.scores, in.slots, params, out);
  if (out.threshold) *out.threshold = threshold;
}

void compress_head(const CaMParams& params, const HeadInput& in, const HeadSlots& out) {
  cam_head(in.keys, in.values, in.head, in.scores, in.slots, params, out);
}

}  // namespace kvpack
