// The eviction baselines: which tokens StreamingLLM, H2O and SnapKV keep out of a
// prompt's cache, and the decode-time cache that keeps a generating model within a
// fixed number of slots per head (StreamingLLM's rolling window, H2O's running sums).
#pragma once

#include <cstdint>
#include <variant>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/method.h"

namespace kvpack {

/// StreamingLLM: the attention sinks and the latest tokens.
struct StreamingLLMParams {
  static constexpr const char* name = "streaming_llm";
  static constexpr const char* class_name = "StreamingLLM";
  static constexpr const char* summary = "StreamingLLM: the attention sinks and the latest tokens.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = 2;

  std::int64_t sinks = 4;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"sinks", ParamRule::Count, "First tokens always kept (attention sinks).", 0},
      p.sinks);
  }
};

/// H2O: the heavy hitters by accumulated attention and the latest tokens.
struct H2OParams : HeadBudgetParams {
  static constexpr const char* name = "h2o";
  static constexpr const char* class_name = "H2O";
  static constexpr const char* summary =
      "H2O: the heavy hitters by accumulated attention and the latest tokens.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = true;
  static constexpr int blob_code = 4;

  float recent_ratio = 0.5f;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"recent_ratio", ParamRule::Share, "Share of the budget held by the latest tokens."},
      p.recent_ratio);
    each_head_budget_param(p, f);
  }
};

/// SnapKV: the tokens the observation window attends most (max-pooled), and the window.
struct SnapKVParams : HeadBudgetParams {
  static constexpr const char* name = "snapkv";
  static constexpr const char* class_name = "SnapKV";
  static constexpr const char* summary =
      "SnapKV: the tokens the observation window attends most (max-pooled), and the window.";
  static constexpr MethodKind kind = MethodKind::Compress;
  static constexpr bool ranks_by_attention = true;
  static constexpr int blob_code = 3;

  std::int64_t window = 32;
  std::int64_t kernel = 5;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"window", ParamRule::Count,
                "Observation window: the prompt's last queries, and tokens always kept.", 1},
      p.window);
    f(ParamSpec{"kernel", ParamRule::OddCount, "Max-pooling width over neighbouring tokens (odd).",
                1},
      p.kernel);
    each_head_budget_param(p, f);
  }
};

inline std::int64_t observation_window(const SnapKVParams& p) {
  return p.window;
}

/// Each method's compression of one head (see compress.h).
void compress_head(const StreamingLLMParams& params, const HeadInput& in, const HeadSlots& out);
void compress_head(const H2OParams& params, const HeadInput& in, const HeadSlots& out);
void compress_head(const SnapKVParams& params, const HeadInput& in, const HeadSlots& out);

/// The score each token of in.head ranks by when the method keeps in.slots of them (the
/// in.slots highest are its choice): +inf for the tokens it always keeps (H2O's latest,
/// SnapKV's window), then the evidence (H2O) or its max-pooling (SnapKV).
/// @param out  size in.keys.tokens
void token_ranks(const H2OParams& params, const HeadInput& in, float* out);
void token_ranks(const SnapKVParams& params, const HeadInput& in, float* out);

/// H2O's ranking: `scores` with the latest `recent` tokens at +inf.
/// @param scores  size tokens: attention each token received
/// @param out     size tokens
void h2o_ranks(const float* scores, std::int64_t tokens, std::int64_t recent, float* out);

/// SnapKV's ranking: each older token's score max-pooled over `kernel` neighbours (older
/// tokens only), the last `window` tokens (the observation window) at +inf.
/// @param scores  size tokens: attention the observation window gave each token
/// @param out     size tokens
void snapkv_ranks(const float* scores, std::int64_t tokens, std::int64_t window,
                  std::int64_t kernel, float* out);

/// StreamingLLM: the first min(sinks, budget) tokens and the latest ones.
/// @param out  size budget (<= tokens): kept positions, ascending
void streaming_keep(std::int64_t tokens, std::int64_t budget, std::int64_t sinks,
                    std::int32_t* out);

