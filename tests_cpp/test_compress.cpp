// Compression, merging and eviction on small inputs (these also run under AddressSanitizer
// + UBSan); values are checked in detail against NumPy float64 by pytest.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kvpack/compress.h"
#include "kvpack/evict.h"
#include "kvpack/merge.h"
#include "kvpack/select.h"
#include "reference.h"

namespace kvpack {
namespace {

struct Compressed {
  std::vector<float> keys, values, thresholds;
  std::vector<std::int32_t> counts, positions;
};

Compressed run(const testing::Cache& c, const CompressParams& p, const float* scores) {
  const std::int64_t slots = compressed_length(p, c.k.tokens);
  const auto rows = static_cast<std::size_t>(c.k.heads * slots);
  Compressed r{std::vector<float>(rows * c.k.dim), std::vector<float>(rows * c.k.dim),
               std::vector<float>(static_cast<std::size_t>(c.k.heads)),
               std::vector<std::int32_t>(rows), std::vector<std::int32_t>(rows)};
  Evidence e;
  e.scores = scores;
  compress(
      c.k, c.v, e, p,
      {r.keys.data(), r.values.data(), r.counts.data(), r.positions.data(), r.thresholds.data()});
  return r;
}

TEST(Select, TopKSetIsTheTopKRankingSorted) {
  const std::vector<float> scores = {0.5f, 2.0f, 2.0f, -1.0f, 3.0f, 0.5f, 0.5f};
  for (std::int64_t k = 0; k <= 7; ++k) {
    std::vector<std::int32_t> ranked = top_k(scores.data(), 7, k);
    std::sort(ranked.begin(), ranked.end());
    EXPECT_EQ(top_k_set(scores.data(), 7, k), ranked) << "k=" << k;
  }
}

TEST(Select, TopKSetRejectsNaN) {
  const std::vector<float> scores = {1.0f, std::numeric_limits<float>::quiet_NaN(), 0.0f};
  EXPECT_THROW(top_k_set(scores.data(), 3, 1), std::invalid_argument);
}

TEST(Evict, KeepSetsHaveTheBudgetAndTheirWindows) {
  std::vector<std::int32_t> out(6);
  streaming_keep(20, 6, 4, out.data());
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 1, 2, 3, 18, 19}));
  std::vector<float> scores(20, 0.0f);
  scores[7] = 5.0f;
  scores[2] = 4.0f;
  h2o_keep(scores.data(), 20, 6, 3, out.data());
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 2, 7, 17, 18, 19}));
  // Pooling spreads 7 over 6..8 and 2 over 1..3; ties go to the lower index.
  snapkv_keep(scores.data(), 20, 6, 2, 3, out.data());
  EXPECT_EQ(out, (std::vector<std::int32_t>{1, 6, 7, 8, 18, 19}));
}

TEST(Compress, EveryMethodMeetsTheBudget) {
  testing::Cache c(2, 120, 8, 31);
  const std::vector<float> scores = testing::random_vector(240, 32);
  std::vector<MethodParams> compressing;
  for_each_method([&](const auto& defaults) {
    if (defaults.kind == MethodKind::Compress &&
        !std::is_same_v<decltype(defaults), const FullParams&>)
      compressing.emplace_back(defaults);
  });
  for (const MethodParams& m : compressing) {
    CompressParams p;
    p.method = m;
    p.budget = 45;
    const Compressed r = run(c, p, scores.data());
    for (std::int64_t h = 0; h < 2; ++h) {
      const std::int32_t* pos = r.positions.data() + h * 45;
      EXPECT_TRUE(std::is_sorted(pos, pos + 45));
      EXPECT_EQ(std::adjacent_find(pos, pos + 45), pos + 45);
      const std::int32_t* counts = r.counts.data() + h * 45;
      const int total = std::accumulate(counts, counts + 45, 0);
      EXPECT_EQ(total, std::holds_alternative<KVMergerParams>(m) ? 120 : 45) << method_name(m);
    }
  }
}

