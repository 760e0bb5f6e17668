#include "kvpack/recall_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"

namespace kvpack {

namespace {
constexpr std::int64_t kNever = -(std::int64_t{1} << 62);  // a step no recency window reaches
// Coded tokens are expanded to float32 this many rows at a time, which stay in L1.
constexpr std::int64_t kCodedChunk = 64;
}  // namespace

RecallCache::RecallCache(const RecallMethod& method)
    : method_(method), params_(std::visit([](const RecallParams& p) { return p; }, method)) {
  KVPACK_CHECK(params_.budget >= 1, "budget: expected >= 1, got " << params_.budget);
  KVPACK_CHECK(params_.recall_steps >= 1,
               "recall_steps: expected >= 1, got " << params_.recall_steps);
  KVPACK_CHECK(params_.refine >= 1, "refine: expected >= 1, got " << params_.refine);
  KVPACK_CHECK(params_.slow_bits == 0 || params_.slow_bits == 4 || params_.slow_bits == 8,
               "slow_bits: expected 0 (exact), 4 or 8, got " << params_.slow_bits);
  KVPACK_CHECK(params_.slow_group >= 1, "slow_group: expected >= 1, got " << params_.slow_group);
  KVPACK_CHECK(!(params_.slow_bits && params_.fast_tier),
               "fast_tier: a slow tier of codes (slow_bits) is attended in place; expected "
               "fast_tier False");
  KVPACK_CHECK(!params_.heads.adaptive || params_.refine >= 2,
               "adaptive: the heads share the budget among their refined candidates; expected "
               "refine >= 2, got "
                   << params_.refine);
  check_method(method_);
}

KVView RecallCache::keys() const {
  return KVView{keys_.data(), dtype_, heads_, tokens_ - base_, dim_, capacity_ * dim_};
}

KVView RecallCache::values() const {
  return KVView{values_.data(), dtype_, heads_, tokens_ - base_, dim_, capacity_ * dim_};
}

void RecallCache::track_tokens() {
  for (auto& slots : slot_of_) slots.resize(static_cast<std::size_t>(tokens_), -1);
  for (auto& steps : recalled_at_) steps.resize(static_cast<std::size_t>(tokens_), kNever);
}

void RecallCache::append_rows(const KVView& k, const KVView& v) {
  const std::size_t elem = dtype_size(dtype_);
  const std::int64_t held = tokens_ - base_;
  // Grow by a quarter: a copy every capacity/4 tokens keeps appends cheap on average
  // while the slow tier stays within 1.25x of the tokens it holds.
  if (held + k.tokens > capacity_)
    reserve_rows(std::max(held + k.tokens, capacity_ + std::max<std::int64_t>(64, capacity_ / 4)));
  const std::size_t row_bytes = static_cast<std::size_t>(dim_) * elem;
  for (std::int64_t h = 0; h < heads_; ++h)
    for (std::int64_t i = 0; i < k.tokens; ++i) {
      std::memcpy(keys_.data() + ((h * capacity_ + held + i) * dim_) * elem, k.row(h, i),
                  row_bytes);
      std::memcpy(values_.data() + ((h * capacity_ + held + i) * dim_) * elem, v.row(h, i),
                  row_bytes);
    }
  tokens_ += k.tokens;
  track_tokens();
}

void RecallCache::reserve_rows(std::int64_t capacity) {
  if (capacity <= capacity_) return;
  const std::size_t elem = dtype_size(dtype_);
  std::vector<unsigned char> nk(static_cast<std::size_t>(heads_ * capacity * dim_) * elem),
      nv(nk.size());
  for (std::int64_t h = 0; h < heads_ && tokens_ > base_; ++h) {
    const std::size_t bytes = static_cast<std::size_t>((tokens_ - base_) * dim_) * elem;
    std::memcpy(nk.data() + h * capacity * dim_ * elem, keys_.data() + h * capacity_ * dim_ * elem,
                bytes);
    std::memcpy(nv.data() + h * capacity * dim_ * elem,
                values_.data() + h * capacity_ * dim_ * elem, bytes);
  }
  keys_ = std::move(nk);
  values_ = std::move(nv);
  capacity_ = capacity;
}

void RecallCache::prefill(const KVView& keys, const KVView& values) {
  KVPACK_CHECK(keys.data && values.data && keys.heads >= 1 && keys.tokens >= 1 && keys.dim >= 1,
               "keys: expected a non-empty [heads_kv, tokens, head_dim] cache");
  KVPACK_CHECK(values.heads == keys.heads && values.tokens == keys.tokens &&
                   values.dim == keys.dim && values.dtype == keys.dtype,
               "values: expected the shape and dtype of keys");
  // The index first: a prompt it rejects leaves the cache as it was.
  std::unique_ptr<Selector> selector = make_selector(method_, keys);
  std::unique_ptr<QuantizedKV> codes;
  if (params_.slow_bits)
    codes = std::make_unique<QuantizedKV>(
        keys, values,
        QuantParams{static_cast<int>(params_.slow_bits), params_.slow_group, params_.slow_group});
  dtype_ = keys.dtype;
  heads_ = keys.heads;
  dim_ = keys.dim;
  tokens_ = capacity_ = step_ = base_ = 0;
  keys_.clear();
  values_.clear();
  codes_ = std::move(codes);
  last_ = total_ = RecallStats{};
  selection_.clear();
  offsets_.clear();
  candidates_.clear();
  selection_rows_ = candidate_count_ = 0;
  slot_of_.assign(static_cast<std::size_t>(params_.fast_tier ? heads_ : 0), {});
  recalled_at_.assign(static_cast<std::size_t>(params_.fast_tier ? 0 : heads_), {});
  // Room for the first decoded tokens, so the first decode steps do not copy the slow tier.
  if (codes_) {  // the prompt lives in the codes; the exact rows start after it
    tokens_ = base_ = keys.tokens;
    reserve_rows(selector->decode_room());
    track_tokens();
  } else {
    reserve_rows(keys.tokens + selector->decode_room());
    append_rows(keys, values);
  }
  selector_ = std::move(selector);
  // The fast tier holds what the last R steps recalled (for every query head of a
  // group when heads select on their own), never more than every token once.
  const std::int64_t recall_steps = std::min(params_.recall_steps, tokens_);
  reset_fast_tier(
      params_.fast_tier ? std::min(recall_steps * std::min(params_.budget, tokens_), tokens_) : 0);
}

void RecallCache::reset_fast_tier(std::int64_t slots) {
  slots_ = slots;
  const std::size_t elem = dtype_size(dtype_);
  fast_keys_.assign(static_cast<std::size_t>(heads_ * slots_ * dim_) * elem, 0);
  fast_values_.assign(fast_keys_.size(), 0);
  token_in_.assign(static_cast<std::size_t>(heads_),
                   std::vector<std::int32_t>(static_cast<std::size_t>(slots_), -1));
  last_used_.assign(static_cast<std::size_t>(heads_),
                    std::vector<std::int64_t>(static_cast<std::size_t>(slots_), -1));
  free_slots_.assign(static_cast<std::size_t>(heads_), {});
  for (auto& free : free_slots_)
    for (std::int64_t s = slots_ - 1; s >= 0; --s) free.push_back(static_cast<std::int32_t>(s));
  for (auto& slots_of_head : slot_of_) std::fill(slots_of_head.begin(), slots_of_head.end(), -1);
}

std::int32_t RecallCache::take_slot(std::int64_t head, std::int32_t token) {
  auto& free = free_slots_[static_cast<std::size_t>(head)];
  KVPACK_CHECK(!free.empty(), "internal: fast tier full");
  const std::int32_t slot = free.back();
  free.pop_back();
  token_in_[static_cast<std::size_t>(head)][static_cast<std::size_t>(slot)] = token;
  slot_of_[static_cast<std::size_t>(head)][static_cast<std::size_t>(token)] = slot;
  const std::size_t elem = dtype_size(dtype_), row = static_cast<std::size_t>(dim_) * elem;
  std::memcpy(fast_keys_.data() + (head * slots_ + slot) * dim_ * elem,
              keys_.data() + (head * capacity_ + token) * dim_ * elem, row);
  std::memcpy(fast_values_.data() + (head * slots_ + slot) * dim_ * elem,
              values_.data() + (head * capacity_ + token) * dim_ * elem, row);
  return slot;
}

void RecallCache::recall(const std::vector<std::vector<std::int32_t>>& needed, RecallStats& stats) {
  const std::int64_t row_bytes = 2 * dim_ * static_cast<std::int64_t>(dtype_size(dtype_));
  std::vector<RecallStats> per_head(static_cast<std::size_t>(heads_));
  parallel_for(heads_, [&](std::int64_t h) {
    auto& slot_of = slot_of_[static_cast<std::size_t>(h)];
    auto& token_in = token_in_[static_cast<std::size_t>(h)];
    auto& last_used = last_used_[static_cast<std::size_t>(h)];
    const auto& tokens = needed[static_cast<std::size_t>(h)];
    RecallStats& s = per_head[static_cast<std::size_t>(h)];
    // Hits are marked first so eviction spares them.
    for (std::int32_t t : tokens) {
      const std::int32_t slot = slot_of[static_cast<std::size_t>(t)];
      if (slot >= 0) {
        last_used[static_cast<std::size_t>(slot)] = step_;
        ++s.hits;
      }
    }
    // Evict what no step of the last R used.
    for (std::int64_t slot = 0; slot < slots_; ++slot) {
      const std::int32_t t = token_in[static_cast<std::size_t>(slot)];
      if (t >= 0 && last_used[static_cast<std::size_t>(slot)] <= step_ - params_.recall_steps) {
        slot_of[static_cast<std::size_t>(t)] = -1;
        token_in[static_cast<std::size_t>(slot)] = -1;
        free_slots_[static_cast<std::size_t>(h)].push_back(static_cast<std::int32_t>(slot));
      }
    }
    for (std::int32_t t : tokens) {
      if (slot_of[static_cast<std::size_t>(t)] >= 0) continue;
      const std::int32_t slot = take_slot(h, t);
      last_used[static_cast<std::size_t>(slot)] = step_;
      ++s.loaded;
    }
    s.selected = static_cast<std::int64_t>(tokens.size());
  });
  for (const RecallStats& s : per_head) {
    stats.selected += s.selected;
    stats.hits += s.hits;
    stats.loaded += s.loaded;
  }
  stats.bytes_loaded = stats.loaded * row_bytes;
}

void RecallCache::step(const float* q, std::int64_t heads_q, const KVView& new_key,
                       const KVView& new_value, float* out, const ScoreRules& rules) {
  KVPACK_CHECK(tokens_ > 0, "step: call prefill first");
  KVPACK_CHECK(rules.window == 0 && rules.softcap >= 0.0f,
               "rules: expected window 0 (a recall layer sees every token) and softcap >= 0");
  KVPACK_CHECK(
      new_key.heads == heads_ && new_key.tokens == 1 && new_key.dim == dim_ &&
          new_key.dtype == dtype_,
      "new_key: expected [" << heads_ << ", " << dim_ << "] of dtype " << dtype_name(dtype_));
  KVPACK_CHECK(
      new_value.heads == heads_ && new_value.tokens == 1 && new_value.dim == dim_ &&
          new_value.dtype == dtype_,
      "new_value: expected [" << heads_ << ", " << dim_ << "] of dtype " << dtype_name(dtype_));
  KVPACK_CHECK(heads_q >= 1 && heads_q % heads_ == 0,
               "q: expected heads_q to be a positive multiple of heads_kv=" << heads_ << ", got "
                                                                            << heads_q);
  const std::int64_t group = heads_q / heads_;
  ++step_;
  append_rows(new_key, new_value);

  // Select.
  const bool per_q = params_.per_query_head && group > 1;
  const std::int64_t rows = per_q ? heads_q : heads_;
  selector_->append(new_key);
  // ClusterKV attends the unclustered decoded tokens on top of the budget.
  const std::int64_t count = selector_->selection_size(params_.budget);
  selection_rows_ = rows;
  // Refined or coded selections, and those of a model that caps its scores or adds sinks,
  // are scored here and attended from those scores.
  const bool refined = params_.refine > 1 || codes_ || rules.softcap > 0.0f || rules.sinks;
  std::vector<float> scores;  // refined: the selection's scores
  if (refined) {
    refine_selection(q, heads_q, per_q, count, rules, scores);
  } else {
    selection_.assign(static_cast<std::size_t>(rows * count), 0);
    offsets_.resize(static_cast<std::size_t>(rows + 1));
    for (std::int64_t r = 0; r <= rows; ++r) offsets_[r] = r * count;
    selector_->select(q, heads_q, params_.budget, per_q, selection_.data());
  }
  std::int64_t widest = 0;  // the most tokens a row attends (count unless adaptive)
  for (std::int64_t r = 0; r < rows; ++r) widest = std::max(widest, offsets_[r + 1] - offsets_[r]);

  // The fast tier must hold every selected token of a group at once; when query heads
  // select on their own it is resized (and refilled) on the first step that needs more.
  // A head's fast tier never holds more than every token once, however large R is.
  const std::int64_t rows_per_head = per_q ? group : 1;
  const std::int64_t recall_steps = std::min(params_.recall_steps, tokens_);
  const std::int64_t need_slots = std::min(recall_steps * widest * rows_per_head, tokens_);
  if (params_.fast_tier && need_slots > slots_) {
    // Room at once for the largest selection to come (the budget, or with adaptive head
    // budgets all of a row's candidates, and a full unclustered window), so the growing
    // window never empties the fast tier.
    const std::int64_t on_top = selector_->most_on_top();
    const std::int64_t row_most =
        std::min(params_.budget, tokens_) *
        (params_.heads.adaptive ? std::min(params_.refine, tokens_) : std::int64_t{1});
    const std::int64_t most = std::min(row_most, tokens_) + on_top;
    reset_fast_tier(
        std::min(std::max(need_slots, recall_steps * most * rows_per_head), tokens_ + on_top));
  }

  // Gather: make the selection resident, loading only the misses.
  std::vector<std::vector<std::int32_t>> needed(static_cast<std::size_t>(heads_));
  for (std::int64_t r = 0; r < rows; ++r) {
    auto& n = needed[static_cast<std::size_t>(per_q ? r / group : r)];
    n.insert(n.end(), selection_.begin() + offsets_[r], selection_.begin() + offsets_[r + 1]);
  }
  if (per_q)  // a head's rows overlap; a single row is ascending and distinct already
    for (auto& n : needed) {
      std::sort(n.begin(), n.end());
      n.erase(std::unique(n.begin(), n.end()), n.end());
    }
  last_ = RecallStats{};
  last_.steps = 1;
  last_.candidates = static_cast<std::int64_t>(candidates_.size());
  if (params_.fast_tier)
    recall(needed, last_);
  else
    count_recalls(needed, last_);
  total_.steps += 1;
  total_.selected += last_.selected;
  total_.hits += last_.hits;
  total_.loaded += last_.loaded;
  total_.bytes_loaded += last_.bytes_loaded;
  total_.candidates += last_.candidates;

  // The refined selection's scores are what attention scores: they are not computed again.
  if (refined) {
    attend_scored(scores, heads_q, per_q, rules.sinks, out);
    return;
  }
  if (!params_.fast_tier) {
    attend_in_place(q, heads_q, rows, count, rules.scale, out);
    return;
  }
  // Attend over the fast tier at the selected tokens' slots.
  std::vector<std::int32_t> slots(selection_.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto& slot_of = slot_of_[static_cast<std::size_t>(per_q ? r / group : r)];
    std::int32_t* row = slots.data() + r * count;
    for (std::int64_t i = 0; i < count; ++i)
      row[i] = slot_of[static_cast<std::size_t>(selection_[r * count + i])];
    std::sort(row, row + count);
  }
  const KVView fk{fast_keys_.data(), dtype_, heads_, slots_, dim_};
  const KVView fv{fast_values_.data(), dtype_, heads_, slots_, dim_};
  const IndexView index{slots.data(), rows, count};
  AttentionOutput output;
  output.out = out;
  decode_attention(q, heads_q, fk, fv, &index, nullptr, AttentionParams{rules.scale}, output);
}

void RecallCache::refine_selection(const float* q, std::int64_t heads_q, bool per_q,
                                   std::int64_t count, const ScoreRules& rules,
                                   std::vector<float>& scores) {
  const std::int64_t group = heads_q / heads_;
  const std::int64_t rows = per_q ? heads_q : heads_, n_q = per_q ? 1 : group;
  const std::int64_t budget = params_.budget;
  const std::vector<std::int32_t> always = selector_->always_attended(budget);
  // Candidates beyond the budget only where the always attended tokens leave room; the
  // product stays below 2^62 (tokens < 2^31, refine capped at tokens).
  const std::int64_t wide = params_.refine > 1 && static_cast<std::int64_t>(always.size()) < count
                                ? std::min(budget, tokens_) * std::min(params_.refine, tokens_)
                                : budget;
  const std::int64_t n = selector_->selection_size(wide);
  candidate_count_ = n;
  candidates_.assign(static_cast<std::size_t>(rows * n), 0);
  selector_->select(q, heads_q, wide, per_q, candidates_.data());
  const float scale = resolve_scale(rules.scale, dim_);
  const bool adaptive = params_.heads.adaptive;
  const KVView k = keys();
  // Exact q . k of every candidate for each query head of a row (as attention scores them),
  // then the row's ranking score: their sum over the group, or with adaptive head budgets
  // the sum of their softmax weights over the candidates (comparable across rows).
  std::vector<float> dots(static_cast<std::size_t>(rows * n_q * n));
  std::vector<float> rank(static_cast<std::size_t>(rows * n));
  std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(rows));
  parallel_for(rows, [&](std::int64_t r) {
    const std::int64_t head = per_q ? r / group : r, first_q = per_q ? r : r * group;
    const std::int32_t* candidates = candidates_.data() + r * n;
    float* row_dots = dots.data() + r * n_q * n;
    if (codes_) {  // from the recalled tokens' codes, a chunk at a time (it stays in cache)
      std::vector<float> rows_f(static_cast<std::size_t>(kCodedChunk * dim_));
      for (std::int64_t at = 0; at < n; at += kCodedChunk) {
        const std::int64_t m = std::min(kCodedChunk, n - at);
        rows_as_float(head, candidates + at, m, rows_f.data(), nullptr);
        for (std::int64_t g = 0; g < n_q; ++g)
          inner_products(rows_f.data(), m, dim_, q + (first_q + g) * dim_, row_dots + g * n + at);
      }
    } else {
      gather_scores(q + first_q * dim_, n_q, k, head, candidates, n, row_dots);
    }
    float* row_rank = rank.data() + r * n;
    std::fill(row_rank, row_rank + n, 0.0f);
    for (std::int64_t g = 0; g < n_q; ++g) {
      const float* d = row_dots + g * n;
      if (!adaptive) {
        for (std::int64_t j = 0; j < n; ++j) row_rank[j] += d[j];
        continue;
      }
      std::vector<float> w(static_cast<std::size_t>(n));
      for (std::int64_t j = 0; j < n; ++j) w[j] = capped_score(d[j] * scale, rules.softcap);
      const float top = n ? *std::max_element(w.begin(), w.end()) : 0.0f;
      float sum = 0.0f;
      for (auto& x : w) sum += (x = std::exp(x - top));
      for (std::int64_t j = 0; j < n; ++j) row_rank[j] += w[j] / sum;
    }
    // The always attended tokens rank first (both lists ascending).
    for (std::int64_t j = 0, a = 0; j < n && a < static_cast<std::int64_t>(always.size()); ++j) {
      while (a < static_cast<std::int64_t>(always.size()) && always[a] < candidates[j]) ++a;
      if (a < static_cast<std::int64_t>(always.size()) && always[a] == candidates[j])
        row_rank[j] = std::numeric_limits<float>::infinity();
    }
    if (adaptive) return;  // the rows' ranks are pooled below
    // top_k_set keeps candidate order: the kept tokens stay ascending.
    if (n > count) {
      kept[r] = top_k_set(row_rank, n, count);
    } else {  // every candidate is kept
      kept[r].resize(static_cast<std::size_t>(n));
      std::iota(kept[r].begin(), kept[r].end(), 0);
    }
  });
  if (adaptive)  // AdaKV: rows * count of the pooled ranks, each row at least its floor
    kept = pooled_top_k(rank.data(), rows, n, count, head_budget_floor(params_.heads, count));
  offsets_.assign(static_cast<std::size_t>(rows + 1), 0);
  for (std::int64_t r = 0; r < rows; ++r)
    offsets_[r + 1] = offsets_[r] + static_cast<std::int64_t>(kept[r].size());
  selection_.assign(static_cast<std::size_t>(offsets_[rows]), 0);
  scores.assign(static_cast<std::size_t>(offsets_[rows] * n_q), 0.0f);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int32_t* candidates = candidates_.data() + r * n;
    const std::int64_t size = offsets_[r + 1] - offsets_[r];
    for (std::int64_t i = 0; i < size; ++i) {
      const std::int32_t j = kept[r][i];
      selection_[offsets_[r] + i] = candidates[j];
      for (std::int64_t g = 0; g < n_q; ++g)
        scores[offsets_[r] * n_q + g * size + i] =
            capped_score(dots[(r * n_q + g) * n + j] * scale, rules.softcap);
    }
  }
  if (params_.refine == 1) {  // the method's own selection: nothing to report as candidates
    candidates_.clear();
    candidate_count_ = 0;
  }
}

