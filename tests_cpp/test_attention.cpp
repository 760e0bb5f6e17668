// The CPU attention core against double-precision references.
#include "kvpack/attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <string>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "kvpack/select.h"
#include "reference.h"

namespace kvpack {
namespace {

using testing::Cache;

struct Shape {
  std::int64_t heads_kv, heads_q, tokens, dim;
};

class DenseAttention : public ::testing::TestWithParam<Shape> {};

TEST_P(DenseAttention, MatchesReference) {
  const Shape s = GetParam();
  Cache c(s.heads_kv, s.tokens, s.dim, 1);
  const auto q = testing::random_vector(static_cast<std::size_t>(s.heads_q * s.dim), 2);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(s.heads_q));
  decode_attention(q.data(), s.heads_q, c.k, c.v, nullptr, nullptr, {},
                   {out.data(), lse.data(), nullptr});
  std::vector<std::int64_t> all(static_cast<std::size_t>(s.tokens));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t h = 0; h < s.heads_q; ++h) {
    double ref_lse;
    const auto ref = testing::reference_attention(q.data() + h * s.dim, c,
                                                  h / (s.heads_q / s.heads_kv), all, &ref_lse);
    EXPECT_NEAR(lse[h], ref_lse, 1e-4);
    for (std::int64_t i = 0; i < s.dim; ++i) EXPECT_NEAR(out[h * s.dim + i], ref[i], 2e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, DenseAttention,
                         ::testing::Values(Shape{1, 1, 1, 16}, Shape{2, 8, 1000, 64},
                                           Shape{2, 6, 1500, 40}, Shape{8, 32, 2000, 128}),
                         [](const ::testing::TestParamInfo<Shape>& param_info) {
                           const Shape& s = param_info.param;
                           return "kv" + std::to_string(s.heads_kv) + "_q" +
                                  std::to_string(s.heads_q) + "_t" + std::to_string(s.tokens) +
                                  "_d" + std::to_string(s.dim);
                         });

// A batch's decode step over held slots (two rows, one with empty slots and a permuted
// head) then decoded tokens: each query against the reference over the slots it sees.
// Each query of a batch against the float64 reference over the slots it sees (within
// `window` of its position when > 0); a sink logit scales the output by 1 / (1 + e^(sink - lse)).
void check_held_attention(std::int64_t window, bool with_sinks) {
  const std::int64_t heads_kv = 2, heads_q = 6, held = 700, decoded = 6, dim = 32, rows = 2;
  const std::int64_t tokens = held + decoded, new_queries = 3, first_decoded = 2000;
  const Cache c(rows * heads_kv, tokens, dim, 5);  // row b's heads: b * heads_kv + head
  std::vector<std::int64_t> positions(static_cast<std::size_t>(rows * heads_kv * held));
  for (std::int64_t l = 0; l < rows * heads_kv; ++l)
    for (std::int64_t s = 0; s < held; ++s) positions[l * held + s] = 2 * s;
  for (std::int64_t s = held - 50; s < held; ++s)  // row 1 is shorter
    for (std::int64_t h = 0; h < heads_kv; ++h) positions[(heads_kv + h) * held + s] = -1;
  std::reverse(positions.begin() + held, positions.begin() + 2 * held);  // any order
  const auto queries = testing::random_vector(rows * new_queries * heads_q * dim, 7);
  const std::int64_t first_query = first_decoded + decoded - new_queries;
  const auto batch = [&](const KVView& v) {
    return BatchKVView{v.data,       v.dtype, rows, heads_kv, tokens, dim, heads_kv * tokens * dim,
                       tokens * dim, dim};
  };
  std::vector<float> sinks;
  for (std::int64_t h = 0; h < heads_q; ++h) sinks.push_back(0.5f * static_cast<float>(h) - 1.0f);
  ScoreRules rules;
  rules.window = window;
  rules.sinks = with_sinks ? sinks.data() : nullptr;
  std::vector<float> out(queries.size());
  held_attention(queries.data(), new_queries, heads_q, first_query, batch(c.k), batch(c.v),
                 HeldSlots{positions.data(), held, first_decoded, nullptr}, rules, out.data());
  for (std::int64_t b = 0; b < rows; ++b)
    for (std::int64_t i = 0; i < new_queries; ++i)
      for (std::int64_t hq = 0; hq < heads_q; ++hq) {
        const std::int64_t head = hq / (heads_q / heads_kv);
        const std::int64_t low = window > 0 ? first_query + i - window + 1 : 0;
        std::vector<std::int64_t> seen;
        for (std::int64_t s = 0; s < held; ++s)
          if (positions[(b * heads_kv + head) * held + s] >= std::max<std::int64_t>(0, low))
            seen.push_back(s);
        for (std::int64_t j = 0; j < decoded && first_decoded + j <= first_query + i; ++j)
          if (first_decoded + j >= low) seen.push_back(held + j);
        double lse;
        const std::int64_t at = ((b * new_queries + i) * heads_q + hq) * dim;
        const auto ref =
            testing::reference_attention(queries.data() + at, c, b * heads_kv + head, seen, &lse);
        const double kept = with_sinks ? 1.0 / (1.0 + std::exp(sinks[hq] - lse)) : 1.0;
        for (std::int64_t d = 0; d < dim; ++d) EXPECT_NEAR(out[at + d], kept * ref[d], 2e-5);
      }
}

TEST(HeldAttention, EachQuerySeesItsHeldAndEarlierDecodedSlots) {
  check_held_attention(0, false);
}

// Sliding-window layers (the window reaches into the held slots, then only into the decoded
// ones) and gpt-oss's sinks.
TEST(HeldAttention, WindowsAndSinks) {
  check_held_attention(900, true);
  check_held_attention(4, false);
}

TEST(SparseAttention, PerQueryHeadIndicesMatchReference) {
  Cache c(2, 500, 32, 3);
  const std::int64_t heads_q = 4, count = 3;
  const auto q = testing::random_vector(heads_q * 32, 4);
  const std::vector<std::int32_t> idx = {0, 7, 499, 1, 2, 3, 10, 20, 30, 5, 6, 400};
  IndexView view{idx.data(), heads_q, count};
  std::vector<float> out(q.size()), weights(heads_q * count);
  decode_attention(q.data(), heads_q, c.k, c.v, &view, nullptr, {},
                   {out.data(), nullptr, weights.data()});
  for (std::int64_t h = 0; h < heads_q; ++h) {
    std::vector<std::int64_t> sel(idx.begin() + h * count, idx.begin() + (h + 1) * count);
    double lse;
    const auto ref = testing::reference_attention(q.data() + h * 32, c, h / 2, sel, &lse);
    for (std::int64_t i = 0; i < 32; ++i) EXPECT_NEAR(out[h * 32 + i], ref[i], 2e-5);
    EXPECT_NEAR(weights[h * count] + weights[h * count + 1] + weights[h * count + 2], 1.0, 1e-5);
  }
}

TEST(Attention, HalfStorageMatchesFloatStorage) {
  Cache c(2, 700, 64, 5);
  std::vector<std::uint16_t> kh(c.keys.size()), vh(c.values.size());
  from_float(c.keys.data(), static_cast<std::int64_t>(kh.size()), DType::Float16, kh.data());
  from_float(c.values.data(), static_cast<std::int64_t>(vh.size()), DType::Float16, vh.data());
  // Round the float32 copy through float16 too, so both hold the same values.
  to_float(kh.data(), DType::Float16, static_cast<std::int64_t>(kh.size()), c.keys.data());
  to_float(vh.data(), DType::Float16, static_cast<std::int64_t>(vh.size()), c.values.data());
  const KVView k16{kh.data(), DType::Float16, 2, 700, 64},
      v16{vh.data(), DType::Float16, 2, 700, 64};
  const auto q = testing::random_vector(4 * 64, 6);
  std::vector<float> a(q.size()), b(q.size());
  decode_attention(q.data(), 4, c.k, c.v, nullptr, nullptr, {}, {a.data(), nullptr, nullptr});
  decode_attention(q.data(), 4, k16, v16, nullptr, nullptr, {}, {b.data(), nullptr, nullptr});
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-6);
}

TEST(Attention, GatheredScoresAndWeightedValuesMatchReference) {
  // The two halves of attention over a token set, for every storage dtype, tile of query
  // heads (1, 3, 4 and 5 = five tiles of 1) and an odd token count.
  Cache c(2, 300, 40, 11);
  const std::vector<std::int32_t> tokens{3, 7, 8, 50, 51, 120, 199, 200, 201, 257, 299};
  const auto n = static_cast<std::int64_t>(tokens.size());
  for (DType dtype : {DType::Float32, DType::Float16, DType::BFloat16}) {
    std::vector<std::uint16_t> kh(c.keys.size()), vh(c.values.size());
    std::vector<float> keys = c.keys, values = c.values;  // rounded through dtype
    KVView k = c.k, v = c.v;
    if (dtype != DType::Float32) {
      const auto size = static_cast<std::int64_t>(keys.size());
      from_float(c.keys.data(), size, dtype, kh.data());
      from_float(c.values.data(), size, dtype, vh.data());
      to_float(kh.data(), dtype, size, keys.data());
      to_float(vh.data(), dtype, size, values.data());
      k = KVView{kh.data(), dtype, 2, 300, 40};
      v = KVView{vh.data(), dtype, 2, 300, 40};
    }
    for (std::int64_t n_q : {1, 3, 4, 5}) {
      const auto q = testing::random_vector(static_cast<std::size_t>(n_q * 40), 12);
      std::vector<float> scores(static_cast<std::size_t>(n_q * n)), out(q.size());
      gather_scores(q.data(), n_q, k, 1, tokens.data(), n, scores.data());
      weighted_value_sum(scores.data(), n_q, v, 1, tokens.data(), n, out.data());
      for (std::int64_t g = 0; g < n_q; ++g) {
        std::vector<double> want(40, 0.0);
        for (std::int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (std::int64_t i = 0; i < 40; ++i)
            dot += double(q[g * 40 + i]) * keys[(300 + tokens[j]) * 40 + i];
          EXPECT_NEAR(scores[g * n + j], dot, 1e-4) << dtype_name(dtype) << " " << n_q;
          for (std::int64_t i = 0; i < 40; ++i)
            want[i] += double(scores[g * n + j]) * values[(300 + tokens[j]) * 40 + i];
        }
        for (std::int64_t i = 0; i < 40; ++i) EXPECT_NEAR(out[g * 40 + i], want[i], 1e-3);
      }
    }
  }
}

TEST(Attention, RejectsBadShapes) {
  Cache c(2, 10, 16, 7);
  const auto q = testing::random_vector(3 * 16, 8);
  std::vector<float> out(q.size());
  EXPECT_THROW(
      decode_attention(q.data(), 3, c.k, c.v, nullptr, nullptr, {}, {out.data(), nullptr, nullptr}),
      std::invalid_argument);
  KVView empty = c.k;
  empty.tokens = 0;
  EXPECT_THROW(decode_attention(q.data(), 2, empty, empty, nullptr, nullptr, {},
                                {out.data(), nullptr, nullptr}),
               std::invalid_argument);
}

TEST(Parallel, ExceptionsInsideTheLoopReachTheCaller) {
  EXPECT_THROW(parallel_for(100,
                            [](std::int64_t i) {
                              if (i == 57) throw std::invalid_argument("57");
                            }),
               std::invalid_argument);
  EXPECT_THROW(set_num_threads(0), std::invalid_argument);
}

TEST(AccumulatedAttention, CausalSumsMatchReference) {
  Cache c(1, 40, 16, 9);
  const std::int64_t heads_q = 2, window = 8;
  const auto queries = testing::random_vector(heads_q * window * 16, 10);
  std::vector<float> out(40);
  accumulated_attention(queries.data(), heads_q, window, c.k, {}, out.data());
  std::vector<double> ref(40, 0.0);
  for (std::int64_t h = 0; h < heads_q; ++h)
    for (std::int64_t i = 0; i < window; ++i) {
      std::vector<std::int64_t> sel(static_cast<std::size_t>(40 - window + i + 1));
      std::iota(sel.begin(), sel.end(), 0);
      double lse;
      testing::reference_attention(queries.data() + (h * window + i) * 16, c, 0, sel, &lse);
      for (std::int64_t j : sel) {
        double dot = 0;
        for (int d = 0; d < 16; ++d)
          dot += double(queries[(h * window + i) * 16 + d]) * c.keys[j * 16 + d];
        ref[j] += std::exp(dot / 4.0 - lse);
      }
    }
  for (int j = 0; j < 40; ++j) EXPECT_NEAR(out[j], ref[j], 1e-5);
}

}  // namespace
}  // namespace kvpack
