#include "kvpack/keydiff.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kvpack/convert.h"
#include "kvpack/select.h"

namespace kvpack {

void keydiff_scores(const KVView& keys, std::int64_t head, float* out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  // The head's keys widened once (its rows are contiguous), read by both passes.
  std::vector<float> widened(static_cast<std::size_t>(tokens * dim));
  to_float(keys.row(head, 0), keys.dtype, tokens * dim, widened.data());
  std::vector<double> anchor(static_cast<std::size_t>(dim), 0.0);
  std::vector<double> norms(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    const float* row = widened.data() + t * dim;
    double squares = 0.0;
    for (std::int64_t i = 0; i < dim; ++i) squares += static_cast<double>(row[i]) * row[i];
    norms[t] = std::sqrt(squares);
    const double scale = 1.0 / std::max(norms[t], 1e-12);  // a zero key adds nothing
    for (std::int64_t i = 0; i < dim; ++i) anchor[i] += scale * row[i];
  }
  double anchor_norm = 0.0;
  for (double& a : anchor) {
    a /= static_cast<double>(tokens);
    anchor_norm += a * a;
  }
  anchor_norm = std::sqrt(anchor_norm);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const float* row = widened.data() + t * dim;
    double dot = 0.0;
    for (std::int64_t i = 0; i < dim; ++i) dot += anchor[i] * row[i];
    const double denominator = norms[t] * anchor_norm;
    out[t] = denominator > 0.0 ? static_cast<float>(-dot / denominator) : 0.0f;
  }
}

void token_ranks(const KeyDiffParams&, const HeadInput& in, float* out) {
  keydiff_scores(in.keys, in.head, out);
}

void compress_head(const KeyDiffParams& params, const HeadInput& in, const HeadSlots& out) {
  std::vector<float> scores(static_cast<std::size_t>(in.keys.tokens));
  token_ranks(params, in, scores.data());
  keep_highest_ranked(scores.data(), in, out);
}

}  // namespace kvpack