TEST(Methods, EveryMethodIsFoundByItsNameOnce) {
  std::vector<std::string> names;
  std::vector<int> codes;
  for_each_method([&](const auto& defaults) {
    using Params = std::decay_t<decltype(defaults)>;
    const std::optional<MethodParams> found = find_method(Params::name);
    ASSERT_TRUE(found);
    EXPECT_TRUE(std::holds_alternative<Params>(*found));
    EXPECT_EQ(method_name(*found), std::string(Params::name));
    names.emplace_back(Params::name);
    if (Params::blob_code >= 0) codes.push_back(Params::blob_code);
  });
  std::sort(names.begin(), names.end());
  EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
  std::sort(codes.begin(), codes.end());  // a stored blob names its codec by this code
  EXPECT_EQ(std::adjacent_find(codes.begin(), codes.end()), codes.end());
  EXPECT_FALSE(find_method("snap_kv"));
  EXPECT_TRUE(needs_evidence(SnapKVParams{}));
  EXPECT_FALSE(needs_evidence(StreamingLLMParams{}));
}

TEST(Compress, RejectsAMethodOfAnotherKind) {
  testing::Cache c(1, 40, 8, 34);
  CompressParams p;
  p.method = ClusterKVParams{};
  p.budget = 10;
  EXPECT_THROW(run(c, p, nullptr), std::invalid_argument);
}

TEST(Compress, KVMergerOfDuplicatesIsExact) {
  // Pairs of identical tokens merge back into the token itself.
  testing::Cache c(1, 40, 8, 33);
  for (std::int64_t t = 1; t < 40; t += 2)
    for (std::int64_t i = 0; i < 8; ++i) {
      c.keys[t * 8 + i] = c.keys[(t - 1) * 8 + i];
      c.values[t * 8 + i] = c.values[(t - 1) * 8 + i];
    }
  KVMergerParams kvmerger;
  kvmerger.protect_recent = 0.0f;
  kvmerger.protect_heavy = 0.0f;
  CompressParams p;
  p.method = kvmerger;
  p.budget = 20;
  const std::vector<float> scores(40, 1.0f);
  const Compressed r = run(c, p, scores.data());
  for (std::int64_t s = 0; s < 20; ++s) {
    EXPECT_EQ(r.counts[s], 2);
    EXPECT_EQ(r.positions[s], 2 * s);
    for (std::int64_t i = 0; i < 8; ++i) {
      EXPECT_NEAR(r.keys[s * 8 + i], c.keys[2 * s * 8 + i], 1e-6);
      EXPECT_NEAR(r.values[s * 8 + i], c.values[2 * s * 8 + i], 1e-6);
    }
  }
  EXPECT_NEAR(r.thresholds[0], 1.0f, 1e-6);
}

TEST(Compress, RejectsNonFiniteKeysAndMissingEvidence) {
  testing::Cache c(1, 30, 4, 34);
  CompressParams p;
  p.method = KVMergerParams{};
  p.budget = 10;
  const std::vector<float> scores(30, 1.0f);
  EXPECT_THROW(run(c, p, nullptr), std::invalid_argument);
  c.keys[5 * 4 + 1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(run(c, p, scores.data()), std::invalid_argument);
}

TEST(EvictionCache, StreamingKeepsSinksAndTheLatestTokens) {
  testing::Cache c(2, 10, 8, 35);
  EvictionCacheParams p;
  StreamingLLMParams streaming;
  streaming.sinks = 2;
  p.policy = streaming;
  p.budget = 6;
  EvictionCache cache(p);
  cache.prefill(c.k, c.v, Evidence{});
  std::vector<float> q(4 * 8, 0.1f), out(4 * 8);
  for (int step = 0; step < 5; ++step) {
    KVView token = c.k;
    token.tokens = 1;
    token.head_stride = c.k.stride();
    cache.step(q.data(), 4, token, token, out.data());
    ASSERT_EQ(cache.size(), 6);
    for (std::int64_t h = 0; h < 2; ++h) {
      std::vector<std::int32_t> pos(cache.positions() + h * cache.capacity(),
                                    cache.positions() + h * cache.capacity() + 6);
      std::sort(pos.begin(), pos.end());
      const std::int32_t seen = static_cast<std::int32_t>(cache.seen());
      EXPECT_EQ(pos, (std::vector<std::int32_t>{0, 1, seen - 4, seen - 3, seen - 2, seen - 1}));
    }
  }
  for (float x : out) EXPECT_TRUE(std::isfinite(x));
}

}  // namespace
}  // namespace kvpack
