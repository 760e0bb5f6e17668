// CPU decode attention: a flash-decoding pass. Each work item streams one token
// range of one KV head for its whole GQA group (so K and V rows are read once per
// group), keeping a running max, sum and output; ranges are merged by log-sum-exp.
// Compiled once for every CPU target (cpu_kernels.h).

#include "kvpack/attention.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "kvpack/convert.h"
#include "kvpack/cpu.h"
#include "kvpack/parallel.h"
#include "merge_states.h"
#include "vec.h"

namespace kvpack::KVPACK_TARGET_NS {

namespace {

constexpr std::int64_t kBlockTokens = 32;      // tokens converted and scored together
constexpr std::int64_t kMinChunkTokens = 512;  // smallest token range worth a work item
constexpr std::int64_t kPrefetchTokens = 64;   // how far ahead K/V rows are prefetched
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using detail::floatv;
using detail::kLanes;
using detail::load_lanes;

// out[g * ld + j] = q_g . k_j for the `Tile` queries at q (Tile * dim floats) and the
// two keys k_0, k_1: one load of each key slice feeds every query, and 2 * Tile
// independent FMA chains keep the units busy.
// Always inlined: an out-of-line copy trips GCC 12's false -Wuninitialized in
// _mm512_reduce_add_ps, and every caller is a hot loop.
template <int Tile, class T>
__attribute__((always_inline)) inline void dot_tile2(const float* q, const T* k0, const T* k1,
                                                     std::int64_t dim, float* out,
                                                     std::int64_t ld) {
  floatv acc0[Tile], acc1[Tile];
  for (int g = 0; g < Tile; ++g) acc0[g] = acc1[g] = floatv{};  // in registers, not memset
  std::int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    const floatv a = load_lanes(k0 + i), b = load_lanes(k1 + i);
    for (int g = 0; g < Tile; ++g) {
      const floatv qg = load_lanes(q + g * dim + i);
      acc0[g] += qg * a;
      acc1[g] += qg * b;
    }
  }
  for (int g = 0; g < Tile; ++g) {
    float s0 = detail::reduce_add(acc0[g]), s1 = detail::reduce_add(acc1[g]);
    for (std::int64_t r = i; r < dim; ++r) {
      s0 += q[g * dim + r] * detail::widen(k0[r]);
      s1 += q[g * dim + r] * detail::widen(k1[r]);
    }
    out[g * ld] = s0;
    out[g * ld + 1] = s1;
  }
}

// out_g += sum_j p[g * ld + j] * v_j over the n rows v_j, for the `Tile` outputs at out
// (Tile * dim floats): each slice of the outputs stays in registers across the rows.
// Chunks consecutive slices at once give Tile * Chunks independent FMA chains, enough
// to hide the FMA latency (a chain per output slice alone waits on it).
template <int Tile, class T>
inline void accumulate_tile(const T* const* v, std::int64_t n, const float* p, std::int64_t ld,
                            std::int64_t dim, float* out) {
  constexpr int Chunks = Tile >= 8 ? 1 : Tile >= 3 ? 2 : 4;
  std::int64_t i = 0;
  for (; i + Chunks * kLanes <= dim; i += Chunks * kLanes) {
    floatv acc[Tile][Chunks];
    for (int g = 0; g < Tile; ++g)
      for (int c = 0; c < Chunks; ++c) acc[g][c] = load_lanes(out + g * dim + i + c * kLanes);
    for (std::int64_t j = 0; j < n; ++j) {
      floatv vv[Chunks];
      for (int c = 0; c < Chunks; ++c) vv[c] = load_lanes(v[j] + i + c * kLanes);
      for (int g = 0; g < Tile; ++g) {
        const float pg = p[g * ld + j];
        for (int c = 0; c < Chunks; ++c) acc[g][c] += pg * vv[c];
      }
    }
    for (int g = 0; g < Tile; ++g)
      for (int c = 0; c < Chunks; ++c)
        detail::store_lanes(out + g * dim + i + c * kLanes, acc[g][c]);
  }
  for (; i + kLanes <= dim; i += kLanes) {
    floatv acc[Tile];
    for (int g = 0; g < Tile; ++g) acc[g] = load_lanes(out + g * dim + i);
    for (std::int64_t j = 0; j < n; ++j) {
      const floatv vv = load_lanes(v[j] + i);
      for (int g = 0; g < Tile; ++g) acc[g] += p[g * ld + j] * vv;
    }
    for (int g = 0; g < Tile; ++g) detail::store_lanes(out + g * dim + i, acc[g]);
  }
  for (; i < dim; ++i)
    for (std::int64_t j = 0; j < n; ++j)
      for (int g = 0; g < Tile; ++g) out[g * dim + i] += p[g * ld + j] * detail::widen(v[j][i]);
}

// Running softmax state of `Tile` query heads over one token range.
struct Partial {
  float* max;     // size Tile
  float* sum;     // size Tile
  float* output;  // size Tile * dim, un-normalised
};

// What the kernel adds to the scaled dot products of one row: a softcap (> 0: a score s
// becomes softcap * tanh(s / softcap), as Gemma 2 caps its logits), then a bias per token;
// when `scores` is non-null, the scores are stored at scores[g * count + p].
struct ScoreTerms {
  const float* bias = nullptr;
  float* scores = nullptr;
  float softcap = 0.0f;
};

// Streams positions [begin, end) of a row of `count` positions; position p is token
// token_at(p) of KV head `head`; T is the storage element type. qs holds the tile's
// pre-scaled queries (Tile * dim).
template <int Tile, class T, class TokenAt>
void attend_range(const float* qs, const KVView& keys, const KVView& values, std::int64_t head,
                  TokenAt token_at, std::int64_t begin, std::int64_t end, std::int64_t count,
                  const ScoreTerms& terms, Partial state) {
  const std::int64_t dim = keys.dim;
  float s[Tile * kBlockTokens] = {};  // slots past a short block's end stay finite
  std::int64_t tokens[kBlockTokens];
  const T* rows[kBlockTokens];
  for (int g = 0; g < Tile; ++g) {
    state.max[g] = kNegInf;
    state.sum[g] = 0.0f;
  }
  std::fill(state.output, state.output + Tile * dim, 0.0f);

  const std::int64_t row_bytes = dim * static_cast<std::int64_t>(sizeof(T));
  for (std::int64_t b = begin; b < end; b += kBlockTokens) {
    const std::int64_t nb = std::min(kBlockTokens, end - b);
    for (std::int64_t j = 0; j < nb; ++j) tokens[j] = token_at(b + j);

    // Scores: each key row is read once for every query of the tile.
    for (std::int64_t j = 0; j < nb; j += 2) {
      // Ask for the K and V rows kPrefetchTokens ahead, spread over the compute: a
      // single core needs many misses in flight to stream at memory bandwidth.
      for (std::int64_t p = b + j + kPrefetchTokens; p < std::min(end, b + j + kPrefetchTokens + 2);
           ++p) {
        const std::int64_t t = token_at(p);
        const char* k_row = static_cast<const char*>(keys.row(head, t));
        const char* v_row = static_cast<const char*>(values.row(head, t));
        for (std::int64_t off = 0; off < row_bytes; off += 64) {
          __builtin_prefetch(k_row + off, 0, 2);
          __builtin_prefetch(v_row + off, 0, 2);
        }
      }
      const T* k0 = static_cast<const T*>(keys.row(head, tokens[j]));
      const T* k1 = j + 1 < nb ? static_cast<const T*>(keys.row(head, tokens[j + 1])) : k0;
      dot_tile2<Tile>(qs, k0, k1, dim, s + j, kBlockTokens);
    }
    if (terms.softcap > 0.0f)
      for (int g = 0; g < Tile; ++g)
        for (std::int64_t j = 0; j < nb; ++j) {
          float& score = s[g * kBlockTokens + j];
          score = capped_score(score, terms.softcap);
        }
    if (terms.bias)
      for (int g = 0; g < Tile; ++g)
        for (std::int64_t j = 0; j < nb; ++j) s[g * kBlockTokens + j] += terms.bias[tokens[j]];

    // Online softmax update.
    for (int g = 0; g < Tile; ++g) {
      float* sg = s + g * kBlockTokens;
      if (terms.scores) std::copy(sg, sg + nb, terms.scores + g * count + b);
      float block_max = kNegInf;
      for (std::int64_t j = 0; j < nb; ++j) block_max = std::max(block_max, sg[j]);
      const float new_max = std::max(state.max[g], block_max);
      if (state.max[g] != kNegInf && state.max[g] != new_max) {
        const float correction = std::exp(state.max[g] - new_max);
        state.sum[g] *= correction;
        float* og = state.output + g * dim;
        for (std::int64_t i = 0; i < dim; ++i) og[i] *= correction;
      }
      // Exponentials kLanes at a time; slots past the block's end are zeroed.
      floatv sums = {};
      for (std::int64_t j = 0; j < kBlockTokens; j += kLanes) {
        floatv e = detail::exp_lanes(load_lanes(sg + j) - new_max);
        for (std::int64_t l = 0; l < kLanes; ++l)
          if (j + l >= nb) e[l] = 0.0f;
        detail::store_lanes(sg + j, e);
        sums += e;
      }
      const float block_sum = detail::reduce_add(sums);
      state.sum[g] += block_sum;
      state.max[g] = new_max;
    }

    // Values: each row is read once and accumulated into every output of the tile.
    for (std::int64_t j = 0; j < nb; ++j)
      rows[j] = static_cast<const T*>(values.row(head, tokens[j]));
    accumulate_tile<Tile>(rows, nb, s, kBlockTokens, dim, state.output);
  }
}

template <int Tile, class TokenAt>
void attend_range_typed(const float* qs, const KVView& keys, const KVView& values,
                        std::int64_t head, TokenAt token_at, std::int64_t begin, std::int64_t end,
                        std::int64_t count, const ScoreTerms& terms, Partial state) {
  switch (keys.dtype) {
    case DType::Float32:
      return attend_range<Tile, float>(qs, keys, values, head, token_at, begin, end, count, terms,
                                       state);
    case DType::Float16:
      return attend_range<Tile, _Float16>(qs, keys, values, head, token_at, begin, end, count,
                                          terms, state);
    case DType::BFloat16:
      return attend_range<Tile, detail::bf16>(qs, keys, values, head, token_at, begin, end, count,
                                              terms, state);
  }
}

// Largest tile of query heads (8, 4, 3, 2 or 1) that divides the group size (3: the
// groups of SmolLM2 and other 3:1 GQA models read each K/V row once, not three times).
int tile_for(std::int64_t group) {
  for (int tile : {8, 4, 3, 2})
    if (group % tile == 0) return tile;
  return 1;
}

// The n query values at q times the score scale, as the kernels read them.
std::vector<float> scaled(const float* q, std::int64_t n, float scale) {
  std::vector<float> out(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = q[i] * scale;
  return out;
}

// How an attention pass splits its streams (tiles of query heads, each over at most
// `count` tokens) into work items of token chunks: enough items for every thread, none
// shorter than kMinChunkTokens. Item i = stream * chunks + chunk keeps its softmax state
// in partials at i * stride.
struct SplitK {
  std::int64_t tile, chunks, chunk_len, stride;
  std::vector<float> partials;

  SplitK(std::int64_t streams, std::int64_t count, std::int64_t tile_heads, std::int64_t dim)
      : tile(tile_heads), stride(tile_heads * (dim + 2)) {
    const std::int64_t wanted =
        std::max<std::int64_t>(1, (4 * num_threads() + streams - 1) / streams);
    chunks = std::max<std::int64_t>(1, std::min(wanted, count / kMinChunkTokens));
    chunk_len = (count + chunks - 1) / chunks;
    partials.resize(static_cast<std::size_t>(streams * chunks * stride));
  }

  Partial state(std::int64_t item) {
    float* p = partials.data() + item * stride;
    return Partial{p, p + tile, p + 2 * tile};
  }

  /// Tokens [begin, end) of item's chunk of a stream over `count` tokens; when the chunk
  /// is past the stream's end, the item's state holds no score.
  std::pair<std::int64_t, std::int64_t> range(std::int64_t item, std::int64_t count) {
    const std::int64_t begin = (item % chunks) * chunk_len;
    const std::int64_t end = std::min(count, begin + chunk_len);
    if (begin >= end) std::fill(state(item).max, state(item).max + tile, kNegInf);
    return {begin, end};
  }

  /// Merges query head g of a stream's tile over its chunks into out (size dim).
  float merge(std::int64_t stream, std::int64_t g, std::int64_t dim, float* out) const {
    return detail::merge_states(partials.data() + stream * chunks * stride, chunks, stride, tile, g,
                                dim, out);
  }
};

template <class TokenAt>
void attend_range_tiled(int tile, const float* qs, const KVView& keys, const KVView& values,
                        std::int64_t head, TokenAt token_at, std::int64_t begin, std::int64_t end,
                        std::int64_t count, const ScoreTerms& terms, Partial state) {
  switch (tile) {
    case 8:
      return attend_range_typed<8>(qs, keys, values, head, token_at, begin, end, count, terms,
                                   state);
    case 4:
      return attend_range_typed<4>(qs, keys, values, head, token_at, begin, end, count, terms,
                                   state);
    case 3:
      return attend_range_typed<3>(qs, keys, values, head, token_at, begin, end, count, terms,
                                   state);
    case 2:
      return attend_range_typed<2>(qs, keys, values, head, token_at, begin, end, count, terms,
                                   state);
    default:
      return attend_range_typed<1>(qs, keys, values, head, token_at, begin, end, count, terms,
                                   state);
  }
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

// Calls f(std::integral_constant<int, Tile>, const T* null) for the tile and the storage
// type of `dtype`: the halves of attention below run as attend_range does.
template <class F>
void with_tile_and_type(int tile, DType dtype, F&& f) {
  const auto typed = [&](auto tile_c) {
    switch (dtype) {
      case DType::Float32:
        return f(tile_c, static_cast<const float*>(nullptr));
      case DType::Float16:
        return f(tile_c, static_cast<const _Float16*>(nullptr));
      case DType::BFloat16:
        return f(tile_c, static_cast<const detail::bf16*>(nullptr));
    }
  };
  switch (tile) {
    case 8:
      return typed(std::integral_constant<int, 8>{});
    case 4:
      return typed(std::integral_constant<int, 4>{});
    case 3:
      return typed(std::integral_constant<int, 3>{});
    case 2:
      return typed(std::integral_constant<int, 2>{});
    default:
      return typed(std::integral_constant<int, 1>{});
  }
}

// Asks for the rows of tokens [from, to) of a head (within n) ahead of their use.
inline void prefetch_rows(const KVView& view, std::int64_t head, const std::int32_t* tokens,
                          std::int64_t from, std::int64_t to, std::int64_t n) {
  const std::int64_t row_bytes = view.dim * static_cast<std::int64_t>(dtype_size(view.dtype));
  for (std::int64_t p = from; p < std::min(to, n); ++p) {
    const char* row = static_cast<const char*>(view.row(head, tokens[p]));
    for (std::int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 2);
  }
}

}  // namespace

void gather_scores(const float* q, std::int64_t n_q, const KVView& keys, std::int64_t head,
                   const std::int32_t* tokens, std::int64_t n, float* out) {
  const std::int64_t dim = keys.dim;
  const int tile = tile_for(n_q);
  with_tile_and_type(tile, keys.dtype, [&](auto tile_c, auto type) {
    constexpr int Tile = decltype(tile_c)::value;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
    for (std::int64_t first = 0; first < n_q; first += Tile) {
      const float* qt = q + first * dim;
      float* ot = out + first * n;
      std::int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        prefetch_rows(keys, head, tokens, j + kPrefetchTokens, j + kPrefetchTokens + 2, n);
        dot_tile2<Tile>(qt, static_cast<const T*>(keys.row(head, tokens[j])),
                        static_cast<const T*>(keys.row(head, tokens[j + 1])), dim, ot + j, n);
      }
      if (j < n) {  // the odd last token: its pair's second score goes to scratch
        float pair[2 * Tile];
        const T* k = static_cast<const T*>(keys.row(head, tokens[j]));
        dot_tile2<Tile>(qt, k, k, dim, pair, 2);
        for (int g = 0; g < Tile; ++g) ot[g * n + j] = pair[2 * g];
      }
    }
  });
}

void weighted_value_sum(const float* weights, std::int64_t n_q, const KVView& values,
                        std::int64_t head, const std::int32_t* tokens, std::int64_t n, float* out) {
  const std::int64_t dim = values.dim;
  std::fill(out, out + n_q * dim, 0.0f);
  const int tile = tile_for(n_q);
  with_tile_and_type(tile, values.dtype, [&](auto tile_c, auto type) {
    constexpr int Tile = decltype(tile_c)::value;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
    const T* rows[kBlockTokens];
    for (std::int64_t first = 0; first < n_q; first += Tile)
      for (std::int64_t b = 0; b < n; b += kBlockTokens) {
        const std::int64_t nb = std::min(kBlockTokens, n - b);
        prefetch_rows(values, head, tokens, b + kBlockTokens, b + 2 * kBlockTokens, n);
        for (std::int64_t j = 0; j < nb; ++j)
          rows[j] = static_cast<const T*>(values.row(head, tokens[b + j]));
        accumulate_tile<Tile>(rows, nb, weights + first * n + b, n, dim, out + first * dim);
      }
  });
}

namespace cpu {

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

