#include "kvpack/expected_attention.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kvpack/convert.h"
#include "kvpack/select.h"

namespace kvpack {

namespace {

using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Queries un-rotated and summed a block at a time: memory stays O(block * dim) per head.
constexpr std::int64_t kQueryBlock = 256;
// Keys scored against the covariance a block at a time.
constexpr std::int64_t kKeyBlock = 1024;

// cos and sin of position p's angles, scaled, as transformers computes them: the angle is
// the float32 product of the position and the frequency.
void rotation_at(const Rotary& rotary, std::int64_t position, double* cos, double* sin) {
  const std::int64_t half = rotary.rotary_dim / 2;
  for (std::int64_t j = 0; j < half; ++j) {
    const float angle = static_cast<float>(position) * rotary.inv_freq[j];
    cos[j] = rotary.scaling * std::cos(static_cast<double>(angle));
    sin[j] = rotary.scaling * std::sin(static_cast<double>(angle));
  }
}

// x <- R x for the rotation (cos, sin) of the first rotary_dim channels: channel j and
// j + half turn together; later channels stay. `stride` steps between x's elements.
void turn(double* x, std::int64_t stride, std::int64_t half, const double* cos, const double* sin) {
  for (std::int64_t j = 0; j < half; ++j) {
    const double a = x[j * stride], b = x[(j + half) * stride];
    x[j * stride] = cos[j] * a - sin[j] * b;
    x[(j + half) * stride] = sin[j] * a + cos[j] * b;
  }
}

// Mean and (biased) covariance of the queries of one query head, unrotated, at positions
// >= sinks: what a query of this head looks like, whatever its position.
struct QueryStatistics {
  std::vector<double> mean;  // dim
  RowMatrixD covariance;     // dim x dim (empty without the covariance term)
};

std::vector<QueryStatistics> query_statistics(const ExpectedAttentionParams& params,
                                              const Evidence& evidence, std::int64_t first,
                                              std::int64_t group, std::int64_t dim,
                                              std::int64_t first_position) {
  const Rotary& rotary = evidence.rotary;
  const std::int64_t window = evidence.window, half = rotary.inv_freq ? rotary.rotary_dim / 2 : 0;
  // Only queries at positions >= sinks count, as the sinks' keys are not ranked.
  const std::int64_t skip = std::clamp<std::int64_t>(params.sinks - first_position, 0, window);
  const std::int64_t counted = window - skip;
  std::vector<QueryStatistics> stats(static_cast<std::size_t>(group));
  std::vector<RowMatrixD> sums(static_cast<std::size_t>(group));
  for (auto& s : stats) s.mean.assign(static_cast<std::size_t>(dim), 0.0);
  if (params.covariance)
    for (auto& s : sums) s = RowMatrixD::Zero(dim, dim);
  RowMatrixD block(std::min(kQueryBlock, std::max<std::int64_t>(counted, 1)), dim);
  std::vector<double> cos(static_cast<std::size_t>(kQueryBlock * half)),
      sin(static_cast<std::size_t>(kQueryBlock * half));
  for (std::int64_t start = skip; start < window; start += kQueryBlock) {
    const std::int64_t rows = std::min(kQueryBlock, window - start);
    for (std::int64_t i = 0; i < rows && half; ++i)
      rotation_at(rotary, first_position + start + i, cos.data() + i * half, sin.data() + i * half);
    for (std::int64_t g = 0; g < group; ++g) {
      const float* q = evidence.queries + ((first + g) * window + start) * dim;
      for (std::int64_t i = 0; i < rows; ++i) {
        double* x = block.data() + i * dim;
        for (std::int64_t c = 0; c < dim; ++c) x[c] = q[i * dim + c];
        if (!half) continue;
        // The inverse of the rotation: its transpose over scaling^2.
        const double* c_i = cos.data() + i * half;
        const double* s_i = sin.data() + i * half;
        const double norm = static_cast<double>(rotary.scaling) * rotary.scaling;
        for (std::int64_t j = 0; j < half; ++j) {
          const double a = x[j], b = x[j + half];
          x[j] = (c_i[j] * a + s_i[j] * b) / norm;
          x[j + half] = (c_i[j] * b - s_i[j] * a) / norm;
        }
      }
      auto rows_view = block.topRows(rows);
      std::vector<double>& mean = stats[g].mean;
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t c = 0; c < dim; ++c) mean[c] += rows_view(i, c);
      if (params.covariance) sums[g].noalias() += rows_view.transpose() * rows_view;
    }
  }
  for (std::int64_t g = 0; g < group; ++g) {
    if (counted == 0) continue;  // no query to learn from: mean and covariance stay 0
    std::vector<double>& mean = stats[g].mean;
    for (double& m : mean) m /= static_cast<double>(counted);
    if (!params.covariance) continue;
    RowMatrixD& cov = stats[g].covariance;
    cov = sums[g] / static_cast<double>(counted);
    Eigen::Map<const Eigen::VectorXd> mu(mean.data(), dim);
    cov.noalias() -= mu * mu.transpose();
  }
  return stats;
}

}  // namespace

