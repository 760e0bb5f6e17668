// CPU decode attention: a flash-decoding pass. Each work item streams one token
// range of one KV head for its whole GQA group (so K and V rows are read once per
// group), keeping a running max, sum and output; ranges are merged by log-sum-exp.

#include "kvpack/attention.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"

namespace kvpack {

namespace {

constexpr std::int64_t kBlockTokens = 32;     // tokens converted and scored together
constexpr std::int64_t kMinChunkTokens = 512;  // smallest token range worth a work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float dot(const float* a, const float* b, std::int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (std::int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Row (head, token) as float32: the stored row itself for float32, else converted into buf.
inline const float* row_as_float(const KVView& view, std::int64_t head, std::int64_t token,
                                 float* buf) {
  const void* row = view.row(head, token);
  if (view.dtype == DType::Float32) return static_cast<const float*>(row);
  to_float(row, view.dtype, view.dim, buf);
  return buf;
}

// Running softmax state of `group` query heads over one token range.
struct Partial {
  float* max;     // size group
  float* sum;     // size group
  float* output;  // size group * dim, un-normalised
};

// Streams positions [begin, end) of a row of `count` positions; position p is token
// token_at(p) of KV head `head`. qs holds the group's pre-scaled queries (group * dim).
// When scores is non-null, the raw scaled scores are stored at scores[g * count + p].
template <class TokenAt>
void attend_range(const float* qs, std::int64_t group, const KVView& keys, const KVView& values,
                  std::int64_t head, TokenAt token_at, std::int64_t begin, std::int64_t end,
                  std::int64_t count, const float* bias_row, float* scores, Partial state) {
  const std::int64_t dim = keys.dim;
  std::vector<float> row_buf(static_cast<std::size_t>(kBlockTokens * dim));
  std::vector<float> s(static_cast<std::size_t>(group * kBlockTokens));
  std::vector<std::int64_t> tokens(kBlockTokens);
  for (std::int64_t g = 0; g < group; ++g) {
    state.max[g] = kNegInf;
    state.sum[g] = 0.0f;
  }
  std::fill(state.output, state.output + group * dim, 0.0f);

  for (std::int64_t b = begin; b < end; b += kBlockTokens) {
    const std::int64_t nb = std::min(kBlockTokens, end - b);
    for (std::int64_t j = 0; j < nb; ++j) tokens[j] = token_at(b + j);

    // Scores: each key row is converted once and dotted with every query of the group.
    for (std::int64_t j = 0; j < nb; ++j) {
      const float* k = row_as_float(keys, head, tokens[j], row_buf.data() + j * dim);
      const float add = bias_row ? bias_row[tokens[j]] : 0.0f;
      for (std::int64_t g = 0; g < group; ++g) s[g * kBlockTokens + j] = dot(qs + g * dim, k, dim) + add;
    }

    // Online softmax update.
    for (std::int64_t g = 0; g < group; ++g) {
      float* sg = s.data() + g * kBlockTokens;
      if (scores) std::copy(sg, sg + nb, scores + g * count + b);
      float block_max = kNegInf;
      for (std::int64_t j = 0; j < nb; ++j) block_max = std::max(block_max, sg[j]);
      const float new_max = std::max(state.max[g], block_max);
      if (state.max[g] != kNegInf && state.max[g] != new_max) {
        const float correction = std::exp(state.max[g] - new_max);
        state.sum[g] *= correction;
        float* og = state.output + g * dim;
#pragma omp simd
        for (std::int64_t i = 0; i < dim; ++i) og[i] *= correction;
      }
      float block_sum = 0.0f;
      for (std::int64_t j = 0; j < nb; ++j) {
        sg[j] = std::exp(sg[j] - new_max);
        block_sum += sg[j];
      }
      state.sum[g] += block_sum;
      state.max[g] = new_max;
    }

    // Values: each row is converted once and accumulated into every query's output.
    for (std::int64_t j = 0; j < nb; ++j) {
      const float* v = row_as_float(values, head, tokens[j], row_buf.data());
      for (std::int64_t g = 0; g < group; ++g) axpy(s[g * kBlockTokens + j], v, state.output + g * dim, dim);
    }
  }
}

float resolve_scale(float scale, std::int64_t dim) {
  return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(dim));
}

void check_kv(const KVView& keys, const KVView& values) {
  KVPACK_CHECK(keys.data && values.data, "keys/values: null data pointer");
  KVPACK_CHECK(keys.heads > 0 && keys.tokens > 0 && keys.dim > 0,
               "keys: expected a non-empty [heads_kv, tokens, head_dim] cache, got ["
                   << keys.heads << ", " << keys.tokens << ", " << keys.dim << "]");
  KVPACK_CHECK(values.heads == keys.heads && values.tokens == keys.tokens && values.dim == keys.dim,
               "values: expected shape [" << keys.heads << ", " << keys.tokens << ", " << keys.dim
                                          << "] like keys, got [" << values.heads << ", "
                                          << values.tokens << ", " << values.dim << "]");
}

}  // namespace