/// H2O: the latest `recent` tokens plus the budget - recent older tokens with the
/// highest accumulated attention (the budget highest of h2o_ranks).
/// @param scores  size tokens: attention each token received
/// @param out     size budget (<= tokens): kept positions, ascending
void h2o_keep(const float* scores, std::int64_t tokens, std::int64_t budget, std::int64_t recent,
              std::int32_t* out);

/// SnapKV: the last min(window, budget) tokens (the observation window) plus the older
/// tokens whose window attention, max-pooled over `kernel` neighbours, is highest (the
/// budget highest of snapkv_ranks with window min(window, budget)).
/// @param scores  size tokens: attention the observation window gave each token
/// @param out     size budget (<= tokens): kept positions, ascending
void snapkv_keep(const float* scores, std::int64_t tokens, std::int64_t budget, std::int64_t window,
                 std::int64_t kernel, std::int32_t* out);

/// Parameters of EvictionCache.
struct EvictionCacheParams {
  /// Which token a full cache drops at each step: StreamingLLM the oldest after the
  /// sinks, H2O the lowest accumulated attention outside the recent window.
  std::variant<StreamingLLMParams, H2OParams> policy = H2OParams{};
  std::int64_t budget = 1024;  ///< slots per KV head kept between steps
  float scale = 0.0f;          ///< attention score scale; 0 means 1/sqrt(head_dim)
};

/// A bounded decode-time cache for one layer: at most `budget` tokens per KV head
/// survive each step. Slots are unordered (positions() tells which token each holds);
/// attention does not depend on slot order because keys carry their rotary phase.
class EvictionCache {
 public:
  explicit EvictionCache(const EvictionCacheParams& params);

  /// Starts from a prompt's cache [heads, tokens, dim], keeping the policy's choice of
  /// at most budget tokens per head. H2O needs the evidence (it keeps summing from the
  /// accumulated attention); StreamingLLM ignores it.
  void prefill(const KVView& keys, const KVView& values, const Evidence& evidence);

  /// One decode step: appends the new token (new_key, new_value: [heads, 1, dim] in the
  /// prefill's dtype), attends q [heads_q, dim] over the kept tokens into out
  /// [heads_q, dim], adds this step's attention weights to H2O's sums, and evicts one
  /// token per head when more than budget remain.
  void step(const float* q, std::int64_t heads_q, const KVView& new_key, const KVView& new_value,
            float* out);

  std::int64_t heads() const { return heads_; }
  std::int64_t dim() const { return dim_; }
  DType dtype() const { return dtype_; }
  std::int64_t size() const { return size_; }  ///< tokens held per head
  /// Slots per head allocated: at most budget + 1 (room for the new token before one is
  /// evicted), fewer while the cache holds fewer tokens.
  std::int64_t capacity() const { return capacity_; }
  std::int64_t seen() const { return seen_; }  ///< tokens the sequence holds so far
  const EvictionCacheParams& params() const { return params_; }

  /// [heads, size(), dim] views of the held keys and values (head stride capacity * dim).
  KVView keys() const;
  KVView values() const;
  /// Original position of each slot: heads * capacity(), the first size() of each row valid.
  const std::int32_t* positions() const { return positions_.data(); }
  /// H2O's accumulated attention per slot, laid out like positions().
  const float* scores() const { return scores_.data(); }

 private:
  KVView view(const std::vector<unsigned char>& data) const;
  // Gives every head room for `capacity` slots, keeping what it holds.
  void reserve(std::int64_t capacity);
  void write_slot(std::int64_t head, std::int64_t slot, const void* key, const void* value);
  std::int64_t victim(std::int64_t head) const;

  EvictionCacheParams params_;
  DType dtype_ = DType::Float32;
  std::int64_t heads_ = 0, dim_ = 0, capacity_ = 0, size_ = 0, seen_ = 0;
  std::vector<unsigned char> keys_, values_;  // [heads, capacity, dim] in dtype_
  std::vector<std::int32_t> positions_;       // [heads, capacity]
  std::vector<float> scores_;                 // [heads, capacity]
  std::vector<float> weights_;                // [heads_q, capacity]: the last step's softmax
};

}  // namespace kvpack
