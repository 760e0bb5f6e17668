// KIVI quantization on small inputs (also under AddressSanitizer + UBSan); exact codes are
// checked against NumPy by pytest.
#include <gtest/gtest.h>

#include <cmath>

#include "kvpack/attention.h"
#include "kvpack/quant.h"
#include "reference.h"

namespace kvpack {
namespace {

TEST(Quant, RoundTripErrorIsWithinHalfAStep) {
  testing::Cache c(2, 100, 20, 41);  // 20 channels: a short last value group of 4
  QuantParams p;
  p.bits = 8;
  p.group = 16;
  p.residual = 10;
  const QuantizedKV q(c.k, c.v, p);
  EXPECT_EQ(q.quantized(), 80);
  std::vector<float> k(c.keys.size()), v(c.values.size());
  q.dequantize(k.data(), v.data());
  for (std::size_t i = 0; i < k.size(); ++i) {
    EXPECT_NEAR(k[i], c.keys[i], 0.05);  // range of ~8 sigma over 255 steps, plus float16
    EXPECT_NEAR(v[i], c.values[i], 0.05);
  }
  for (std::int64_t t = 80; t < 100; ++t)  // the residual window is exact
    EXPECT_EQ(k[t * 20], c.keys[t * 20]);
}

TEST(Quant, AttentionOverCodesEqualsAttentionOverDequantized) {
  testing::Cache c(2, 90, 16, 42);
  QuantParams p;
  p.bits = 2;
  p.group = 8;
  p.residual = 5;
  const QuantizedKV q(c.k, c.v, p);
  std::vector<float> k(c.keys.size()), v(c.values.size());
  q.dequantize(k.data(), v.data());
  const std::vector<float> query = testing::random_vector(4 * 16, 43);
  std::vector<float> fused(4 * 16), expected(4 * 16), lse(4), expected_lse(4);
  q.attend(query.data(), 4, {}, {fused.data(), lse.data(), nullptr});
  const KVView kv{k.data(), DType::Float32, 2, 90, 16}, vv{v.data(), DType::Float32, 2, 90, 16};
  decode_attention(query.data(), 4, kv, vv, nullptr, nullptr, {},
                   {expected.data(), expected_lse.data(), nullptr});
  for (std::size_t i = 0; i < fused.size(); ++i)
    EXPECT_NEAR(fused[i], expected[i], 1e-4);  // float32, summed in another order
  for (std::size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse[i], expected_lse[i], 1e-4);
}

TEST(Quant, DequantizedRowsEqualTheWholeDequantization) {
  testing::Cache c(2, 90, 20, 45);  // 20 channels: a short last value group
  const std::vector<std::int32_t> tokens{0, 7, 8, 31, 40, 63, 64, 79, 80, 89};  // codes, residual
  const auto n = static_cast<std::int64_t>(tokens.size());
  for (int bits : {2, 4, 8}) {
    QuantParams p;
    p.bits = bits;
    p.group = 8;
    p.residual = 10;
    const QuantizedKV q(c.k, c.v, p);
    std::vector<float> k(c.keys.size()), v(c.values.size());
    q.dequantize(k.data(), v.data());
    std::vector<float> rows_k(static_cast<std::size_t>(n * 20)), rows_v(rows_k.size());
    q.dequantize_rows(1, tokens.data(), n, rows_k.data(), rows_v.data());
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t ch = 0; ch < 20; ++ch) {
        EXPECT_EQ(rows_k[i * 20 + ch], k[(90 + tokens[i]) * 20 + ch]) << bits << " " << i;
        EXPECT_EQ(rows_v[i * 20 + ch], v[(90 + tokens[i]) * 20 + ch]) << bits << " " << i;
      }
    std::fill(rows_v.begin(), rows_v.end(), -1.0f);
    q.dequantize_rows(1, tokens.data(), n, nullptr, rows_v.data());  // values alone
    EXPECT_EQ(rows_v[20], v[(90 + 7) * 20]);
    const std::int32_t out_of_range = 90;
    EXPECT_THROW(q.dequantize_rows(0, &out_of_range, 1, rows_k.data(), nullptr),
                 std::invalid_argument);
  }
}

TEST(Quant, RejectsBadBits) {
  testing::Cache c(1, 10, 4, 44);
  QuantParams p;
  p.bits = 3;
  EXPECT_THROW(QuantizedKV(c.k, c.v, p), std::invalid_argument);
}

}  // namespace
}  // namespace kvpack
