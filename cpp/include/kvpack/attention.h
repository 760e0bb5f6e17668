// Decode-step attention over one layer's KV cache, dense or over token index
// sets, and the accumulated attention a block of prompt queries gives each key.
// Every compression and recall method in kvpack attends and scores through here.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvpack/backend.h"
#include "kvpack/common.h"

namespace kvpack {

/// Parameters of decode_attention.
struct AttentionParams {
  float scale = 0.0f;  ///< multiplies q.k; 0 means 1/sqrt(head_dim)
};

/// Where decode_attention writes; lse and weights may be null.
struct AttentionOutput {
  float* out = nullptr;      ///< size heads_q * dim: attention output
  float* lse = nullptr;      ///< size heads_q: log-sum-exp of the scaled (+ biased) scores
  float* weights = nullptr;  ///< size heads_q * n: softmax weights, n = tokens or indices->count
};

/// One decode step of grouped-query attention, float32 arithmetic over any
/// storage dtype, one pass over the attended K and V rows.
///
/// Query head h reads KV head h / (heads_q / keys.heads).
/// @param q        size heads_q * keys.dim, float32
/// @param heads_q  a multiple of keys.heads
/// @param keys     [heads_kv, tokens, dim]
/// @param values   same shape and dtype as keys
/// @param indices  null for dense attention; else rows == heads_kv (shared by a
///                 group) or heads_q, each row sorted, unique, within [0, tokens)
/// @param bias     null, or size heads_kv * tokens: added to each scaled score
///                 (e.g. a merged slot's log-count)
/// @param exec     stream and scratch of the CUDA backend
///
/// The backend is the one of keys.device: every pointer (q, bias, the outputs, the
/// indices) lives there too. Host data runs on the CUDA backend with exec.stage_to_cuda.
void decode_attention(const float* q, std::int64_t heads_q, const KVView& keys,
                      const KVView& values, const IndexView* indices, const float* bias,
                      const AttentionParams& params, const AttentionOutput& output,
                      const Execution& exec = {});

/// The value half of decode attention, for weights computed beforehand (from
/// gather_scores): out[g] = sum_j weights[g * n + j] * values[head, tokens[j]] for the n_q
/// rows of weights, each of `n` floats; out: size n_q * values.dim. Host memory.
void weighted_value_sum(const float* weights, std::int64_t n_q, const KVView& values,
                        std::int64_t head, const std::int32_t* tokens, std::int64_t n, float* out);

/// Where the slots of one layer's decode cache stand: the first `held` slots hold what
/// was kept of the past (a compressed prompt, or what a decode-time compression kept),
/// in any order, each at its logical position (-1: an empty slot, as a padded row's);
/// the slots after them hold the decoded tokens in order, slot held + j the token at
/// position first_decoded + j. Every held position precedes first_decoded.
struct HeldSlots {
  const std::int64_t* positions = nullptr;  ///< [batch, heads_kv, held]
  std::int64_t held = 0;
  std::int64_t first_decoded = 0;
  const float* bias =
      nullptr;  ///< [batch, heads_kv, held] added to the held slots' scores, or null
};

/// What a model's attention adds to scaled dot products, for held_attention.
struct ScoreRules {
  float scale = 0.0f;            ///< multiplies q.k; 0 means 1/sqrt(head_dim)
  float softcap = 0.0f;          ///< > 0: a score s becomes softcap * tanh(s / softcap) (Gemma 2)
  std::int64_t window = 0;       ///< > 0: a query at position p sees positions > p - window only
  const float* sinks = nullptr;  ///< [heads_q] or null: a logit per query head that joins
                                 ///< the softmax and attends nothing (gpt-oss's sinks)
};

/// The scale a score takes: `scale`, or 1/sqrt(dim) for 0 (the default of every attention).
inline float resolve_scale(float scale, std::int64_t dim) {
  return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(dim));
}

/// A scaled score under a softcap (> 0: softcap * tanh(score / softcap), as Gemma 2 caps
/// its logits; 0: unchanged).
inline float capped_score(float score, float softcap) {
  return softcap > 0.0f ? softcap * std::tanh(score / softcap) : score;
}

/// The share of an attention output that a sink logit leaves (1 / (1 + exp(sink - lse)) for
/// scores of log-sum-exp `lse`): the rest of the softmax goes to the sink, which attends
/// nothing.
inline float sink_share(float sink, float lse) {
  return 1.0f / (1.0f + std::exp(sink - lse));
}

