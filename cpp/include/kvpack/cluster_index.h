// ClusterKV's index of one layer: the keys of every KV head clustered by cosine
// k-means, stored as centroids plus a CSR list of member tokens, and the selection of
// whole clusters for a decode query. Tokens decoded later wait in a window that is
// always attended until enough of them arrive to be clustered in turn. The ClusterKV
// method's parameters (ClusterKVParams) sit beside the index they configure.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvpack/common.h"
#include "kvpack/kmeans.h"
#include "kvpack/method.h"

namespace kvpack {

/// Parameters of a ClusterIndex (defaults from the ClusterKV paper).
struct ClusterIndexParams {
  std::int64_t n_clusters = 0;           ///< prefill clusters per head; 0: clustered tokens / 80
  std::int64_t tokens_per_cluster = 80;  ///< used when n_clusters is 0
  std::int64_t sink = 16;                ///< first tokens never clustered, always attended
  int iterations = 20;                   ///< k-means rounds
  std::uint64_t seed = 0;                ///< k-means seed
  KMeansInit init = KMeansInit::PlusPlus;
  std::int64_t append_interval = 320;  ///< decoded tokens clustered together (m)
  std::int64_t append_clusters = 8;    ///< clusters made from them (C+)
};

/// Immutable arrays of the index, shared with views handed out (a new snapshot is
/// made whenever clusters are added, so earlier views stay valid).
struct ClusterArrays {
  std::int64_t clusters = 0;          ///< per head
  std::int64_t clustered = 0;         ///< clustered tokens per head
  std::vector<float> centroids;       ///< heads * clusters * dim: mean of the member keys
  std::vector<std::int32_t> sizes;    ///< heads * clusters
  std::vector<std::int32_t> offsets;  ///< heads * (clusters + 1), CSR into order
  std::vector<std::int32_t> order;    ///< heads * clustered: members by cluster, then position
  std::vector<std::int32_t> labels;   ///< heads * end: cluster of each token, -1 for sinks
  std::int64_t end = 0;               ///< tokens [0, end) are sinks or clustered
};

class ClusterIndex {
 public:
  /// Clusters the keys [heads, tokens, dim] (tokens after the sinks).
  ClusterIndex(const KVView& keys, const ClusterIndexParams& params);

  /// Adds new tokens' keys [heads, n, dim]; clusters every append_interval of them.
  void append(const KVView& new_keys);

  /// Selects tokens for the query q [heads_q, dim]: `budget` of the clustered range
  /// (sinks and the last `window` tokens always, then whole clusters by q . centroid, the
  /// last one cut to fit), and on top of it the appended tokens not yet clustered, as
  /// ClusterKV does; right after they were clustered, the newest appended token (a decode
  /// step's own). Rows are per KV head (the group's scores summed) or, when
  /// per_query_head, per query head.
  /// @param out          size rows * selection_size(budget), ascending per row
  /// @param used_clusters null, or one list per row of the clusters that contributed
  void select(const float* q, std::int64_t heads_q, std::int64_t budget, std::int64_t window,
              bool per_query_head, std::int32_t* out,
              std::vector<std::vector<std::int32_t>>* used_clusters = nullptr) const;

  /// Tokens per row that select returns for `budget`: up to `budget` of the clustered
  /// range, plus the tokens always attended on top of it (on_top()).
  std::int64_t selection_size(std::int64_t budget) const {
    const std::int64_t in_range = arrays_->end - (newest_clustered() ? 1 : 0);
    return (budget < in_range ? budget : in_range) + on_top();
  }
  /// Tokens every selection holds whatever the query, ascending: the sinks, the last
  /// `window` tokens and the tokens on top of the budget.
  std::vector<std::int32_t> always_attended(std::int64_t window) const;

  /// Tokens attended on top of the budget: the unclustered appended tokens, or the newest
  /// appended token when it was just clustered.
  std::int64_t on_top() const { return tokens_ - arrays_->end + (newest_clustered() ? 1 : 0); }

