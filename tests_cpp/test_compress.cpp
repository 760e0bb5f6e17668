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
  std::int64_t filled = 0;  // what compress returns: the most slots a head filled
};

Compressed run(const testing::Cache& c, const CompressParams& p, const Evidence& e) {
  const std::int64_t slots = compressed_length(p, c.k.tokens, c.k.heads);
  const auto rows = static_cast<std::size_t>(c.k.heads * slots);
  Compressed r{std::vector<float>(rows * c.k.dim), std::vector<float>(rows * c.k.dim),
               std::vector<float>(static_cast<std::size_t>(c.k.heads)),
               std::vector<std::int32_t>(rows), std::vector<std::int32_t>(rows)};
  r.filled = compress(
      c.k, c.v, e, p,
      {r.keys.data(), r.values.data(), r.counts.data(), r.positions.data(), r.thresholds.data()});
  return r;
}

// Compresses c; queries (heads_q * window * dim), when given, join the evidence.
Compressed run(const testing::Cache& c, const CompressParams& p, const float* scores,
               const std::vector<float>* queries = nullptr, std::int64_t heads_q = 0) {
  Evidence e;
  e.scores = scores;
  if (queries) {
    e.queries = queries->data();
    e.heads_q = heads_q;
    e.window = static_cast<std::int64_t>(queries->size()) / (heads_q * c.k.dim);
  }
  return run(c, p, e);
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

TEST(Select, PooledTopKTakesTheFloorsThenTheBestOfTheRest) {
  // Head 0 attends one token, head 1 spreads its attention: head 1 gets the pool.
  const std::vector<float> scores = {9.0f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f,   // head 0
                                     0.5f, 0.6f, 0.7f, 0.8f, 0.9f, 0.4f};  // head 1
  const auto picks = pooled_top_k(scores.data(), 2, 6, 3, 1);
  EXPECT_EQ(picks[0], (std::vector<std::int32_t>{0}));
  EXPECT_EQ(picks[1], (std::vector<std::int32_t>{0, 1, 2, 3, 4}));
  // A floor of the whole budget is the uniform split; ties go to the lower token.
  const auto uniform = pooled_top_k(scores.data(), 2, 6, 3, 3);
  EXPECT_EQ(uniform[0], (std::vector<std::int32_t>{0, 1, 2}));
  EXPECT_EQ(uniform[1], (std::vector<std::int32_t>{2, 3, 4}));
  // +inf (a method's always-kept tokens) ranks above everything, floor or not.
  std::vector<float> forced = scores;
  forced[5] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(pooled_top_k(forced.data(), 2, 6, 3, 1)[0], (std::vector<std::int32_t>{0, 5}));
}

TEST(Compress, PyramidBudgetsFallLinearlyAndKeepTheTotal) {
  EXPECT_EQ(pyramid_budgets(100, 4, 1000, 20.0), (std::vector<std::int64_t>{195, 132, 68, 5}));
  EXPECT_EQ(pyramid_budgets(300, 2, 400, 20.0), (std::vector<std::int64_t>{400, 200}));
  EXPECT_EQ(pyramid_budgets(10, 4, 500, 20.0), (std::vector<std::int64_t>(4, 10)));
  EXPECT_EQ(pyramid_budgets(600, 3, 500, 20.0), (std::vector<std::int64_t>(3, 600)));
  for (std::int64_t layers = 2; layers <= 40; layers += 7) {
    const auto b = pyramid_budgets(77, layers, 300, 8.0);
    EXPECT_EQ(std::accumulate(b.begin(), b.end(), std::int64_t{0}), 77 * layers);
    EXPECT_TRUE(std::is_sorted(b.rbegin(), b.rend()));
  }
  EXPECT_THROW(pyramid_budgets(10, 4, 500, 0.5), std::invalid_argument);
}

TEST(Compress, AdaptiveHeadsShareTheLayersBudget) {
  testing::Cache c(3, 80, 8, 5);
  std::vector<float> scores = testing::random_vector(240, 6);
  for (float& s : scores) s = std::abs(s);
  for (std::int64_t t = 0; t < 80; ++t) scores[t] *= 0.01f;  // head 0 attends little
  scores[40] = 50.0f;
  SnapKVParams snap;
  snap.window = 4;
  snap.adaptive = true;
  CompressParams p;
  p.method = snap;
  p.budget = 16;
  const std::int64_t slots = compressed_length(p, 80, 3);
  EXPECT_EQ(slots, 3 * 16 - 2 * 3);  // the floor: floor(0.2 * 16) = 3
  const Compressed r = run(c, p, scores.data());
  std::int64_t total = 0;
  std::vector<std::int64_t> kept(3, 0);
  for (std::int64_t h = 0; h < 3; ++h) {
    const std::int32_t* pos = r.positions.data() + h * slots;
    while (kept[h] < slots && pos[kept[h]] >= 0) ++kept[h];
    EXPECT_TRUE(std::is_sorted(pos, pos + kept[h]));
    for (std::int64_t s = kept[h]; s < slots; ++s) {
      EXPECT_EQ(pos[s], -1);
      EXPECT_EQ(r.counts[h * slots + s], 0);
    }
    EXPECT_GE(kept[h], 4);  // the window, at least
    total += kept[h];
  }
  EXPECT_EQ(total, 3 * 16);
  EXPECT_EQ(r.filled, *std::max_element(kept.begin(), kept.end()));
  EXPECT_LT(kept[0], 16);  // head 0's window and its one strong token, and its floor
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
  const std::vector<float> queries = testing::random_vector(4 * 30 * 8, 35);
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
    const Compressed r = run(c, p, scores.data(), &queries, 4);
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
  EXPECT_TRUE(needs_evidence(ExpectedAttentionParams{}));
  EXPECT_TRUE(needs_queries(ExpectedAttentionParams{}));
  EXPECT_FALSE(needs_queries(SnapKVParams{}));
}

// One query q, the same at every position (no spread): its expected exp-score is
// exp(scale * k.q), so Expected Attention without value norms keeps the keys q leans to
// most, the sinks aside. Cached with RoPE, q is taken back and turned to the position
// after the last query (future_positions = 1): the keys R(next) q leans to most.
TEST(ExpectedAttention, OneRepeatedQueryKeepsTheKeysItLeansTo) {
  const std::int64_t dim = 8, tokens = 60, window = 20, half = dim / 2;
  testing::Cache c(1, tokens, dim, 41);
  const std::vector<float> q = testing::random_vector(dim, 42);
  const std::vector<float> inv_freq = {1.0f, 0.3f, 0.1f, 0.01f};
  auto turned = [&](std::int64_t position) {  // R(position) q, transformers' layout
    std::vector<float> out(q);
    for (std::int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<float>(position) * inv_freq[j];
      out[j] = static_cast<float>(std::cos(angle) * q[j] - std::sin(angle) * q[j + half]);
      out[j + half] = static_cast<float>(std::sin(angle) * q[j] + std::cos(angle) * q[j + half]);
    }
    return out;
  };
  for (const bool rotary : {false, true}) {
    std::vector<float> queries;
    for (std::int64_t i = 0; i < window; ++i) {
      const std::vector<float> row = rotary ? turned(tokens - window + i) : q;
      queries.insert(queries.end(), row.begin(), row.end());
    }
    ExpectedAttentionParams ea;
    ea.value_norm = false;
    ea.future_positions = 1;
    CompressParams p;
    p.method = ea;
    p.budget = 14;
    Evidence e;
    e.queries = queries.data();
    e.heads_q = 1;
    e.window = window;
    if (rotary) e.rotary = Rotary{inv_freq.data(), dim, 1.0f};
    std::vector<float> scores(static_cast<std::size_t>(tokens));
    expected_attention_scores(ea, c.k, c.v, e, 0, scores.data());
    const std::vector<float> future = rotary ? turned(tokens) : q;
    std::vector<float> leaning(static_cast<std::size_t>(tokens - 4));
    inner_products(c.keys.data() + 4 * dim, tokens - 4, dim, future.data(), leaning.data());
    std::vector<std::int32_t> expected = {0, 1, 2, 3};
    for (const std::int32_t t : top_k_set(leaning.data(), tokens - 4, 10))
      expected.push_back(t + 4);
    const Compressed r = run(c, p, e);
    EXPECT_EQ(r.positions, expected) << "rotary " << rotary;
    EXPECT_TRUE(std::isinf(scores[0]) && std::isinf(scores[3]) && std::isfinite(scores[4]));
  }
}

TEST(ExpectedAttention, NeedsQueriesAndValidParameters) {
  testing::Cache c(2, 30, 4, 43);
  const std::vector<float> scores(60, 1.0f);
  const std::vector<float> queries = testing::random_vector(2 * 10 * 4, 44);
  CompressParams p;
  p.method = ExpectedAttentionParams{};
  p.budget = 10;
  EXPECT_THROW(run(c, p, scores.data()), std::invalid_argument);  // attention does not serve
  EXPECT_NO_THROW(run(c, p, nullptr, &queries, 2));
  ExpectedAttentionParams bad;
  bad.future_positions = 0;
  p.method = bad;
  EXPECT_THROW(run(c, p, nullptr, &queries, 2), std::invalid_argument);
  bad = {};
  bad.epsilon = -1.0f;
  p.method = bad;
  EXPECT_THROW(run(c, p, nullptr, &queries, 2), std::invalid_argument);
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