  // A work item is (row, token chunk); a row is a tile of query heads that share a KV
  // head (and an index row), so each K/V row is read once per tile.
  const std::int64_t tile = per_query_head ? 1 : tile_for(group_size);
  const std::int64_t rows = heads_q / tile;
  SplitK split(rows, count, tile, dim);
  const std::int64_t chunks = split.chunks;
  const float scale = resolve_scale(params.scale, dim);

  parallel_for(rows * chunks, [&](std::int64_t item) {
    const std::int64_t first_q = (item / split.chunks) * tile;
    const std::int64_t head = first_q / group_size;
    const auto [begin, end] = split.range(item, count);
    if (begin >= end) return;
    const std::vector<float> qs = scaled(q + first_q * dim, tile * dim, scale);
    const Partial state = split.state(item);
    const ScoreTerms terms{bias ? bias + head * keys.tokens : nullptr,
                           output.weights ? output.weights + first_q * count : nullptr};
    const int t = static_cast<int>(tile);
    if (indices) {
      const std::int32_t* idx = indices->data + (indices->rows == heads_q ? first_q : head) * count;
      auto token_at = [idx](std::int64_t pos) { return static_cast<std::int64_t>(idx[pos]); };
      attend_range_tiled(t, qs.data(), keys, values, head, token_at, begin, end, count, terms,
                         state);
    } else {
      auto token_at = [](std::int64_t pos) { return pos; };
      attend_range_tiled(t, qs.data(), keys, values, head, token_at, begin, end, count, terms,
                         state);
    }
  });