/// One decode step of a batch over one layer's cache (HeldSlots): query i of row b, at
/// position first_query + i, attends the row's non-empty held slots and the decoded slots
/// up to its own position (within rules.window of it), in one softmax; grouped-query
/// heads as in decode_attention. All rows, positions and heads run in one parallel pass.
/// Host memory only.
/// @param queries      [batch, new_queries, heads_q, dim] float32 (the token-major layout of
///                     a model's attention output)
/// @param keys,values  [batch, heads_kv, slots, dim], each head's rows contiguous, one
///                     shape and dtype, slots >= held
/// @param out          [batch, new_queries, heads_q, dim] float32
void held_attention(const float* queries, std::int64_t new_queries, std::int64_t heads_q,
                    std::int64_t first_query, const BatchKVView& keys, const BatchKVView& values,
                    const HeldSlots& slots, const ScoreRules& rules, float* out);

/// Bytes of scratch decode_attention takes on `device` for heads_q queries over `count`
/// tokens of dimension `dim` (0 on the CPU): the size of Execution::scratch.
std::size_t decode_attention_scratch_bytes(const Device& device, std::int64_t heads_q,
                                           std::int64_t count, std::int64_t dim);

/// How accumulated_attention reduces the attention a key receives.
enum class Reduction : int {
  Sum = 0,   ///< sum over the queries (and over the GQA group when grouped)
  Mean = 1,  ///< divided by the number of queries that can see the key (x group size)
};

/// Parameters of accumulated_attention.
struct AccumulateParams {
  float scale = 0.0f;  ///< multiplies q.k; 0 means 1/sqrt(head_dim)
  bool causal = true;  ///< query i sits at position tokens - window + i
  Reduction reduction = Reduction::Sum;
  bool per_query_head = false;  ///< false: reduce each GQA group onto its KV head
};

/// Attention each key receives from a window of queries (H2O, SnapKV, KVMerger evidence).
///
/// @param queries  size heads_q * window * keys.dim, float32
/// @param heads_q  a multiple of keys.heads
/// @param window   queries per head; <= keys.tokens when causal
/// @param out      size (per_query_head ? heads_q : heads_kv) * keys.tokens
/// The backend is the one of keys.device (queries and out live there too), or CUDA with
/// exec.stage_to_cuda.
void accumulated_attention(const float* queries, std::int64_t heads_q, std::int64_t window,
                           const KVView& keys, const AccumulateParams& params, float* out,
                           const Execution& exec = {});

/// The rotary embedding (RoPE) queries and keys carry, in transformers' layout: at
/// position p, channel i < rotary_dim / 2 turns with channel i + rotary_dim / 2 by the angle
/// p * inv_freq[i] (computed in float32, as transformers does), cos and sin scaled by
/// `scaling`; channels from rotary_dim on are not turned.
struct Rotary {
  const float* inv_freq = nullptr;  ///< rotary_dim / 2 frequencies, or null: no rotation
  std::int64_t rotary_dim = 0;      ///< even, <= dim
  float scaling = 1.0f;             ///< transformers' attention_scaling
};

/// What H2O, SnapKV, CaM and KVMerger rank tokens by: accumulated attention given
/// directly, or prompt queries from which it is computed (causal, each GQA group summed
/// onto its KV head). Expected Attention reads the queries with their rotation and
/// positions.
struct Evidence {
  const float* scores = nullptr;   ///< heads_kv * tokens, or null
  const float* queries = nullptr;  ///< heads_q * window * dim float32: the prompt's last queries
  std::int64_t heads_q = 0;
  std::int64_t window = 0;
  float scale = 0.0f;  ///< score scale; 0 means 1/sqrt(dim)
  Rotary rotary;       ///< the rotation the queries carry (Expected Attention)
  /// Position of query 0 (query i at first_position + i); -1: tokens - window, the
  /// prompt's last queries (Expected Attention)
  std::int64_t first_position = -1;
};

/// The evidence as heads_kv * tokens finite scores: a copy of evidence.scores, or the
/// accumulated attention of the last `last_queries` queries (0: all of them). Throws
/// std::invalid_argument when there is neither, or when the scores are not finite.
std::vector<float> evidence_scores(const KVView& keys, const Evidence& evidence,
                                   std::int64_t last_queries = 0);

/// Decode attention outputs [n, heads_q, dim] of queries [heads_q, n, dim] float32 (the
/// Evidence layout) over one cache: the reference attention_error compares against.
std::vector<float> probe_outputs(const float* queries, std::int64_t heads_q, std::int64_t n,
                                 const KVView& keys, const KVView& values);

/// Mean over queries of the relative error ||o - o_ref|| / ||o_ref|| of decode attention
/// over a cache against `reference` (probe_outputs of the same queries over the original
/// cache), o over all query heads. The fidelity measure of lossy KV encodings.
double attention_error(const float* queries, std::int64_t heads_q, std::int64_t n,
                       const std::vector<float>& reference, const KVView& keys,
                       const KVView& values);

}  // namespace kvpack
