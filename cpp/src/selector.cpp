#include "kvpack/selector.h"

#include <algorithm>

namespace kvpack {

namespace {

// ClusterKV: whole clusters by q . centroid, the unclustered decoded tokens on top.
class ClusterSelector final : public Selector {
 public:
  ClusterSelector(const ClusterKVParams& params, const KVView& keys)
      : window_(params.window), index_(keys, index_params(params, keys.tokens)) {}

  void append(const KVView& new_keys) override { index_.append(new_keys); }
  std::int64_t selection_size(std::int64_t budget) const override {
    return index_.selection_size(budget);
  }
  void select(const float* q, std::int64_t heads_q, std::int64_t budget, bool per_query_head,
              std::int32_t* out) const override {
    index_.select(q, heads_q, budget, window_, per_query_head, out);
  }
  std::vector<std::int32_t> always_attended(std::int64_t) const override {
    return index_.always_attended(window_);
  }
  // The unclustered window grows up to the next clustering.
  std::int64_t most_on_top() const override { return index_.params().append_interval; }
  std::int64_t decode_room() const override { return index_.params().append_interval; }
  SelectorStats stats() const override { return {index_.arrays()->clusters, 0}; }

 private:
  // The clustering of a `tokens`-long prompt (the automatic cluster count resolved).
  static ClusterIndexParams index_params(const ClusterKVParams& params, std::int64_t tokens) {
    ClusterIndexParams index = params.index;
    const std::int64_t clustered = tokens - std::min(index.sink, tokens);
    if (index.n_clusters == 0 && clustered > 0) {
      // The paper's 80-token clusters are ~1/13 of a 1k budget at 32k tokens. A smaller
      // budget keeps clusters of at most budget/12 tokens on average, so it is not spent
      // on one or two clusters.
      const std::int64_t by_size = clustered / std::max<std::int64_t>(1, index.tokens_per_cluster);
      const std::int64_t by_budget =
          (kClustersPerBudget * clustered + params.budget - 1) / params.budget;
      index.n_clusters = std::clamp<std::int64_t>(std::max(by_size, by_budget), 1, clustered);
    }
    return index;
  }

  std::int64_t window_;
  ClusterIndex index_;
};

// Quest: pages by their upper bound of q . k, the current page always.
class PageSelector final : public Selector {
 public:
  PageSelector(const QuestParams& params, const KVView& keys) : index_(keys, params.page_size) {}

  void append(const KVView& new_keys) override { index_.append(new_keys); }
  std::int64_t selection_size(std::int64_t budget) const override {
    return index_.selection_size(budget);
  }
  void select(const float* q, std::int64_t heads_q, std::int64_t budget, bool per_query_head,
              std::int32_t* out) const override {
    index_.select(q, heads_q, budget, per_query_head, out);
  }
  std::vector<std::int32_t> always_attended(std::int64_t budget) const override {
    return index_.always_attended(budget);
  }
  std::int64_t most_on_top() const override { return 0; }
  std::int64_t decode_room() const override { return 4 * index_.page_size(); }
  SelectorStats stats() const override { return {0, index_.pages()}; }

 private:
  QuestIndex index_;
};

}  // namespace

namespace {

// One overload per method: a method added to RecallMethod without a selector fails to compile.
struct Check {
  void operator()(const ClusterKVParams& p) const {
    KVPACK_CHECK(p.window >= 0, "window: expected >= 0, got " << p.window);
  }
  void operator()(const QuestParams& p) const {
    KVPACK_CHECK(p.page_size >= 1, "page_size: expected >= 1, got " << p.page_size);
  }
};

struct Build {
  const KVView& keys;
  std::unique_ptr<Selector> operator()(const ClusterKVParams& p) const {
    return std::make_unique<ClusterSelector>(p, keys);
  }
  std::unique_ptr<Selector> operator()(const QuestParams& p) const {
    return std::make_unique<PageSelector>(p, keys);
  }
};

}  // namespace

void check_method(const RecallMethod& method) {
  std::visit(Check{}, method);
}

std::unique_ptr<Selector> make_selector(const RecallMethod& method, const KVView& keys) {
  return std::visit(Build{keys}, method);
}

}  // namespace kvpack