  // Merge the chunks of every query head by log-sum-exp, then normalise the weights.
  // Without weights this is a few vector operations per head: a thread team would cost
  // more than it saves.
  const auto merge = [&](std::int64_t hq) {
    const float lse = split.merge(hq / tile, hq % tile, dim, output.out + hq * dim);
    if (output.lse) output.lse[hq] = lse;
    if (output.weights) {
      float* w = output.weights + hq * count;
      std::int64_t i = 0;
      for (; i + kLanes <= count; i += kLanes)
        detail::store_lanes(w + i, detail::exp_lanes(load_lanes(w + i) - lse));
      for (; i < count; ++i) w[i] = std::exp(w[i] - lse);
    }
  };
  if (output.weights)
    parallel_for(heads_q, merge);
  else
    for (std::int64_t hq = 0; hq < heads_q; ++hq) merge(hq);
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
               "queries: a causal window of "
                   << window << " queries needs at least as many keys, got " << keys.tokens);
  const std::int64_t tokens = keys.tokens, dim = keys.dim;
  const std::int64_t group_size = heads_q / keys.heads;
  const std::int64_t first_position = params.causal ? tokens - window : 0;
  const float scale = resolve_scale(params.scale, dim);
  constexpr std::int64_t kQueryBlock = 64;

