// The decode-time recall object of one layer: the full KV cache stays in a slow tier,
// each step selects tokens (ClusterKV's semantic clusters or Quest's pages) and attends
// them: score -> select -> gather -> attention. With a fast tier, the tokens recalled in
// the last R steps stay there and a step loads only the misses; without one (the host
// backend, where both tiers would be the same memory) the step attends the selected
// tokens where they are and counts what a fast tier would have hit and loaded.
// With refine > 1 the method recalls refine x budget candidates, the step scores them
// exactly and keeps the budget with the highest q . k, attending them from those scores.
// With slow_bits the slow tier holds the prompt as KIVI codes: a step scores and attends
// the recalled tokens from their codes (only theirs are read), decoded tokens stay exact.
// With adaptive head budgets the rows of a step share rows x budget tokens (AdaKV's split
// of their refined candidates), so rows attend different numbers of tokens.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/method.h"
#include "kvpack/quant.h"
#include "kvpack/selector.h"

namespace kvpack {

/// What one step moved between the tiers (token counts summed over KV heads).
struct RecallStats {
  std::int64_t steps = 0;         ///< decode steps counted
  std::int64_t selected = 0;      ///< distinct tokens attended
  std::int64_t hits = 0;          ///< of them recalled in the last R steps (fast-tier hits)
  std::int64_t loaded = 0;        ///< of them not (what a fast tier loads)
  std::int64_t bytes_loaded = 0;  ///< K and V bytes of the loaded tokens (codes where coded)
  std::int64_t candidates = 0;    ///< keys scored exactly to refine the selection (over rows)
};

class RecallCache {
 public:
  explicit RecallCache(const RecallMethod& method);

  /// Takes the prompt's keys and values [heads_kv, tokens, dim] (copied into the slow
  /// tier) and builds the index.
  void prefill(const KVView& keys, const KVView& values);

  /// One decode step: appends the new token (new_key, new_value: [heads_kv, 1, dim],
  /// the dtype of the prefill), selects, loads the misses and attends.
  /// @param q      size heads_q * dim float32
  /// @param out    size heads_q * dim float32
  /// @param rules  the model's scale, softcap and sinks (as held_attention applies them;
  ///               window 0: a recall layer is a global one). With a softcap or sinks the
  ///               step scores its selection as a refined one does, and attends from them.
  void step(const float* q, std::int64_t heads_q, const KVView& new_key, const KVView& new_value,
            float* out, const ScoreRules& rules = {});

  const RecallStats& last_step() const { return last_; }
  const RecallStats& total() const { return total_; }
  /// Token ids attended in the last step, row r at [last_offsets()[r], last_offsets()[r+1]),
  /// ascending per row (rows of one size unless the head budgets are adaptive).
  const std::vector<std::int32_t>& last_selection() const { return selection_; }
  const std::vector<std::int64_t>& last_offsets() const { return offsets_; }
  std::int64_t last_rows() const { return selection_rows_; }
  /// What the method recalled before the refinement kept last_selection() (refine > 1):
  /// rows * last_candidate_count() token ids, ascending per row; empty otherwise.
  const std::vector<std::int32_t>& last_candidates() const { return candidates_; }
  std::int64_t last_candidate_count() const { return candidate_count_; }
  std::int64_t tokens() const { return tokens_; }
  std::int64_t heads() const { return heads_; }
  std::int64_t dim() const { return dim_; }
  DType dtype() const { return dtype_; }
  const RecallMethod& method() const { return method_; }
  const RecallParams& params() const { return params_; }
  /// The method's selector; null before the prefill.
  const Selector* selector() const { return selector_.get(); }
  /// The slow tier's exact rows: every token's keys / values, or with slow_bits the
  /// tokens after the prompt (token exact_from() + i at row i).
  KVView keys() const;
  KVView values() const;
  std::int64_t exact_from() const { return base_; }
  /// The prompt's KIVI codes (slow_bits), else null.
  const QuantizedKV* codes() const { return codes_.get(); }
  /// Key and value bytes each tier holds (the slow tier's spare capacity included): its
  /// exact rows, and its codes (slow_bits).
  std::int64_t slow_tier_bytes() const {
    return static_cast<std::int64_t>(keys_.size() + values_.size());
  }
  std::int64_t code_bytes() const { return codes_ ? codes_->nbytes() : 0; }
  std::int64_t fast_tier_bytes() const {
    return static_cast<std::int64_t>(fast_keys_.size() + fast_values_.size());
  }

