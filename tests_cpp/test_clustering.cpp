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

TEST(RecallCache, RefinedStepKeepsTheHighestExactScoresOfTheCandidates) {
  testing::Cache c(2, 400, 16, 31);
  const auto q = testing::random_vector(4 * 16, 32);
  ClusterKVParams clusterkv;
  clusterkv.index.n_clusters = 12;
  clusterkv.window = 4;
  QuestParams quest;
  quest.page_size = 8;
  for (RecallMethod method : {RecallMethod{clusterkv}, RecallMethod{quest}}) {
    std::visit(
        [](RecallParams& p) {
          p.budget = 48;
          p.refine = 3;
        },
        method);
    RecallCache recall(method);
    const KVView k{c.keys.data(), DType::Float32, 2, 399, 16, 400 * 16};
    const KVView v{c.values.data(), DType::Float32, 2, 399, 16, 400 * 16};
    recall.prefill(k, v);
    const KVView nk{c.keys.data() + 399 * 16, DType::Float32, 2, 1, 16, 400 * 16};
    const KVView nv{c.values.data() + 399 * 16, DType::Float32, 2, 1, 16, 400 * 16};
    std::vector<float> out(4 * 16);
    recall.step(q.data(), 4, nk, nv, out.data());
    const std::vector<std::int32_t> always = recall.selector()->always_attended(48);
    const std::int64_t n = recall.last_candidate_count();
    const std::int64_t count = static_cast<std::int64_t>(recall.last_selection().size()) / 2;
    EXPECT_GT(n, count);
    EXPECT_EQ(recall.last_step().candidates, 2 * n);
    for (std::int64_t h = 0; h < 2; ++h) {
      const std::int32_t* cand = recall.last_candidates().data() + h * n;
      const std::int32_t* kept = recall.last_selection().data() + h * count;
      EXPECT_TRUE(std::is_sorted(kept, kept + count));
      const auto score = [&](std::int32_t t) {  // summed over the KV head's query heads
        double s = 0;
        for (std::int64_t g = 2 * h; g < 2 * h + 2; ++g)
          for (std::int64_t i = 0; i < 16; ++i)
            s += double(q[g * 16 + i]) * c.keys[(h * 400 + t) * 16 + i];
        return s;
      };
      double lowest_kept = INFINITY, highest_dropped = -INFINITY;
      for (std::int64_t j = 0; j < n; ++j) {
        const bool pinned = std::binary_search(always.begin(), always.end(), cand[j]);
        const bool in = std::binary_search(kept, kept + count, cand[j]);
        if (pinned) {
          EXPECT_TRUE(in) << cand[j];
        }
        if (!pinned && in) lowest_kept = std::min(lowest_kept, score(cand[j]));
        if (!in) highest_dropped = std::max(highest_dropped, score(cand[j]));
      }
      EXPECT_GE(lowest_kept, highest_dropped);
      for (std::int64_t i = 0; i < count; ++i)
        EXPECT_TRUE(std::binary_search(cand, cand + n, kept[i])) << kept[i];
      const std::vector<std::int64_t> sel(kept, kept + count);
      for (std::int64_t g = 2 * h; g < 2 * h + 2; ++g) {
        double lse = 0;
        const auto want = testing::reference_attention(q.data() + g * 16, c, h, sel, &lse);
        for (std::int64_t i = 0; i < 16; ++i) EXPECT_NEAR(out[g * 16 + i], want[i], 1e-5);
      }
    }
  }
  ClusterKVParams bad;
  bad.refine = 0;
  EXPECT_THROW(RecallCache{RecallMethod{bad}}, std::invalid_argument);
}

TEST(RecallCache, CodedSlowTierAttendsTheDequantizedPrompt) {
  testing::Cache c(2, 200, 16, 33);
  QuestParams quest;
  quest.page_size = 8;
  quest.budget = 40;
  quest.slow_bits = 4;
  quest.slow_group = 16;
  for (std::int64_t refine : {1, 3}) {
    quest.refine = refine;
    RecallCache recall(quest);
    const KVView k{c.keys.data(), DType::Float32, 2, 190, 16, 200 * 16};
    const KVView v{c.values.data(), DType::Float32, 2, 190, 16, 200 * 16};
    recall.prefill(k, v);
    ASSERT_NE(recall.codes(), nullptr);
    EXPECT_EQ(recall.codes()->quantized(), 160);
    EXPECT_GT(recall.code_bytes(), 0);
    // The reference cache: the dequantized prompt, then the decoded tokens exact.
    testing::Cache want = c;
    std::vector<float> dk(2 * 190 * 16), dv(dk.size());
    recall.codes()->dequantize(dk.data(), dv.data());
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < 190 * 16; ++i) {
        want.keys[h * 200 * 16 + i] = dk[h * 190 * 16 + i];
        want.values[h * 200 * 16 + i] = dv[h * 190 * 16 + i];
      }
    for (std::int64_t t = 190; t < 200; ++t) {
      const KVView nk{c.keys.data() + t * 16, DType::Float32, 2, 1, 16, 200 * 16};
      const KVView nv{c.values.data() + t * 16, DType::Float32, 2, 1, 16, 200 * 16};
      const auto q = testing::random_vector(4 * 16, static_cast<unsigned>(t));
      std::vector<float> out(4 * 16);
      recall.step(q.data(), 4, nk, nv, out.data());
      const std::int64_t count = static_cast<std::int64_t>(recall.last_selection().size()) / 2;
      EXPECT_EQ(count, 40);
      for (std::int64_t hq = 0; hq < 4; ++hq) {
        const std::int32_t* row = recall.last_selection().data() + (hq / 2) * count;
        const std::vector<std::int64_t> sel(row, row + count);
        EXPECT_EQ(sel.back(), t);
        double lse = 0;
        const auto ref = testing::reference_attention(q.data() + hq * 16, want, hq / 2, sel, &lse);
        for (std::int64_t i = 0; i < 16; ++i) EXPECT_NEAR(out[hq * 16 + i], ref[i], 1e-5);
      }
    }
    EXPECT_EQ(recall.tokens(), 200);
  }
  quest.slow_bits = 2;
  EXPECT_THROW(RecallCache{quest}, std::invalid_argument);
  quest.slow_bits = 8;
  quest.fast_tier = true;
  EXPECT_THROW(RecallCache{quest}, std::invalid_argument);
}

}  // namespace
}  // namespace kvpack