  std::int64_t heads() const { return heads_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t tokens() const { return tokens_; }
  std::int64_t sink() const { return sink_; }
  const ClusterIndexParams& params() const { return params_; }
  std::shared_ptr<const ClusterArrays> arrays() const { return arrays_; }

 private:
  // Clusters the rows of `keys` ([heads, count, dim], any dtype and head stride), which
  // are tokens [first, first + count), into k clusters per head and appends them.
  void add_clusters(const KVView& keys, std::int64_t first, std::int64_t k);

  ClusterIndexParams params_;
  // True when the newest token was appended after the prompt and is already clustered.
  bool newest_clustered() const { return tokens_ > prompt_tokens_ && arrays_->end == tokens_; }

  std::int64_t heads_ = 0, dim_ = 0, tokens_ = 0, sink_ = 0, prompt_tokens_ = 0;
  std::shared_ptr<const ClusterArrays> arrays_;
  std::vector<std::vector<float>>
      pending_;  // per head: pending_tokens_ * dim float keys not yet clustered
  std::int64_t pending_tokens_ = 0;
};

/// The automatic cluster count keeps the mean cluster at most budget / this many tokens.
inline constexpr std::int64_t kClustersPerBudget = 12;

/// ClusterKV: keys clustered by cosine k-means; each decode step recalls whole clusters
/// until the budget is filled.
struct ClusterKVParams : RecallParams {
  static constexpr const char* name = "clusterkv";
  static constexpr const char* class_name = "ClusterKV";
  static constexpr const char* summary =
      "ClusterKV: keys clustered by cosine k-means; each decode step recalls whole clusters "
      "until the budget is filled.";
  static constexpr MethodKind kind = MethodKind::Recall;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = -1;  // not a store codec

  std::int64_t window = 0;  ///< most recent tokens always attended (besides the sinks)
  /// With n_clusters 0 the prefill makes clustered tokens / tokens_per_cluster clusters,
  /// or more where their mean size would exceed budget / kClustersPerBudget.
  ClusterIndexParams index;

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"n_clusters", ParamRule::OptionalCount,
                "Prefill clusters per KV head (None: clustered tokens / tokens_per_cluster, "
                "raised so the mean cluster holds at most budget / 12 tokens).",
                0},
      p.index.n_clusters);
    f(ParamSpec{"tokens_per_cluster", ParamRule::Count,
                "Mean cluster size the automatic n_clusters aims at.", 1},
      p.index.tokens_per_cluster);
    f(ParamSpec{"sink", ParamRule::Count, "First tokens never clustered, always attended.", 0},
      p.index.sink);
    f(ParamSpec{"window", ParamRule::Count, "Most recent tokens always attended.", 0}, p.window);
    f(ParamSpec{"iters", ParamRule::Count, "k-means rounds.", 1}, p.index.iterations);
    f(ParamSpec{"seed", ParamRule::Count, "k-means seed.", 0}, p.index.seed);
    f(ParamSpec{"init", ParamRule::KMeansInit, "k-means initialisation: 'kmeans++' or 'random'."},
      p.index.init);
    f(ParamSpec{"append_interval", ParamRule::Count, "Decoded tokens clustered together (m).", 1},
      p.index.append_interval);
    f(ParamSpec{"append_clusters", ParamRule::Count, "Clusters made of them (C+).", 1},
      p.index.append_clusters);
    each_recall_param(p, f);
  }
};

/// kvpack's best recall configuration: ClusterKV recalling 4x its budget in clusters, then
/// keeping the budget tokens of highest exact q . k among them (refine = 4). On the
/// RULER-style tasks at 4096 tokens it scores 5 points above the paper's ClusterKV at 1/16
/// of the prompt (benchmarks/RESULTS.md, real_lm_4k). Only the defaults differ: the step is
/// ClusterKV's.
struct ClusterKVRefinedParams : ClusterKVParams {
  static constexpr const char* name = "clusterkv_refined";
  static constexpr const char* class_name = "ClusterKVRefined";
  static constexpr const char* summary =
      "ClusterKV recalling 4x its budget in clusters, then keeping the budget tokens of "
      "highest exact q.k among them (kvpack's best recall configuration).";

  ClusterKVRefinedParams() { refine = 4; }
};

}  // namespace kvpack
