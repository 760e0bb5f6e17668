// What attention over a cache tells the methods: evidence scores (accumulated attention
// of the prompt's last queries) for ranking tokens, and the outputs and relative error of
// attention over probe queries for measuring a compressed cache's fidelity.

#include <cmath>
#include <cstring>
#include <vector>

#include "kvpack/attention.h"

namespace kvpack {

std::vector<float> evidence_scores(const KVView& keys, const Evidence& evidence,
                                   std::int64_t last_queries) {
  const auto size = static_cast<std::size_t>(keys.heads * keys.tokens);
  if (evidence.scores) return std::vector<float>(evidence.scores, evidence.scores + size);
  KVPACK_CHECK(evidence.queries != nullptr,
               "queries, attention: this method ranks tokens by attention; pass the prompt's "
               "queries or the accumulated attention");
  const float* queries = evidence.queries;
  std::int64_t window = evidence.window;
  std::vector<float> last;
  if (last_queries > 0 && window > last_queries) {  // only the latest queries observe
    const std::int64_t dim = keys.dim, skip = window - last_queries;
    last.resize(static_cast<std::size_t>(evidence.heads_q * last_queries * dim));
    for (std::int64_t h = 0; h < evidence.heads_q; ++h)
      std::memcpy(last.data() + h * last_queries * dim, queries + (h * window + skip) * dim,
                  static_cast<std::size_t>(last_queries * dim) * sizeof(float));
    queries = last.data();
    window = last_queries;
  }
  AccumulateParams accumulate;
  accumulate.scale = evidence.scale;
  std::vector<float> scores(size);
  accumulated_attention(queries, evidence.heads_q, window, keys, accumulate, scores.data());
  for (const float s : scores)  // rankings need finite scores
    KVPACK_CHECK(std::isfinite(s),
                 "keys, queries: their attention scores are not finite "
                 "(NaN/Inf values, or scores that overflow float32)");
  return scores;
}

namespace {

// Query i of queries [heads_q, n, dim] as a decode step's [heads_q, dim].
void gather_query(const float* queries, std::int64_t heads_q, std::int64_t n, std::int64_t dim,
                  std::int64_t i, float* q) {
  for (std::int64_t h = 0; h < heads_q; ++h)
    std::memcpy(q + h * dim, queries + (h * n + i) * dim,
                static_cast<std::size_t>(dim) * sizeof(float));
}

}  // namespace

std::vector<float> probe_outputs(const float* queries, std::int64_t heads_q, std::int64_t n,
                                 const KVView& keys, const KVView& values) {
  const std::int64_t dim = keys.dim;
  const auto size = static_cast<std::size_t>(heads_q * dim);
  std::vector<float> q(size), outputs(static_cast<std::size_t>(n) * size);
  for (std::int64_t i = 0; i < n; ++i) {
    gather_query(queries, heads_q, n, dim, i, q.data());
    decode_attention(q.data(), heads_q, keys, values, nullptr, nullptr, {},
                     {outputs.data() + i * heads_q * dim});
  }
  return outputs;
}

double attention_error(const float* queries, std::int64_t heads_q, std::int64_t n,
                       const std::vector<float>& reference, const KVView& keys,
                       const KVView& values) {
  const std::int64_t dim = keys.dim;
  const auto size = static_cast<std::size_t>(heads_q * dim);
  std::vector<float> q(size), out(size);
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    gather_query(queries, heads_q, n, dim, i, q.data());
    decode_attention(q.data(), heads_q, keys, values, nullptr, nullptr, {}, {out.data()});
    const float* exact = reference.data() + static_cast<std::size_t>(i) * size;
    double diff = 0.0, norm = 0.0;
    for (std::size_t j = 0; j < size; ++j) {
      diff += static_cast<double>(out[j] - exact[j]) * (out[j] - exact[j]);
      norm += static_cast<double>(exact[j]) * exact[j];
    }
    total += norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  }
  return n > 0 ? total / static_cast<double>(n) : 0.0;
}

}  // namespace kvpack
