// Plain double-precision references for the C++ tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kvpack/common.h"

namespace kvpack::testing {

/// Random float32 [heads, tokens, dim] data and a KV view over it.
struct Cache {
  std::vector<float> keys, values;
  KVView k, v;
  Cache(std::int64_t heads, std::int64_t tokens, std::int64_t dim, unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal;
    keys.resize(static_cast<std::size_t>(heads * tokens * dim));
    values.resize(keys.size());
    for (float& x : keys) x = normal(gen);
    for (float& x : values) x = normal(gen);
    k = KVView{keys.data(), DType::Float32, heads, tokens, dim};
    v = KVView{values.data(), DType::Float32, heads, tokens, dim};
  }
};

inline std::vector<float> random_vector(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> out(n);
  for (float& x : out) x = normal(gen);
  return out;
}

/// Attention of query head h over the tokens `sel` of KV head kv; returns out (dim) and lse.
inline std::vector<double> reference_attention(const float* q, const Cache& c, std::int64_t kv,
                                               const std::vector<std::int64_t>& sel, double* lse) {
  const std::int64_t d = c.k.dim, t = c.k.tokens;
  std::vector<double> s(sel.size()), out(static_cast<std::size_t>(d), 0.0);
  double m = -INFINITY;
  for (std::size_t j = 0; j < sel.size(); ++j) {
    double dot = 0;
    for (std::int64_t i = 0; i < d; ++i) dot += double(q[i]) * c.keys[(kv * t + sel[j]) * d + i];
    s[j] = dot / std::sqrt(double(d));
    m = std::max(m, s[j]);
  }
  double total = 0;
  for (double& x : s) total += (x = std::exp(x - m));
  for (std::size_t j = 0; j < sel.size(); ++j)
    for (std::int64_t i = 0; i < d; ++i)
      out[i] += s[j] / total * c.values[(kv * t + sel[j]) * d + i];
  *lse = m + std::log(total);
  return out;
}

}  // namespace kvpack::testing
