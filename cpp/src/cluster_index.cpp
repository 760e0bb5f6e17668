#include "kvpack/cluster_index.h"

#include <algorithm>
#include <numeric>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"

namespace kvpack {

namespace {

void check_params(const ClusterIndexParams& p) {
  KVPACK_CHECK(p.n_clusters >= 0, "n_clusters: expected >= 0 (0: automatic), got " << p.n_clusters);
  KVPACK_CHECK(p.tokens_per_cluster >= 1,
               "tokens_per_cluster: expected >= 1, got " << p.tokens_per_cluster);
  KVPACK_CHECK(p.sink >= 0, "sink: expected >= 0, got " << p.sink);
  KVPACK_CHECK(p.iterations >= 1, "iters: expected >= 1, got " << p.iterations);
  KVPACK_CHECK(p.append_interval >= 1, "append_interval: expected >= 1, got " << p.append_interval);
  KVPACK_CHECK(p.append_clusters >= 1 && p.append_clusters <= p.append_interval,
               "append_clusters: expected 1 <= append_clusters <= append_interval="
                   << p.append_interval << ", got " << p.append_clusters);
}

}  // namespace

ClusterIndex::ClusterIndex(const KVView& keys, const ClusterIndexParams& params) : params_(params) {
  check_params(params);
  KVPACK_CHECK(keys.data && keys.heads >= 1 && keys.tokens >= 1 && keys.dim >= 1,
               "keys: expected a non-empty [heads_kv, tokens, head_dim] cache, got ["
                   << keys.heads << ", " << keys.tokens << ", " << keys.dim << "]");
  heads_ = keys.heads;
  dim_ = keys.dim;
  tokens_ = prompt_tokens_ = keys.tokens;
  sink_ = std::min(params.sink, keys.tokens);
  const std::int64_t clustered = keys.tokens - sink_;
  const std::int64_t k = params.n_clusters
                             ? params.n_clusters
                             : std::max<std::int64_t>(1, clustered / params.tokens_per_cluster);
  KVPACK_CHECK(clustered == 0 || k <= clustered, "n_clusters: expected at most the "
                                                     << clustered << " tokens after the sinks, got "
                                                     << k);

  auto empty = std::make_shared<ClusterArrays>();
  empty->offsets.assign(static_cast<std::size_t>(heads_), 0);
  empty->labels.assign(static_cast<std::size_t>(heads_ * sink_), -1);
  empty->end = sink_;
  arrays_ = empty;
  // The tokens after the sinks, read in place: a view that skips each head's sinks.
  const KVView rows{clustered > 0 ? keys.row(0, sink_) : keys.data,
                    keys.dtype,
                    heads_,
                    clustered,
                    dim_,
                    keys.stride()};
  if (clustered > 0) add_clusters(rows, sink_, k);
}

void ClusterIndex::add_clusters(const KVView& keys, std::int64_t first, std::int64_t k) {
  const std::int64_t count = keys.tokens;
  const ClusterArrays& old = *arrays_;
  KMeansParams kp;
  kp.n_clusters = k;
  kp.iterations = params_.iterations;
  kp.seed = params_.seed + static_cast<std::uint64_t>(first);  // fresh draws per batch
  kp.spherical = true;
  kp.init = params_.init;
  const std::vector<KMeansResult> results = kmeans_heads(keys, kp);

  auto next = std::make_shared<ClusterArrays>();
  ClusterArrays& a = *next;
  a.clusters = old.clusters + k;
  a.clustered = old.clustered + count;
  a.end = first + count;
  a.centroids.resize(static_cast<std::size_t>(heads_ * a.clusters * dim_));
  a.sizes.resize(static_cast<std::size_t>(heads_ * a.clusters));
  a.offsets.resize(static_cast<std::size_t>(heads_ * (a.clusters + 1)));
  a.order.resize(static_cast<std::size_t>(heads_ * a.clustered));
  a.labels.resize(static_cast<std::size_t>(heads_ * a.end));
  for (std::int64_t h = 0; h < heads_; ++h) {
    const std::vector<std::int32_t>& labels = results[static_cast<std::size_t>(h)].labels;
    // Old clusters unchanged.
    std::copy_n(old.centroids.begin() + h * old.clusters * dim_, old.clusters * dim_,
                a.centroids.begin() + h * a.clusters * dim_);
    std::copy_n(old.sizes.begin() + h * old.clusters, old.clusters,
                a.sizes.begin() + h * a.clusters);
    std::copy_n(old.offsets.begin() + h * (old.clusters + 1), old.clusters + 1,
                a.offsets.begin() + h * (a.clusters + 1));
    std::copy_n(old.order.begin() + h * old.clustered, old.clustered,
                a.order.begin() + h * a.clustered);
    std::copy_n(old.labels.begin() + h * old.end, old.end, a.labels.begin() + h * a.end);
    // New clusters: sizes, CSR members by (cluster, position), mean keys.
    std::int32_t* sizes = a.sizes.data() + h * a.clusters + old.clusters;
    std::int32_t* offsets = a.offsets.data() + h * (a.clusters + 1) + old.clusters;
    std::int32_t* order = a.order.data() + h * a.clustered;
    float* centroids = a.centroids.data() + (h * a.clusters + old.clusters) * dim_;
    std::fill(centroids, centroids + k * dim_, 0.0f);
    for (std::int64_t i = 0; i < count; ++i) ++sizes[labels[i]];
    for (std::int64_t j = 0; j < k; ++j) offsets[j + 1] = offsets[j] + sizes[j];
    std::vector<std::int32_t> cursor(offsets, offsets + k);
    std::vector<double> sums(static_cast<std::size_t>(k * dim_), 0.0);
    std::vector<float> x(static_cast<std::size_t>(dim_));
    for (std::int64_t i = 0; i < count; ++i) {
      const std::int32_t j = labels[i];
      order[cursor[j]++] = static_cast<std::int32_t>(first + i);
      a.labels[h * a.end + first + i] = static_cast<std::int32_t>(old.clusters + j);
      to_float(keys.row(h, i), keys.dtype, dim_, x.data());
      for (std::int64_t c = 0; c < dim_; ++c) sums[j * dim_ + c] += x[c];
    }
    for (std::int64_t j = 0; j < k; ++j)
      if (sizes[j] > 0)
        for (std::int64_t c = 0; c < dim_; ++c)
          centroids[j * dim_ + c] = static_cast<float>(sums[j * dim_ + c] / sizes[j]);
  }
  arrays_ = next;
}

void ClusterIndex::append(const KVView& new_keys) {
  KVPACK_CHECK(new_keys.heads == heads_ && new_keys.dim == dim_,
               "new_keys: expected [" << heads_ << ", n, " << dim_ << "], got [" << new_keys.heads
                                      << ", " << new_keys.tokens << ", " << new_keys.dim << "]");
  if (new_keys.tokens == 0) return;
  pending_.resize(static_cast<std::size_t>(heads_));
  for (std::int64_t h = 0; h < heads_; ++h) {
    auto& rows = pending_[static_cast<std::size_t>(h)];
    rows.resize(static_cast<std::size_t>((pending_tokens_ + new_keys.tokens) * dim_));
    to_float(new_keys.row(h, 0), new_keys.dtype, new_keys.tokens * dim_,
             rows.data() + pending_tokens_ * dim_);
  }
  pending_tokens_ += new_keys.tokens;
  tokens_ += new_keys.tokens;

  const std::int64_t m = params_.append_interval;
  while (pending_tokens_ >= m) {
    std::vector<float> batch(static_cast<std::size_t>(heads_ * m * dim_));
    for (std::int64_t h = 0; h < heads_; ++h) {
      auto& rows = pending_[static_cast<std::size_t>(h)];
      std::copy_n(rows.begin(), m * dim_, batch.begin() + h * m * dim_);
      rows.erase(rows.begin(), rows.begin() + m * dim_);
    }
    add_clusters(KVView{batch.data(), DType::Float32, heads_, m, dim_}, arrays_->end,
                 params_.append_clusters);
    pending_tokens_ -= m;
  }
}

std::vector<std::int32_t> ClusterIndex::always_attended(std::int64_t window) const {
  // The sinks, then the last `window` tokens and the tokens on top of the budget (the
  // unclustered window, or a decode step's own token just clustered).
  std::vector<std::int32_t> always;
  for (std::int64_t t = 0; t < sink_; ++t) always.push_back(static_cast<std::int32_t>(t));
  const std::int64_t recent = std::max(sink_, std::min(tokens_ - on_top(), tokens_ - window));
  for (std::int64_t t = recent; t < tokens_; ++t) always.push_back(static_cast<std::int32_t>(t));
  return always;
}

void ClusterIndex::select(const float* q, std::int64_t heads_q, std::int64_t budget,
                          std::int64_t window, bool per_query_head, std::int32_t* out,
                          std::vector<std::vector<std::int32_t>>* used_clusters) const {
  KVPACK_CHECK(heads_q >= 1 && heads_q % heads_ == 0,
               "q: expected heads_q to be a positive multiple of heads_kv=" << heads_ << ", got "
                                                                            << heads_q);
  KVPACK_CHECK(budget >= 1, "budget: expected >= 1, got " << budget);
  KVPACK_CHECK(window >= 0, "window: expected >= 0, got " << window);
  const ClusterArrays& a = *arrays_;
  const std::int64_t group = heads_q / heads_;
  const std::int64_t rows = per_query_head ? heads_q : heads_;
  const std::int64_t count = selection_size(budget);
  if (used_clusters) used_clusters->assign(static_cast<std::size_t>(rows), {});

  const std::vector<std::int32_t> always = always_attended(window);

  parallel_for(rows, [&](std::int64_t r) {
    const std::int64_t head = per_query_head ? r / group : r;
    std::vector<float> query(static_cast<std::size_t>(dim_), 0.0f);
    const std::int64_t first_q = per_query_head ? r : r * group, n_q = per_query_head ? 1 : group;
    for (std::int64_t g = 0; g < n_q; ++g)
      for (std::int64_t c = 0; c < dim_; ++c) query[c] += q[(first_q + g) * dim_ + c];
    // Rank only as many clusters as can fill the budget (whole-cluster sizes >= count
    // guarantees it), doubling until they do: a full sort of every cluster is wasted work.
    // The first ranking scores every centroid (rank_rows); a doubling re-ranks the scores.
    const std::int32_t* sizes = a.sizes.data() + head * a.clusters;
    std::int64_t want = std::min<std::int64_t>(a.clusters, 16);
    std::vector<float> scores(static_cast<std::size_t>(a.clusters));
    std::vector<std::int32_t> ranked(static_cast<std::size_t>(want));
    if (a.clusters > 0)
      rank_rows(a.centroids.data() + head * a.clusters * dim_, 1, a.clusters, dim_, query.data(),
                want, scores.data(), ranked.data());
    for (;;) {
      std::int64_t covered = 0;
      for (std::int32_t c : ranked) covered += sizes[c];
      if (covered >= count || want == a.clusters) break;
      want = std::min(a.clusters, 2 * want);
      ranked = top_k(scores.data(), a.clusters, want);
    }
    const RankedGroups groups{ranked.data(), static_cast<std::int64_t>(ranked.size()),
                              a.offsets.data() + head * (a.clusters + 1),
                              a.order.data() + head * a.clustered};
    fill_budget(always, groups, count, out + r * count,
                used_clusters ? &(*used_clusters)[static_cast<std::size_t>(r)] : nullptr);
  });
}

}  // namespace kvpack