  // One query head per work item, each summing into its own row (the GQA group's rows
  // are added in order afterwards): results do not depend on the thread count.
  const std::int64_t own_rows = params.per_query_head || group_size == 1 ? 0 : heads_q;
  std::vector<float> per_query(static_cast<std::size_t>(own_rows * tokens));
  parallel_for(heads_q, [&](std::int64_t hq) {
    const std::int64_t head = hq / group_size;
    RowMatrix k_float;
    const float* k_data = static_cast<const float*>(keys.row(head, 0));
    if (keys.dtype != DType::Float32) {
      k_float.resize(tokens, dim);
      to_float(keys.row(head, 0), keys.dtype, tokens * dim, k_float.data());
      k_data = k_float.data();
    }
    Eigen::Map<const RowMatrix> k(k_data, tokens, dim);
    RowMatrix s;
    float* acc = own_rows ? per_query.data() + hq * tokens
                          : out + (params.per_query_head ? hq : head) * tokens;
    std::fill(acc, acc + tokens, 0.0f);
    for (std::int64_t i0 = 0; i0 < window; i0 += kQueryBlock) {
      const std::int64_t rows = std::min(kQueryBlock, window - i0);
      // Keys past the block's last query position are masked for every row: skip them.
      const std::int64_t visible_block = params.causal ? first_position + i0 + rows : tokens;
      Eigen::Map<const RowMatrix> qb(queries + (hq * window + i0) * dim, rows, dim);
      s.resize(rows, visible_block);
      s.noalias() = (qb * scale) * k.topRows(visible_block).transpose();
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t visible = params.causal ? first_position + i0 + r + 1 : tokens;
        float* sr = s.data() + r * visible_block;
        float row_max = kNegInf;
#pragma omp simd reduction(max : row_max)
        for (std::int64_t j = 0; j < visible; ++j) row_max = std::max(row_max, sr[j]);
        // Exponentials kLanes at a time: they, not the products, dominate this pass.
        detail::floatv sums = {};
        std::int64_t j = 0;
        for (; j + kLanes <= visible; j += kLanes) {
          const floatv e = detail::exp_lanes(load_lanes(sr + j) - row_max);
          detail::store_lanes(sr + j, e);
          sums += e;
        }
        float row_sum = detail::reduce_add(sums);
        for (; j < visible; ++j) {
          sr[j] = std::exp(sr[j] - row_max);
          row_sum += sr[j];
        }
        const float inv = 1.0f / row_sum;
#pragma omp simd
        for (std::int64_t t = 0; t < visible; ++t) acc[t] += sr[t] * inv;
      }
    }
  });
  if (own_rows)  // the group's sum, in query-head order
    for (std::int64_t head = 0; head < keys.heads; ++head) {
      float* acc = out + head * tokens;
      std::fill(acc, acc + tokens, 0.0f);
      for (std::int64_t g = 0; g < group_size; ++g) {
        const float* row = per_query.data() + (head * group_size + g) * tokens;
#pragma omp simd
        for (std::int64_t t = 0; t < tokens; ++t) acc[t] += row[t];
      }
    }
  if (params.reduction == Reduction::Mean) {
    const std::int64_t rows_out = params.per_query_head ? heads_q : keys.heads;
    const float group_factor = params.per_query_head ? 1.0f : static_cast<float>(group_size);
    for (std::int64_t r = 0; r < rows_out; ++r) {
      float* acc = out + r * tokens;
      for (std::int64_t j = 0; j < tokens; ++j) {
        // Queries at positions >= j see key j.
        const std::int64_t seen = params.causal ? std::min(window, tokens - j) : window;
        acc[j] /= group_factor * static_cast<float>(seen);
      }
    }
  }
}

}  // namespace cpu

