// What a KV-cache method is made of. A method is one parameter struct: its name, its
// kind, the doc line users see, and its parameters (each field with its default, and a
// ParamSpec saying what values it takes). methods.h lists the structs; the enum-free
// registry, the Python classes, the store's codecs and the stubs are all derived from
// that list. A compression method also provides compress_head() for one KV head.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvpack/common.h"

namespace kvpack {

struct Evidence;

/// How a method meets its budget.
enum class MethodKind : int {
  Compress = 0,  ///< at prefill: `budget` slots per KV head kept, merged or dropped
  Recall = 1,    ///< at each decode step: `budget` tokens recalled from the whole cache
  Quantize = 2,  ///< everything kept as low-bit codes, the latest `budget` tokens exact
};

/// "compress", "recall" or "quantize".
const char* kind_name(MethodKind kind);

/// What values a parameter takes, and how its Python value maps to the field.
enum class ParamRule : int {
  Count,          ///< an int >= lowest
  OddCount,       ///< an odd int >= lowest
  OptionalCount,  ///< an int >= lowest, or None (0 in the field: chosen automatically)
  Share,          ///< a number in [0, 1]
  NonNegative,    ///< a finite number >= 0
  OptionalShare,  ///< a share, or None (< 0 in the field: the method's own schedule)
  Width,          ///< a positive number, or 'auto' (0 in the field: chosen from the data)
  Flag,           ///< a bool
  Bits,           ///< 2, 4 or 8
  KMeansInit,     ///< 'kmeans++' or 'random'
};

/// One parameter of a method: its name in every API, its rule and its doc line.
struct ParamSpec {
  const char* name;
  ParamRule rule;
  const char* doc;
  std::int64_t lowest = 0;  ///< Count, OddCount, OptionalCount: the smallest value
};

/// Where compress_head writes one KV head's compressed slots: `slots` rows each.
struct HeadSlots {
  void* keys = nullptr;               ///< slots * dim elements in the input dtype
  void* values = nullptr;             ///< slots * dim elements in the input dtype
  std::int32_t* counts = nullptr;     ///< slots: original tokens each slot stands for
  std::int32_t* positions = nullptr;  ///< slots: the position each slot keeps, ascending
  float* threshold = nullptr;         ///< may be null: a merging method's lowest similarity merged
};

/// One KV head of a compress call: what a compression method reads.
struct HeadInput {
  KVView keys;    ///< the layer's keys [heads, tokens, dim]
  KVView values;  ///< the layer's values, shaped like keys
  std::int64_t head = 0;
  /// tokens: attention each token received (methods that rank by attention), else null
  const float* scores = nullptr;
  std::int64_t slots = 0;  ///< slots to fill, 1 <= slots <= tokens
  /// the compress call's evidence, for methods that read the queries themselves
  const Evidence* evidence = nullptr;
};

/// The rows of in.head at out.positions (filled by the caller) copied to out, counts 1:
/// the last step of every method that keeps tokens rather than merging them.
void keep_rows(const HeadInput& in, const HeadSlots& out);

/// The in.slots tokens of highest `ranks` (one per token) kept, ascending, by keep_rows:
/// compress_head of every method that ranks tokens one by one.
void keep_highest_ranked(const float* ranks, const HeadInput& in, const HeadSlots& out);

/// How a layer's heads * budget slots (or recalled tokens) are split among its heads, as the
/// compression methods that keep the tokens a score ranks highest (H2O, SnapKV, KeyDiff,
/// Expected Attention) and the recall methods share it. Uniform (budget each), or AdaKV's
/// adaptive split: every head's token scores of the layer pooled and the best heads * budget
/// kept, each head keeping at least its best max(1, floor(adaptive_floor * budget)) (the
/// floor), so heads whose attention is spread out get more slots than heads whose attention
/// is concentrated on a few tokens.
struct HeadBudgetParams {
  bool adaptive = false;
  float adaptive_floor = 0.2f;