void RecallCache::rows_as_float(std::int64_t head, const std::int32_t* tokens, std::int64_t n,
                                float* keys, float* values) const {
  // Ascending ids: the coded prompt's first, then the exact rows after it.
  const std::int64_t coded =
      codes_ ? std::lower_bound(tokens, tokens + n, static_cast<std::int32_t>(base_)) - tokens : 0;
  if (coded > 0) codes_->dequantize_rows(head, tokens, coded, keys, values);
  const std::size_t elem = dtype_size(dtype_);
  for (std::int64_t i = coded; i < n; ++i) {
    const std::size_t row = static_cast<std::size_t>((head * capacity_ + tokens[i] - base_) * dim_);
    if (keys) to_float(keys_.data() + row * elem, dtype_, dim_, keys + i * dim_);
    if (values) to_float(values_.data() + row * elem, dtype_, dim_, values + i * dim_);
  }
}

void RecallCache::attend_scored(const std::vector<float>& scores, std::int64_t heads_q, bool per_q,
                                const float* sinks, float* out) const {
  const std::int64_t group = heads_q / heads_;
  const std::int64_t rows = per_q ? heads_q : heads_, n_q = per_q ? 1 : group;
  const KVView slow = values();
  const KVView fast{fast_values_.data(), dtype_, heads_, slots_, dim_};
  parallel_for(rows, [&](std::int64_t r) {
    const std::int64_t head = per_q ? r / group : r, first_q = per_q ? r : r * group;
    const std::int64_t count = offsets_[r + 1] - offsets_[r];
    // Softmax weights of each query head over the row's tokens (and its sink, which
    // attends nothing).
    std::vector<float> weights(scores.begin() + offsets_[r] * n_q,
                               scores.begin() + offsets_[r + 1] * n_q);
    for (std::int64_t g = 0; g < n_q; ++g) {
      float* w = weights.data() + g * count;
      const float* sink = sinks ? sinks + first_q + g : nullptr;
      float top = sink ? *sink : -std::numeric_limits<float>::infinity();
      for (std::int64_t i = 0; i < count; ++i) top = std::max(top, w[i]);
      float sum = sink ? std::exp(*sink - top) : 0.0f;
      for (std::int64_t i = 0; i < count; ++i) sum += (w[i] = std::exp(w[i] - top));
      for (std::int64_t i = 0; i < count; ++i) w[i] /= sum;
    }
    // The values where they are resident: the slow tier's tokens, or their fast-tier slots.
    const std::int32_t* tokens = selection_.data() + offsets_[r];
    std::vector<std::int32_t> slots;
    if (params_.fast_tier) {
      const auto& slot_of = slot_of_[static_cast<std::size_t>(head)];
      for (std::int64_t i = 0; i < count; ++i)
        slots.push_back(slot_of[static_cast<std::size_t>(tokens[i])]);
    }
    if (codes_) {  // the kept tokens' values from their codes, a chunk of rows at a time
      std::vector<float> rows_f(static_cast<std::size_t>(kCodedChunk * dim_));
      std::vector<float> chunk_weights(static_cast<std::size_t>(n_q * kCodedChunk));
      std::vector<float> part(static_cast<std::size_t>(n_q * dim_));
      std::vector<std::int32_t> order(static_cast<std::size_t>(kCodedChunk));
      std::iota(order.begin(), order.end(), 0);
      float* row_out = out + first_q * dim_;
      std::fill(row_out, row_out + n_q * dim_, 0.0f);
      for (std::int64_t at = 0; at < count; at += kCodedChunk) {
        const std::int64_t m = std::min(kCodedChunk, count - at);
        rows_as_float(head, tokens + at, m, nullptr, rows_f.data());
        for (std::int64_t g = 0; g < n_q; ++g)
          std::copy_n(weights.data() + g * count + at, m, chunk_weights.data() + g * m);
        const KVView gathered{rows_f.data(), DType::Float32, 1, m, dim_};
        weighted_value_sum(chunk_weights.data(), n_q, gathered, 0, order.data(), m, part.data());
        for (std::int64_t i = 0; i < n_q * dim_; ++i) row_out[i] += part[i];
      }
      return;
    }
    weighted_value_sum(weights.data(), n_q, params_.fast_tier ? fast : slow, head,
                       params_.fast_tier ? slots.data() : tokens, count, out + first_q * dim_);
  });
}

