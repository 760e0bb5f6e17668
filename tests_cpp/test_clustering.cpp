// k-means, the cluster and page indexes and the recall object on small inputs (these
// also run under AddressSanitizer + UBSan); values are checked in detail by pytest.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "kvpack/cluster_index.h"
#include "kvpack/kmeans.h"
#include "kvpack/quest.h"
#include "kvpack/recall_cache.h"
#include "kvpack/select.h"
#include "kvpack/selector.h"
#include "reference.h"

namespace kvpack {
namespace {

TEST(KMeans, ObjectiveNeverIncreasesAndLabelsAreValid) {
  testing::Cache c(1, 800, 16, 21);
  KMeansParams p;
  p.n_clusters = 20;
  for (bool spherical : {true, false}) {
    p.spherical = spherical;
    const KMeansResult r = kmeans(c.keys.data(), DType::Float32, 800, 16, p);
    ASSERT_EQ(r.labels.size(), 800u);
    for (std::int32_t label : r.labels) EXPECT_TRUE(label >= 0 && label < 20);
    for (std::size_t i = 1; i < r.history.size(); ++i)
      EXPECT_LE(r.history[i], r.history[i - 1] * (1 + 1e-6));
    EXPECT_LE(r.objective, r.history.back() * (1 + 1e-6));
  }
}

TEST(KMeans, RejectsBadClusterCounts) {
  testing::Cache c(1, 10, 4, 22);
  KMeansParams p;
  p.n_clusters = 11;
  EXPECT_THROW(kmeans(c.keys.data(), DType::Float32, 10, 4, p), std::invalid_argument);
}

TEST(Select, TopKAndFillBudget) {
  const std::vector<float> scores = {0.5f, 2.0f, 2.0f, -1.0f};
  EXPECT_EQ(top_k(scores.data(), 4, 3), (std::vector<std::int32_t>{1, 2, 0}));
  // Groups {3, 4} {5, 6, 7} {8}; always {0, 1}; budget 6 takes group 1 whole, 0 cut.
  const std::vector<std::int32_t> order = {1, 0, 2}, offsets = {0, 2, 5, 6},
                                  members = {3, 4, 5, 6, 7, 8};
  std::vector<std::int32_t> out(6), used;
  fill_budget({0, 1}, RankedGroups{order.data(), 3, offsets.data(), members.data()}, 6, out.data(),
              &used);
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 1, 3, 5, 6, 7}));
  EXPECT_EQ(used, (std::vector<std::int32_t>{1, 0}));
  // Ids far beyond the always-kept ones, and a member already kept, are handled.
  const std::vector<std::int32_t> far_offsets = {0, 2, 3}, far_members = {130, 500, 7},
                                  far_order = {0, 1};
  std::vector<std::int32_t> far(4);
  fill_budget({0, 130}, RankedGroups{far_order.data(), 2, far_offsets.data(), far_members.data()},
              4, far.data(), nullptr);
  EXPECT_EQ(far, (std::vector<std::int32_t>{0, 7, 130, 500}));
}

TEST(ClusterIndex, SelectsExactlyTheBudgetAndAppends) {
  testing::Cache c(2, 1000, 16, 23);
  ClusterIndexParams p;
  p.append_interval = 50;
  p.append_clusters = 4;
  ClusterIndex index(c.k, p);
  EXPECT_EQ(index.arrays()->clusters, (1000 - 16) / 80);
  const auto q = testing::random_vector(4 * 16, 24);
  std::vector<std::int32_t> out(2 * 100);
  index.select(q.data(), 4, 100, 8, false, out.data());
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(std::is_sorted(out.begin() + r * 100, out.begin() + (r + 1) * 100));
    EXPECT_EQ(out[r * 100], 0);
    EXPECT_EQ(out[r * 100 + 99], 999);
  }
  const KVView more{c.keys.data(), DType::Float32, 2, 60, 16, 1000 * 16};
  index.append(more);
  EXPECT_EQ(index.tokens(), 1060);
  EXPECT_EQ(index.arrays()->clusters, (1000 - 16) / 80 + 4);
  EXPECT_EQ(index.arrays()->end, 1050);
}