  template <class Self, class F>
  static void each_head_budget_param(Self& p, F&& f) {
    f(ParamSpec{"adaptive", ParamRule::Flag,
                "AdaKV: the layer's heads share heads * budget slots (recall: tokens per step) "
                "by their pooled scores (False: budget each)."},
      p.adaptive);
    f(ParamSpec{"adaptive_floor", ParamRule::Share,
                "With adaptive: share of the budget each head keeps at least (AdaKV's "
                "safeguard; at least one slot)."},
      p.adaptive_floor);
  }
};

/// What the recall methods (ClusterKV, Quest) share: how a step attends what they select.
struct RecallParams {
  /// Tokens attended per step (per KV head or query head); ClusterKV attends its decoded
  /// tokens not yet clustered (at most index.append_interval) on top of it.
  std::int64_t budget = 1024;
  std::int64_t recall_steps = 1;
  bool per_query_head = false;
  /// Worth it where the fast tier is faster memory (a GPU's); on the host both tiers are
  /// host memory and the copies only cost time, so the step attends in place instead.
  bool fast_tier = false;
  /// Candidates the method recalls per budget token before the step keeps the `budget` of
  /// them with the highest exact q . k (1: the method's own selection, as its paper does).
  std::int64_t refine = 1;
  /// 0: the slow tier holds the prompt's keys and values as given; 4 or 8: as KIVI codes of
  /// that many bits (keys per channel over slow_group tokens, values per token over
  /// slow_group channels), the prompt's last slow_group tokens and every decoded one exact.
  std::int64_t slow_bits = 0;
  std::int64_t slow_group = 128;
  /// adaptive: each step the rows (KV heads, or query heads) share rows * budget tokens by
  /// the softmax of their refined candidates' exact scores (so refine >= 2).
  HeadBudgetParams heads;

  template <class Self, class F>
  static void each_recall_param(Self& p, F&& f) {
    f(ParamSpec{"refine", ParamRule::Count,
                "Recall refine x budget candidates, then keep the budget tokens with the highest "
                "exact q.k among them (1: the method's own selection).",
                1},
      p.refine);
    f(ParamSpec{"recall_steps", ParamRule::Count,
                "R: tokens recalled in the last R steps stay in the fast tier.", 1},
      p.recall_steps);
    f(ParamSpec{"per_query_head", ParamRule::Flag,
                "Each query head selects its own tokens (GQA) instead of one set per KV head."},
      p.per_query_head);
    f(ParamSpec{"fast_tier", ParamRule::Flag,
                "Copy recalled tokens into a fast tier kept for R steps (False: attend in "
                "place)."},
      p.fast_tier);
    f(ParamSpec{"slow_bits", ParamRule::Count,
                "0: the slow tier holds the prompt as given; 4 or 8: as KIVI codes of that many "
                "bits, ranked and attended from the codes (the last slow_group prompt tokens "
                "and the decoded ones exact).",
                0},
      p.slow_bits);
    f(ParamSpec{"slow_group", ParamRule::Count,
                "Tokens per key range and channels per value range of the slow tier's codes.", 1},
      p.slow_group);
    HeadBudgetParams::each_head_budget_param(p.heads, f);
  }
};

/// Whether a method keeps the tokens a per-token score ranks highest, and so can split a
/// layer's budget among its heads (HeadBudgetParams); it then provides
/// token_ranks(params, in, out).
template <class Params>
inline constexpr bool ranks_tokens = std::is_base_of_v<HeadBudgetParams, Params>;

/// The slots of a head's share of the adaptive split: at least one.
std::int64_t head_budget_floor(const HeadBudgetParams& params, std::int64_t budget);

/// Prompt queries a compression method observes (0: all it is given); SnapKV overloads it.
template <class Params>
std::int64_t observation_window(const Params&) {
  return 0;
}

/// Whether a compression method reads the prompt's queries themselves rather than the
/// attention they paid (then only queries serve as its evidence); Expected Attention
/// overloads it.
template <class Params>
constexpr bool reads_queries(const Params&) {
  return false;
}

}  // namespace kvpack