void held_attention(const float* queries, std::int64_t new_queries, std::int64_t heads_q,
                    std::int64_t first_query, const BatchKVView& keys, const BatchKVView& values,
                    const HeldSlots& slots, const ScoreRules& rules, float* out) {
  KVPACK_CHECK(queries && out, "queries/out: null pointer");
  const std::int64_t batch = keys.batch;
  KVPACK_CHECK(
      batch > 0 && new_queries > 0,
      "queries: expected at least one row and one query, got " << batch << " and " << new_queries);
  KVPACK_CHECK(values.batch == batch && values.dtype == keys.dtype &&
                   (keys.tokens <= 1 ||
                    (keys.token_stride == keys.dim && values.token_stride == values.dim)),
               "keys/values: expected one shape and dtype, each head's rows contiguous");
  const KVView first = keys.row(0, 0, keys.tokens);
  check_kv(first, values.row(0, 0, values.tokens));
  const std::int64_t heads_kv = first.heads, tokens = first.tokens, dim = first.dim;
  const std::int64_t held = slots.held;
  KVPACK_CHECK(heads_q > 0 && heads_q % heads_kv == 0,
               "queries: expected heads_q to be a positive multiple of heads_kv="
                   << heads_kv << ", got " << heads_q);
  KVPACK_CHECK(held >= 0 && held <= tokens && (held == 0 || slots.positions),
               "slots: expected held in [0, " << tokens << "] with positions, got " << held);
  KVPACK_CHECK(rules.window >= 0 && rules.softcap >= 0.0f,
               "rules: expected window >= 0 and softcap >= 0");

  // What query i (at position first_query + i) sees: the held slots at positions in
  // [0, p] and, with a window, > p - window, listed per (row, KV head, query) where some
  // held slot is hidden; then the decoded slots [decoded_first(i), decoded_end(i)).
  const std::int64_t decoded = tokens - held;
  const auto lowest = [&](std::int64_t i) {  // the lowest position query i sees
    return rules.window > 0 ? first_query + i - rules.window + 1 : std::int64_t{0};
  };
  const auto decoded_first = [&](std::int64_t i) {
    return std::clamp<std::int64_t>(lowest(i) - slots.first_decoded, 0, decoded);
  };
  const auto decoded_end = [&](std::int64_t i) {
    return std::clamp<std::int64_t>(first_query + i - slots.first_decoded + 1, 0, decoded);
  };
  const std::int64_t lists = batch * heads_kv * new_queries;  // (row, KV head, query)
  std::vector<std::int64_t> visible_held(static_cast<std::size_t>(lists), held);
  std::vector<std::int32_t> held_index;
  for (std::int64_t l = 0; l < lists; ++l) {
    const std::int64_t* p = slots.positions + (l / new_queries) * held;
    const std::int64_t low = std::max<std::int64_t>(0, lowest(l % new_queries));
    const auto seen = [low](std::int64_t x) { return x >= low; };
    if (std::all_of(p, p + held, seen)) continue;
    if (held_index.empty()) held_index.resize(static_cast<std::size_t>(lists * held));
    std::int32_t* index = held_index.data() + l * held;
    std::int64_t n = 0;
    for (std::int64_t s = 0; s < held; ++s)
      if (seen(p[s])) index[n++] = static_cast<std::int32_t>(s);
    visible_held[static_cast<std::size_t>(l)] = n;
  }
  // The bias indexed by slot, as the kernel reads it: the held slots' own, 0 after them.
  std::vector<float> bias;
  if (slots.bias) {
    bias.assign(static_cast<std::size_t>(batch * heads_kv * tokens), 0.0f);
    for (std::int64_t l = 0; l < batch * heads_kv; ++l)
      std::copy(slots.bias + l * held, slots.bias + (l + 1) * held, bias.data() + l * tokens);
  }

  // Work items as in decode_attention, over every (row, query, tile of heads, chunk).
  const std::int64_t group_size = heads_q / heads_kv;
  const std::int64_t tile = tile_for(group_size);
  const std::int64_t rows = heads_q / tile;
  const std::int64_t streams = batch * new_queries * rows;
  SplitK split(streams, held + decoded_end(new_queries - 1), tile, dim);
  const float scale = resolve_scale(rules.scale, dim);

  parallel_for(streams * split.chunks, [&](std::int64_t item) {
    const std::int64_t stream = item / split.chunks;
    const std::int64_t row = stream % rows, query = stream / rows;  // query = b * new + i
    const std::int64_t b = query / new_queries, i = query % new_queries;
    const std::int64_t first_q = row * tile, head = first_q / group_size;
    const std::int64_t list = (b * heads_kv + head) * new_queries + i;
    const std::int64_t seen_held = visible_held[static_cast<std::size_t>(list)];
    const std::int64_t skipped = decoded_first(i);  // decoded slots before the window
    const std::int64_t count = seen_held + decoded_end(i) - skipped;
    KVPACK_CHECK(count > 0, "queries: query " << i << " of row " << b << " sees no slot");
    const auto [begin, end] = split.range(item, count);
    if (begin >= end) return;
    const std::vector<float> qs =
        scaled(queries + (query * heads_q + first_q) * dim, tile * dim, scale);
    const Partial state = split.state(item);
    const ScoreTerms terms{slots.bias ? bias.data() + (b * heads_kv + head) * tokens : nullptr,
                           nullptr, rules.softcap};
    const int t = static_cast<int>(tile);
    const KVView row_keys = keys.row(b, 0, tokens), row_values = values.row(b, 0, tokens);
    const std::int64_t decoded_at = held + skipped - seen_held;  // slot of position seen_held
    if (seen_held == held && skipped == 0) {  // the slots are a prefix of the rows
      auto token_at = [](std::int64_t pos) { return pos; };
      attend_range_tiled(t, qs.data(), row_keys, row_values, head, token_at, begin, end, count,
                         terms, state);
    } else {
      const std::int32_t* index = held_index.empty() ? nullptr : held_index.data() + list * held;
      auto token_at = [index, seen_held, decoded_at](std::int64_t pos) {
        if (pos >= seen_held) return decoded_at + pos;
        return index ? static_cast<std::int64_t>(index[pos]) : pos;
      };
      attend_range_tiled(t, qs.data(), row_keys, row_values, head, token_at, begin, end, count,
                         terms, state);
    }
  });

  for (std::int64_t stream = 0; stream < streams; ++stream) {
    const std::int64_t row = stream % rows, query = stream / rows;
    for (std::int64_t g = 0; g < tile; ++g) {
      const std::int64_t hq = row * tile + g;
      float* o = out + (query * heads_q + hq) * dim;
      const float lse = split.merge(stream, g, dim, o);
      if (rules.sinks) {  // the sink's share of the softmax goes nowhere
        const float kept = sink_share(rules.sinks[hq], lse);
        for (std::int64_t d = 0; d < dim; ++d) o[d] *= kept;
      }
    }
  }
}

}  // namespace kvpack::KVPACK_TARGET_NS
