#include "kvpack/evict.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "kvpack/attention.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"

namespace kvpack {

void streaming_keep(std::int64_t tokens, std::int64_t budget, std::int64_t sinks,
                    std::int32_t* out) {
  const std::int64_t head = std::min(sinks, budget);
  std::iota(out, out + head, 0);
  std::iota(out + head, out + budget, static_cast<std::int32_t>(tokens - (budget - head)));
}

void h2o_ranks(const float* scores, std::int64_t tokens, std::int64_t recent, float* out) {
  const std::int64_t older = tokens - std::clamp<std::int64_t>(recent, 0, tokens);
  std::copy(scores, scores + older, out);
  std::fill(out + older, out + tokens, std::numeric_limits<float>::infinity());
}

void snapkv_ranks(const float* scores, std::int64_t tokens, std::int64_t window,
                  std::int64_t kernel, float* out) {
  const std::int64_t older = tokens - std::clamp<std::int64_t>(window, 0, tokens);
  const std::int64_t half = kernel / 2;
  // Pooling lets a token ride on a strong neighbour, so kept tokens come in spans.
  for (std::int64_t t = 0; t < older; ++t) {
    const float* first = scores + std::max<std::int64_t>(0, t - half);
    const float* last = scores + std::min(older, t + half + 1);
    out[t] = *std::max_element(first, last);
  }
  std::fill(out + older, out + tokens, std::numeric_limits<float>::infinity());
}

namespace {

// The budget highest of `ranks` (size tokens), ascending, into out.
void keep_highest(const float* ranks, std::int64_t tokens, std::int64_t budget, std::int32_t* out) {
  const std::vector<std::int32_t> kept = top_k_set(ranks, tokens, budget);
  std::copy(kept.begin(), kept.end(), out);
}

}  // namespace

void h2o_keep(const float* scores, std::int64_t tokens, std::int64_t budget, std::int64_t recent,
              std::int32_t* out) {
  std::vector<float> ranks(static_cast<std::size_t>(tokens));
  h2o_ranks(scores, tokens, std::clamp<std::int64_t>(recent, 0, budget), ranks.data());
  keep_highest(ranks.data(), tokens, budget, out);
}

void snapkv_keep(const float* scores, std::int64_t tokens, std::int64_t budget, std::int64_t window,
                 std::int64_t kernel, std::int32_t* out) {
  std::vector<float> ranks(static_cast<std::size_t>(tokens));
  snapkv_ranks(scores, tokens, std::min(window, budget), kernel, ranks.data());
  keep_highest(ranks.data(), tokens, budget, out);
}

namespace {

// Decoded tokens a cache below its budget has room for before it grows.
constexpr std::int64_t kDecodeRoom = 64;

// The latest tokens H2O keeps out of `budget`.
std::int64_t h2o_recent(const H2OParams& params, std::int64_t budget) {
  return static_cast<std::int64_t>(
      std::lround(static_cast<double>(params.recent_ratio) * static_cast<double>(budget)));
}

}  // namespace

void compress_head(const StreamingLLMParams& params, const HeadInput& in, const HeadSlots& out) {
  streaming_keep(in.keys.tokens, in.slots, params.sinks, out.positions);
  keep_rows(in, out);
}

void compress_head(const H2OParams& params, const HeadInput& in, const HeadSlots& out) {
  h2o_keep(in.scores, in.keys.tokens, in.slots, h2o_recent(params, in.slots), out.positions);
  keep_rows(in, out);
}

void compress_head(const SnapKVParams& params, const HeadInput& in, const HeadSlots& out) {
  snapkv_keep(in.scores, in.keys.tokens, in.slots, params.window, params.kernel, out.positions);
  keep_rows(in, out);
}

void token_ranks(const H2OParams& params, const HeadInput& in, float* out) {
  h2o_ranks(in.scores, in.keys.tokens, h2o_recent(params, in.slots), out);
}

void token_ranks(const SnapKVParams& params, const HeadInput& in, float* out) {
  snapkv_ranks(in.scores, in.keys.tokens, std::min(params.window, in.slots), params.kernel, out);
}

EvictionCache::EvictionCache(const EvictionCacheParams& params) : params_(params) {
  KVPACK_CHECK(params.budget >= 1, "budget: expected >= 1, got " << params.budget);
  const auto* ranked = std::get_if<H2OParams>(&params.policy);
  KVPACK_CHECK(!ranked || !ranked->adaptive,
               "adaptive: the decode-time EvictionCache keeps budget tokens in every head; "
               "adaptive head budgets are for compress");
  if (const auto* streaming = std::get_if<StreamingLLMParams>(&params.policy))
    KVPACK_CHECK(streaming->sinks >= 0, "sinks: expected >= 0, got " << streaming->sinks);
  if (const auto* h2o = std::get_if<H2OParams>(&params.policy))
    KVPACK_CHECK(h2o->recent_ratio >= 0.0f && h2o->recent_ratio <= 1.0f,
                 "recent_ratio: expected a value in [0, 1], got " << h2o->recent_ratio);
}

void EvictionCache::reserve(std::int64_t capacity) {
  if (capacity <= capacity_) return;
  const std::size_t row = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  const std::size_t slots = static_cast<std::size_t>(heads_ * capacity);
  std::vector<unsigned char> keys(slots * row), values(slots * row);
  std::vector<std::int32_t> positions(slots, 0);
  std::vector<float> scores(slots, 0.0f);
  for (std::int64_t h = 0; h < heads_ && size_ > 0; ++h) {
    const std::size_t from = static_cast<std::size_t>(h * capacity_), to = h * capacity;
    std::memcpy(keys.data() + to * row, keys_.data() + from * row, size_ * row);
    std::memcpy(values.data() + to * row, values_.data() + from * row, size_ * row);
    std::copy_n(positions_.data() + from, size_, positions.data() + to);
    std::copy_n(scores_.data() + from, size_, scores.data() + to);
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  positions_ = std::move(positions);
  scores_ = std::move(scores);
  capacity_ = capacity;
}

KVView EvictionCache::view(const std::vector<unsigned char>& data) const {
  KVView v;
  v.data = data.data();
  v.dtype = dtype_;
  v.heads = heads_;
  v.tokens = size_;
  v.dim = dim_;
  v.head_stride = capacity_ * dim_;
  return v;
}

KVView EvictionCache::keys() const {
  return view(keys_);
}
KVView EvictionCache::values() const {
  return view(values_);
}

void EvictionCache::write_slot(std::int64_t head, std::int64_t slot, const void* key,
                               const void* value) {
  const std::size_t row = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  const std::size_t at = static_cast<std::size_t>(head * capacity_ + slot) * row;
  if (keys_.data() + at != key) std::memcpy(keys_.data() + at, key, row);
  if (values_.data() + at != value) std::memcpy(values_.data() + at, value, row);
}

void EvictionCache::prefill(const KVView& keys, const KVView& values, const Evidence& evidence) {
  const H2OParams* h2o = std::get_if<H2OParams>(&params_.policy);
  KVPACK_CHECK(keys.tokens >= 1, "keys: expected at least one token, got " << keys.tokens);
  const std::vector<float> evidence_copy =
      h2o ? evidence_scores(keys, evidence) : std::vector<float>();
  const float* scores = evidence_copy.data();
  heads_ = keys.heads;
  dim_ = keys.dim;
  dtype_ = keys.dtype;
  // Memory follows what is held, not the budget: a short prompt with a huge budget holds
  // the prompt plus room for some decoded tokens, and grows by a quarter when it is full.
  size_ = capacity_ = 0;
  keys_.clear();
  values_.clear();
  positions_.clear();
  scores_.clear();
  reserve(std::min(params_.budget, keys.tokens + kDecodeRoom) + 1);
  size_ = std::min(keys.tokens, params_.budget);
  seen_ = keys.tokens;
  const std::int64_t recent = h2o ? h2o_recent(*h2o, params_.budget) : 0;
  parallel_for(heads_, [&](std::int64_t h) {
    std::int32_t* kept = positions_.data() + h * capacity_;
    if (h2o)
      h2o_keep(scores + h * keys.tokens, keys.tokens, size_, recent, kept);
    else
      streaming_keep(keys.tokens, size_, std::get<StreamingLLMParams>(params_.policy).sinks, kept);
    for (std::int64_t s = 0; s < size_; ++s) {
      write_slot(h, s, keys.row(h, kept[s]), values.row(h, kept[s]));
      if (h2o) scores_[h * capacity_ + s] = scores[h * keys.tokens + kept[s]];
    }
  });
}

std::int64_t EvictionCache::victim(std::int64_t head) const {
  const std::int32_t* pos = positions_.data() + head * capacity_;
  std::int64_t best = -1;
  if (const auto* streaming = std::get_if<StreamingLLMParams>(&params_.policy)) {
    const std::int64_t sinks = std::min(streaming->sinks, params_.budget);
    for (std::int64_t s = 0; s < size_; ++s)
      if (pos[s] >= sinks && (best < 0 || pos[s] < pos[best])) best = s;
    return best;
  }
  const std::int64_t recent = h2o_recent(std::get<H2OParams>(params_.policy), params_.budget);
  const float* score = scores_.data() + head * capacity_;
  for (std::int64_t s = 0; s < size_; ++s) {
    if (pos[s] >= seen_ - recent) continue;  // inside the recent window
    if (best < 0 || score[s] < score[best] || (score[s] == score[best] && pos[s] < pos[best]))
      best = s;
  }
  return best;
}

void EvictionCache::step(const float* q, std::int64_t heads_q, const KVView& new_key,
                         const KVView& new_value, float* out) {
  KVPACK_CHECK(heads_ > 0, "prefill: call prefill before step");
  KVPACK_CHECK(heads_q > 0 && heads_q % heads_ == 0,  // checked before any state changes
               "q: expected heads_q to be a positive multiple of heads_kv=" << heads_ << ", got "
                                                                            << heads_q);
  if (size_ == capacity_)  // below the budget: room for the new token and the next ones
    reserve(std::min(params_.budget + 1, capacity_ + std::max(kDecodeRoom, capacity_ / 4)));
  for (std::int64_t h = 0; h < heads_; ++h) {
    write_slot(h, size_, new_key.row(h, 0), new_value.row(h, 0));
    positions_[h * capacity_ + size_] = static_cast<std::int32_t>(seen_);
    scores_[h * capacity_ + size_] = 0.0f;
  }
  ++size_;
  ++seen_;
  weights_.resize(static_cast<std::size_t>(heads_q * size_));
  AttentionParams attention;
  attention.scale = params_.scale;
  decode_attention(q, heads_q, keys(), values(), nullptr, nullptr, attention,
                   AttentionOutput{out, nullptr, weights_.data()});
  if (std::holds_alternative<H2OParams>(params_.policy)) {
    const std::int64_t group = heads_q / heads_;
    for (std::int64_t g = 0; g < heads_q; ++g) {
      float* score = scores_.data() + (g / group) * capacity_;
      const float* w = weights_.data() + g * size_;
      for (std::int64_t s = 0; s < size_; ++s) score[s] += w[s];
    }
  }
  if (size_ <= params_.budget) return;
  const std::size_t row = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  const std::int64_t last = size_ - 1;
  for (std::int64_t h = 0; h < heads_; ++h) {
    const std::int64_t v = victim(h);
    if (v != last) {  // the last slot fills the hole, so slots stay packed
      const std::size_t from = static_cast<std::size_t>(h * capacity_ + last) * row;
      write_slot(h, v, keys_.data() + from, values_.data() + from);
      positions_[h * capacity_ + v] = positions_[h * capacity_ + last];
      scores_[h * capacity_ + v] = scores_[h * capacity_ + last];
    }
  }
  --size_;
}

}  // namespace kvpack