void RecallCache::count_recalls(const std::vector<std::vector<std::int32_t>>& needed,
                                RecallStats& stats) {
  const std::int64_t row_bytes = 2 * dim_ * static_cast<std::int64_t>(dtype_size(dtype_));
  // A coded token loads its key and value codes and its value ranges (its key ranges are
  // shared by its token group).
  const std::int64_t coded_below = codes_ ? codes_->quantized() : 0;
  const std::int64_t code_bytes = 2 * ((dim_ * params_.slow_bits + 7) / 8) +
                                  4 * ((dim_ + params_.slow_group - 1) / params_.slow_group);
  std::int64_t loaded_coded = 0;
  for (std::int64_t h = 0; h < heads_; ++h) {
    auto& recalled_at = recalled_at_[static_cast<std::size_t>(h)];
    for (std::int32_t t : needed[static_cast<std::size_t>(h)]) {
      std::int64_t& at = recalled_at[static_cast<std::size_t>(t)];
      if (at >= step_ - params_.recall_steps) {
        ++stats.hits;
      } else {
        ++stats.loaded;
        loaded_coded += t < coded_below;
      }
      at = step_;
    }
    stats.selected += static_cast<std::int64_t>(needed[static_cast<std::size_t>(h)].size());
  }
  stats.bytes_loaded = (stats.loaded - loaded_coded) * row_bytes + loaded_coded * code_bytes;
}

void RecallCache::attend_in_place(const float* q, std::int64_t heads_q, std::int64_t rows,
                                  std::int64_t count, float scale, float* out) const {
  const IndexView index{selection_.data(), rows, count};
  AttentionOutput output;
  output.out = out;
  decode_attention(q, heads_q, keys(), values(), &index, nullptr, AttentionParams{scale}, output);
}

void recall_step(RecallCache* const* caches, const float* queries, std::int64_t heads_q,
                 const BatchKVView& keys, const BatchKVView& values, float* out,
                 const ScoreRules& rules) {
  KVPACK_CHECK(values.batch == keys.batch && values.heads == keys.heads &&
                   values.tokens == keys.tokens && values.dim == keys.dim,
               "values: expected the shape of keys");
  const std::int64_t size = heads_q * keys.dim;
  // Rows are independent, positions of a row in order; each step runs its heads in parallel.
  for (std::int64_t b = 0; b < keys.batch; ++b)
    for (std::int64_t i = 0; i < keys.tokens; ++i) {
      const std::int64_t at = (b * keys.tokens + i) * size;
      caches[b]->step(queries + at, heads_q, keys.row(b, i, 1), values.row(b, i, 1), out + at,
                      rules);
    }
}

}  // namespace kvpack