 private:
  void append_rows(const KVView& k, const KVView& v);
  // Gives the slow tier room for `capacity` tokens per head (keeping what it holds).
  void reserve_rows(std::int64_t capacity);
  // Makes every token of `needed` (per KV head) resident; returns their slots in order.
  void recall(const std::vector<std::vector<std::int32_t>>& needed, RecallStats& stats);
  std::int32_t take_slot(std::int64_t head, std::int32_t token);
  // Counts hits and misses of `needed` as a fast tier with R steps would, moving nothing.
  void count_recalls(const std::vector<std::vector<std::int32_t>>& needed, RecallStats& stats);
  // Attends `rows` selections of `count` tokens (ascending ids) in the slow tier.
  void attend_in_place(const float* q, std::int64_t heads_q, std::int64_t rows, std::int64_t count,
                       float scale, float* out) const;
  // Recalls refine x budget candidates per row into candidates_ and keeps in selection_
  // (rows at offsets_) the `count` per row with the highest exact q . k, or with adaptive
  // head budgets rows * count split by AdaKV's rule; the always attended tokens first.
  // Writes the kept tokens' scores (scaled, then capped by rules.softcap) to scores: per
  // row, its n_q query heads' row each.
  void refine_selection(const float* q, std::int64_t heads_q, bool per_q, std::int64_t count,
                        const ScoreRules& rules, std::vector<float>& scores);
  // Attends selection_ from its scores (refine_selection's), reading the values where they
  // are resident; sinks (null or [heads_q]) join each softmax.
  void attend_scored(const std::vector<float>& scores, std::int64_t heads_q, bool per_q,
                     const float* sinks, float* out) const;
  // Tokens [0, n) of `head` (ascending ids) as float32 rows [n, dim] into keys and values
  // (either may be null), from the codes or the exact rows where each is held.
  void rows_as_float(std::int64_t head, const std::int32_t* tokens, std::int64_t n, float* keys,
                     float* values) const;
  // Sizes the per-token bookkeeping to tokens_.
  void track_tokens();
  // Empties the fast tier and gives it `slots` rows per head.
  void reset_fast_tier(std::int64_t slots);

  RecallMethod method_;
  RecallParams params_;  // what every recall method shares, read from method_
  std::unique_ptr<Selector> selector_;
  DType dtype_ = DType::Float32;
  std::int64_t heads_ = 0, dim_ = 0, tokens_ = 0, capacity_ = 0, step_ = 0;
  std::unique_ptr<QuantizedKV> codes_;                  // slow_bits: the prompt's codes
  std::int64_t base_ = 0;                               // tokens before keys_' first row
  std::vector<unsigned char> keys_, values_;            // slow tier: heads * capacity_ * dim
  std::int64_t slots_ = 0;                              // fast-tier rows per head
  std::vector<unsigned char> fast_keys_, fast_values_;  // heads * slots_ * dim
  std::vector<std::vector<std::int32_t>> slot_of_;      // per head: token -> slot or -1
  std::vector<std::vector<std::int64_t>> recalled_at_;  // in place, per head: token -> step
  std::vector<std::vector<std::int32_t>> token_in_;     // per head: slot -> token or -1
  std::vector<std::vector<std::int64_t>> last_used_;    // per head: slot -> step
  std::vector<std::vector<std::int32_t>> free_slots_;   // per head
  std::vector<std::int32_t> selection_;
  std::vector<std::int64_t> offsets_;  // selection_rows_ + 1: where each row starts
  std::int64_t selection_rows_ = 0;
  std::vector<std::int32_t> candidates_;  // refine > 1: rows * candidate_count_
  std::int64_t candidate_count_ = 0;
  RecallStats last_, total_;
};

/// One decode step of a batch of sequences, each with its own cache: for every row b and
/// then every new position i in order, exactly caches[b]->step(queries[b, i], heads_q,
/// keys[b, :, i], values[b, :, i], out[b, i], rules).
/// @param caches   size keys.batch, each prefilled with keys.heads heads of keys.dim
/// @param queries  size keys.batch * keys.tokens * heads_q * keys.dim float32,
///                 [batch, new, heads_q, dim] (token-major, as attention outputs are)
/// @param keys, values  [batch, heads_kv, new, dim] in the caches' dtype
/// @param out      size of queries, [batch, new, heads_q, dim]
void recall_step(RecallCache* const* caches, const float* queries, std::int64_t heads_q,
                 const BatchKVView& keys, const BatchKVView& values, float* out,
                 const ScoreRules& rules = {});

}  // namespace kvpack