void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output) {
  check_kv(keys, values);
  KVPACK_CHECK(q && output.out, "q/out: null pointer");
  KVPACK_CHECK(heads_q > 0 && heads_q % keys.heads == 0,
               "q: expected heads_q to be a positive multiple of heads_kv=" << keys.heads
                                                                            << ", got " << heads_q);
  const std::int64_t dim = keys.dim;
  const std::int64_t group_size = heads_q / keys.heads;
  const bool per_query_head = indices && indices->rows == heads_q && group_size > 1;
  if (indices) {
    KVPACK_CHECK(indices->rows == keys.heads || indices->rows == heads_q,
                 "indices: expected " << keys.heads << " (heads_kv) or " << heads_q
                                      << " (heads_q) rows, got " << indices->rows);
    KVPACK_CHECK(indices->count > 0, "indices: expected at least one index per row, got 0");
  }
  const std::int64_t count = indices ? indices->count : keys.tokens;

  // A work item is (row, token chunk); a row is a KV head with its group, or one query head.
  const std::int64_t rows = per_query_head ? heads_q : keys.heads;
  const std::int64_t group = per_query_head ? 1 : group_size;
  const std::int64_t wanted = std::max<std::int64_t>(1, (4 * num_threads() + rows - 1) / rows);
  const std::int64_t chunks =
      std::max<std::int64_t>(1, std::min(wanted, count / kMinChunkTokens));
  const std::int64_t chunk_len = (count + chunks - 1) / chunks;
  const std::int64_t stride = group * (dim + 2);
  std::vector<float> partials(static_cast<std::size_t>(rows * chunks * stride));
  const float scale = resolve_scale(params.scale, dim);

  parallel_for(rows * chunks, [&](std::int64_t item) {
    const std::int64_t row = item / chunks, chunk = item % chunks;
    const std::int64_t first_q = per_query_head ? row : row * group_size;
    const std::int64_t head = first_q / group_size;
    const std::int64_t begin = chunk * chunk_len, end = std::min(count, begin + chunk_len);
    float* p = partials.data() + item * stride;
    Partial state{p, p + group, p + 2 * group};
    if (begin >= end) {
      std::fill(p, p + stride, 0.0f);
      std::fill(state.max, state.max + group, kNegInf);
      return;
    }
    std::vector<float> qs(static_cast<std::size_t>(group * dim));
    for (std::int64_t i = 0; i < group * dim; ++i) qs[i] = q[first_q * dim + i] * scale;
    const float* bias_row = bias ? bias + head * keys.tokens : nullptr;
    float* scores = output.weights ? output.weights + first_q * count : nullptr;
    if (indices) {
      const std::int32_t* idx = indices->data + (indices->rows == heads_q ? first_q : head) * count;
      attend_range(qs.data(), group, keys, values, head, [idx](std::int64_t p_) { return static_cast<std::int64_t>(idx[p_]); },
                   begin, end, count, bias_row, scores, state);
    } else {
      attend_range(qs.data(), group, keys, values, head, [](std::int64_t p_) { return p_; }, begin,
                   end, count, bias_row, scores, state);
    }
  });

  // Merge the chunks of every query head by log-sum-exp, then normalise the weights.
  parallel_for(heads_q, [&](std::int64_t hq) {
    const std::int64_t row = per_query_head ? hq : hq / group_size;
    const std::int64_t g = per_query_head ? 0 : hq % group_size;
    float global_max = kNegInf;
    for (std::int64_t c = 0; c < chunks; ++c)
      global_max = std::max(global_max, partials[(row * chunks + c) * stride + g]);
    float total = 0.0f;
    float* out = output.out + hq * dim;
    std::fill(out, out + dim, 0.0f);
    for (std::int64_t c = 0; c < chunks; ++c) {
      const float* p = partials.data() + (row * chunks + c) * stride;
      if (p[g] == kNegInf) continue;
      const float w = std::exp(p[g] - global_max);
      total += p[group + g] * w;
      axpy(w, p + 2 * group + g * dim, out, dim);
    }
    const float inv = 1.0f / total;
    for (std::int64_t i = 0; i < dim; ++i) out[i] *= inv;
    const float lse = global_max + std::log(total);
    if (output.lse) output.lse[hq] = lse;
    if (output.weights) {
      float* w = output.weights + hq * count;
#pragma omp simd
      for (std::int64_t i = 0; i < count; ++i) w[i] = std::exp(w[i] - lse);
    }
  });
}

