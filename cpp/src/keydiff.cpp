#include "kvpack/keydiff.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kvpack/convert.h"
#include "kvpack/select.h"

namespace kvpack {

void keydiff_scores(const KVView& keys, std::int64_t head, float* out) {
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  std::vector<float> row(static_cast<std::size_t>(dim));
  std::vector<double> anchor(static_cast<std::size_t>(dim), 0.0);
  std::vector<double> norms(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    to_float(keys.row(head, t), keys.dtype, dim, row.data());
    double squares = 0.0;
    for (const float x : row) squares += static_cast<double>(x) * x;
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
    to_float(keys.row(head, t), keys.dtype, dim, row.data());
    double dot = 0.0;
    for (std::int64_t i = 0; i < dim; ++i) dot += anchor[i] * row[i];
    const double denominator = norms[t] * anchor_norm;
    out[t] = denominator > 0.0 ? static_cast<float>(-dot / denominator) : 0.0f;
  }
}

void compress_head(const KeyDiffParams&, const HeadInput& in, const HeadSlots& out) {
  std::vector<float> scores(static_cast<std::size_t>(in.keys.tokens));
  keydiff_scores(in.keys, in.head, scores.data());
  const std::vector<std::int32_t> kept = top_k_set(scores.data(), in.keys.tokens, in.slots);
  std::copy(kept.begin(), kept.end(), out.positions);
  keep_rows(in, out);
}

}  // namespace kvpack