TEST(QuestIndex, KeepsTheCurrentPage) {
  testing::Cache c(1, 100, 8, 25);
  QuestIndex quest(c.k, 16);
  EXPECT_EQ(quest.pages(), 7);
  const auto q = testing::random_vector(8, 26);
  std::vector<std::int32_t> out(40);
  quest.select(q.data(), 1, 40, false, out.data());
  EXPECT_EQ(out.back(), 99);
  EXPECT_TRUE(std::is_sorted(out.begin(), out.end()));
}

TEST(Selector, SelectsAsTheMethodsIndex) {
  testing::Cache c(2, 300, 16, 29);
  const auto q = testing::random_vector(4 * 16, 30);
  ClusterKVParams clusterkv;
  clusterkv.window = 4;
  clusterkv.index.n_clusters = 10;
  QuestParams quest;
  quest.page_size = 8;
  const auto clusters = make_selector(clusterkv, c.k), pages = make_selector(quest, c.k);
  const ClusterIndex cluster_index(c.k, clusterkv.index);
  const QuestIndex quest_index(c.k, quest.page_size);
  for (bool per_query_head : {false, true}) {
    const std::size_t rows = per_query_head ? 4 : 2;
    std::vector<std::int32_t> got(rows * static_cast<std::size_t>(clusters->selection_size(64)));
    std::vector<std::int32_t> want(got.size());
    clusters->select(q.data(), 4, 64, per_query_head, got.data());
    cluster_index.select(q.data(), 4, 64, 4, per_query_head, want.data());
    EXPECT_EQ(got, want);
    got.assign(rows * static_cast<std::size_t>(pages->selection_size(64)), 0);
    want.assign(got.size(), 0);
    pages->select(q.data(), 4, 64, per_query_head, got.data());
    quest_index.select(q.data(), 4, 64, per_query_head, want.data());
    EXPECT_EQ(got, want);
  }
  EXPECT_EQ(clusters->stats().clusters, 10);
  EXPECT_EQ(pages->stats().pages, 38);
  EXPECT_EQ(clusters->most_on_top(), clusterkv.index.append_interval);
  EXPECT_EQ(pages->most_on_top(), 0);
  clusterkv.window = -1;
  EXPECT_THROW(check_method(clusterkv), std::invalid_argument);
  quest.page_size = 0;
  EXPECT_THROW(check_method(quest), std::invalid_argument);
}

TEST(RecallCache, StepMatchesDenseAttentionWithFullBudget) {
  testing::Cache c(2, 300, 16, 27);
  for (RecallMethod method : {RecallMethod{ClusterKVParams{}}, RecallMethod{QuestParams{}}}) {
    std::visit([](RecallParams& p) { p.budget = 1000; }, method);
    RecallCache recall(method);
    const KVView k{c.keys.data(), DType::Float32, 2, 299, 16, 300 * 16};
    const KVView v{c.values.data(), DType::Float32, 2, 299, 16, 300 * 16};
    recall.prefill(k, v);
    const KVView nk{c.keys.data() + 299 * 16, DType::Float32, 2, 1, 16, 300 * 16};
    const KVView nv{c.values.data() + 299 * 16, DType::Float32, 2, 1, 16, 300 * 16};
    const auto q = testing::random_vector(4 * 16, 28);
    std::vector<float> out(4 * 16), dense(4 * 16);
    recall.step(q.data(), 4, nk, nv, out.data());
    decode_attention(q.data(), 4, c.k, c.v, nullptr, nullptr, {}, {dense.data(), nullptr, nullptr});
    for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], dense[i], 1e-5);
    EXPECT_EQ(recall.last_step().selected, 600);
  }
}

}  // namespace
}  // namespace kvpack