void expected_attention_scores(const ExpectedAttentionParams& params, const KVView& keys,
                               const KVView& values, const Evidence& evidence, std::int64_t head,
                               float* out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  KVPACK_CHECK(params.future_positions >= 1,
               "future_positions: expected >= 1, got " << params.future_positions);
  KVPACK_CHECK(params.sinks >= 0, "sinks: expected >= 0, got " << params.sinks);
  KVPACK_CHECK(std::isfinite(params.epsilon) && params.epsilon >= 0.0f,
               "epsilon: expected a finite number >= 0, got " << params.epsilon);
  KVPACK_CHECK(evidence.queries != nullptr && evidence.window >= 1,
               "queries: method 'expected_attention' models future queries from the prompt's "
               "queries; pass them [heads_q, window, head_dim]");
  KVPACK_CHECK(evidence.heads_q >= keys.heads && evidence.heads_q % keys.heads == 0,
               "queries: expected heads_q a multiple of heads_kv=" << keys.heads << ", got "
                                                                   << evidence.heads_q);
  const Rotary& rotary = evidence.rotary;
  if (rotary.inv_freq) {
    KVPACK_CHECK(rotary.rotary_dim >= 2 && rotary.rotary_dim % 2 == 0 && rotary.rotary_dim <= dim,
                 "inv_freq: expected 1 to head_dim / 2 = " << dim / 2 << " frequencies, got "
                                                           << rotary.rotary_dim / 2);
    KVPACK_CHECK(std::isfinite(rotary.scaling) && rotary.scaling > 0.0f,
                 "rotary_scaling: expected a positive number, got " << rotary.scaling);
  }
  const std::int64_t first_position =
      evidence.first_position >= 0 ? evidence.first_position : tokens - evidence.window;
  KVPACK_CHECK(first_position >= 0, "first_position: expected >= 0, got " << first_position);

  const std::int64_t sinks = std::min(params.sinks, tokens);
  std::fill(out, out + sinks, std::numeric_limits<float>::infinity());
  if (sinks == tokens) return;
  const std::int64_t ranked = tokens - sinks;
  const std::int64_t group = evidence.heads_q / keys.heads;
  const double scale =
      evidence.scale > 0.0f ? evidence.scale : 1.0 / std::sqrt(static_cast<double>(dim));

  std::vector<QueryStatistics> stats =
      query_statistics(params, evidence, head * group, group, dim, first_position);

  // The rotation averaged over the positions after the last query, applied to each
  // head's statistics: mu <- R mu, Sigma <- R Sigma R'.
  if (rotary.inv_freq) {
    const std::int64_t half = rotary.rotary_dim / 2;
    const std::int64_t next = first_position + evidence.window;
    std::vector<double> cos(static_cast<std::size_t>(half), 0.0),
        sin(static_cast<std::size_t>(half), 0.0), c(cos), s(sin);
    for (std::int64_t p = next; p < next + params.future_positions; ++p) {
      rotation_at(rotary, p, c.data(), s.data());
      for (std::int64_t j = 0; j < half; ++j) {
        cos[j] += c[j];
        sin[j] += s[j];
      }
    }
    for (std::int64_t j = 0; j < half; ++j) {
      cos[j] /= static_cast<double>(params.future_positions);
      sin[j] /= static_cast<double>(params.future_positions);
    }
    for (QueryStatistics& st : stats) {
      turn(st.mean.data(), 1, half, cos.data(), sin.data());
      if (!params.covariance) continue;
      for (std::int64_t col = 0; col < dim; ++col)  // R Sigma: every column turned
        turn(st.covariance.data() + col, dim, half, cos.data(), sin.data());
      for (std::int64_t row = 0; row < dim; ++row)  // (R Sigma) R': every row turned
        turn(st.covariance.data() + row * dim, 1, half, cos.data(), sin.data());
    }
  }

  // The head's ranked keys widened once; each query head's log expected exp-scores, then
  // its softmax over the ranked keys, averaged over the group.
  RowMatrixF k(ranked, dim);
  to_float(keys.row(head, sinks), keys.dtype, ranked * dim, k.data());
  std::vector<double> logits(static_cast<std::size_t>(ranked)),
      pooled(static_cast<std::size_t>(ranked), 0.0);
  Eigen::VectorXf mu(dim);
  RowMatrixF cov;
  RowMatrixF projected;
  for (const QueryStatistics& st : stats) {
    for (std::int64_t c = 0; c < dim; ++c) mu[c] = static_cast<float>(st.mean[c]);
    if (params.covariance) cov = st.covariance.cast<float>();
    for (std::int64_t start = 0; start < ranked; start += kKeyBlock) {
      const std::int64_t rows = std::min(kKeyBlock, ranked - start);
      const auto block = k.middleRows(start, rows);
      const Eigen::VectorXf linear = block * mu;
      if (params.covariance) projected.noalias() = block * cov;
      for (std::int64_t i = 0; i < rows; ++i) {
        double logit = scale * linear[i];
        if (params.covariance) logit += 0.5 * scale * scale * projected.row(i).dot(block.row(i));
        KVPACK_CHECK(std::isfinite(logit),
                     "keys, queries: their expected attention scores are not finite "
                     "(NaN/Inf values, or scores that overflow float32)");
        logits[start + i] = logit;
      }
    }
    const double top = *std::max_element(logits.begin(), logits.end());
    double total = 0.0;
    for (double& l : logits) total += (l = std::exp(l - top));
    for (std::int64_t t = 0; t < ranked; ++t)
      pooled[t] += logits[t] / total / static_cast<double>(group);
  }

  std::vector<float> row(static_cast<std::size_t>(dim));
  for (std::int64_t t = 0; t < ranked; ++t) {
    double score = pooled[t];
    if (params.value_norm) {
      to_float(values.row(head, sinks + t), values.dtype, dim, row.data());
      double squares = 0.0;
      for (const float v : row) squares += static_cast<double>(v) * v;
      score = (score + params.epsilon) * std::sqrt(squares);
    }
    out[sinks + t] = static_cast<float>(score);
  }
}

void token_ranks(const ExpectedAttentionParams& params, const HeadInput& in, float* out) {
  KVPACK_CHECK(in.evidence != nullptr,
               "queries: method 'expected_attention' models future queries from the prompt's "
               "queries; pass them [heads_q, window, head_dim]");
  expected_attention_scores(params, in.keys, in.values, *in.evidence, in.head, out);
}

void compress_head(const ExpectedAttentionParams& params, const HeadInput& in,
                   const HeadSlots& out) {
  std::vector<float> scores(static_cast<std::size_t>(in.keys.tokens));
  token_ranks(params, in, scores.data());
  keep_highest_ranked(scores.data(), in, out);
}

}  // namespace kvpack