void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  KVPACK_CHECK(keys.data && queries && out, "queries/keys/out: null pointer");
  KVPACK_CHECK(keys.heads > 0 && keys.tokens > 0 && keys.dim > 0,
               "keys: expected a non-empty [heads_kv, tokens, head_dim] cache, got ["
                   << keys.heads << ", " << keys.tokens << ", " << keys.dim << "]");
  KVPACK_CHECK(heads_q > 0 && heads_q % keys.heads == 0,
               "queries: expected heads_q to be a positive multiple of heads_kv="
                   << keys.heads << ", got " << heads_q);
  KVPACK_CHECK(window > 0, "queries: expected at least one query per head, got 0");
  KVPACK_CHECK(!params.causal || window <= keys.tokens,
               "queries: a causal window of " << window << " queries needs at least as many keys, got "
                                              << keys.tokens);
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  const std::int64_t group_size = heads_q / keys.heads;
  const std::int64_t first_position = params.causal ? tokens - window : 0;
  const float scale = resolve_scale(params.scale, dim);
  constexpr std::int64_t kQueryBlock = 64;

  // One KV head per work item: results do not depend on the thread count.
  parallel_for(keys.heads, [&](std::int64_t head) {
    RowMatrix k_float;
    const float* k_data = static_cast<const float*>(keys.row(head, 0));
    if (keys.dtype != DType::Float32) {
      k_float.resize(tokens, dim);
      to_float(keys.row(head, 0), keys.dtype, tokens * dim, k_float.data());
      k_data = k_float.data();
    }
    Eigen::Map<const RowMatrix> k(k_data, tokens, dim);
    RowMatrix s;
    for (std::int64_t g = 0; g < group_size; ++g) {
      const std::int64_t hq = head * group_size + g;
      float* acc = out + (params.per_query_head ? hq : head) * tokens;
      if (params.per_query_head || g == 0) std::fill(acc, acc + tokens, 0.0f);
      for (std::int64_t i0 = 0; i0 < window; i0 += kQueryBlock) {
        const std::int64_t rows = std::min(kQueryBlock, window - i0);
        // Keys past the block's last query position are masked for every row: skip them.
        const std::int64_t visible_block = params.causal ? first_position + i0 + rows : tokens;
        Eigen::Map<const RowMatrix> qb(queries + (hq * window + i0) * dim, rows, dim);
        s.resize(rows, visible_block);
        s.noalias() = qb * k.topRows(visible_block).transpose();
        for (std::int64_t r = 0; r < rows; ++r) {
          const std::int64_t visible = params.causal ? first_position + i0 + r + 1 : tokens;
          float* sr = s.data() + r * visible_block;
          float row_max = kNegInf;
          for (std::int64_t j = 0; j < visible; ++j) row_max = std::max(row_max, sr[j] * scale);
          float row_sum = 0.0f;
          for (std::int64_t j = 0; j < visible; ++j) {
            sr[j] = std::exp(sr[j] * scale - row_max);
            row_sum += sr[j];
          }
          const float inv = 1.0f / row_sum;
#pragma omp simd
          for (std::int64_t j = 0; j < visible; ++j) acc[j] += sr[j] * inv;
        }
      }
    }
    if (params.reduction == Reduction::Mean) {
      const std::int64_t rows_out = params.per_query_head ? group_size : 1;
      const float group_factor = params.per_query_head ? 1.0f : static_cast<float>(group_size);
      for (std::int64_t r = 0; r < rows_out; ++r) {
        float* acc = out + (params.per_query_head ? head * group_size + r : head) * tokens;
        for (std::int64_t j = 0; j < tokens; ++j) {
          // Queries at positions >= j see key j.
          const std::int64_t seen = params.causal ? std::min(window, tokens - j) : window;
          acc[j] /= group_factor * static_cast<float>(seen);
        }
      }
    }
  });
}

}  // namespace kvpack
