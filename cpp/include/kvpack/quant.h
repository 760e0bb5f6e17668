// KIVI-style quantization of one layer's KV cache: asymmetric integer codes of 2, 4 or
// 8 bits, keys per channel over groups of tokens, values per token over groups of
// channels, the most recent tokens kept in full precision; codes packed densely. The
// quantized cache is attended without expanding it.
#pragma once

#include <cstdint>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/common.h"
#include "kvpack/method.h"

namespace kvpack {

/// Parameters of QuantizedKV, and the KIVI method (whose budget is the residual).
struct QuantParams {
  static constexpr const char* name = "kivi";
  static constexpr const char* class_name = "KIVI";
  static constexpr const char* summary =
      "KIVI: keys quantized per channel and values per token to 2, 4 or 8 bits; the latest "
      "budget tokens kept in full precision.";
  static constexpr MethodKind kind = MethodKind::Quantize;
  static constexpr bool ranks_by_attention = false;
  static constexpr int blob_code = 1;

  int bits = 2;
  std::int64_t group = 32;
  std::int64_t residual = 128;  ///< latest tokens kept in full precision (at least): the budget

  template <class Self, class F>
  static void each_param(Self& p, F&& f) {
    f(ParamSpec{"bits", ParamRule::Bits, "Bits per code: 2, 4 or 8."}, p.bits);
    f(ParamSpec{"group", ParamRule::Count, "Tokens per key group and channels per value group.", 1},
      p.group);
  }
};

/// One layer's cache [heads, tokens, dim] in KIVI form. The first quantized() tokens of
/// each head are codes, a multiple of `group`; the rest stay in the input dtype.
///
/// Keys: for token group g and channel c, the codes of the group's tokens are packed
/// together, with one (scale, minimum) pair per (g, c). Values: for token t and channel
/// group j, the codes of the group's channels are packed together, with one pair per
/// (t, j). Scales and minima are stored as float16, as in KIVI; a code q stands for
/// minimum + scale * q.
class QuantizedKV {
 public:
  QuantizedKV(const KVView& keys, const KVView& values, const QuantParams& params);

  std::int64_t heads() const { return heads_; }
  std::int64_t tokens() const { return tokens_; }
  std::int64_t dim() const { return dim_; }
  DType dtype() const { return dtype_; }
  std::int64_t quantized() const { return quantized_; }  ///< tokens held as codes, per head
  const QuantParams& params() const { return params_; }

  /// Bytes the quantized form occupies (codes, scales, minima, residual rows).
  std::int64_t nbytes() const;

  /// Writes the dequantized cache as float32 [heads, tokens, dim] into keys and values.
  void dequantize(float* keys, float* values) const { dequantize(DType::Float32, keys, values); }

  /// Writes the dequantized cache [heads, tokens, dim] in `dtype` into keys and values.
  void dequantize(DType dtype, void* keys, void* values) const;

  /// The dequantized rows of n tokens (each < tokens()) of one head as float32 [n, dim]
  /// into keys and values (either may be null), read from the codes of those tokens only.
  void dequantize_rows(std::int64_t head, const std::int32_t* tokens, std::int64_t n, float* keys,
                       float* values) const;

  /// Bytes of the serialized form: parameters, shapes, then every array in order.
  std::size_t serialized_size() const;
  void serialize(unsigned char* out) const;
  /// The QuantizedKV serialized in `size` bytes at data; std::runtime_error if malformed.
  static QuantizedKV deserialize(const unsigned char* data, std::size_t size);

  /// Decode attention of q [heads_q, dim] over the quantized cache, reading codes
  /// directly (no dequantized copy); out as for decode_attention. `tail`, when given,
  /// holds full-precision rows [heads, n, dim] that follow the cache (a decode step's
  /// tokens since the prefill), attended in the same softmax after it; weights then has
  /// tokens() + n entries per query head. The rules' scale, softcap and sinks apply as in
  /// held_attention (lse and weights include the sink); every token is seen (window 0).
  void attend(const float* q, std::int64_t heads_q, const ScoreRules& rules,
              const AttentionOutput& output, const KVView* tail_keys = nullptr,
              const KVView* tail_values = nullptr) const;

 private:
  QuantizedKV() = default;
  void allocate();
  std::int64_t key_group_bytes() const;  // packed codes of one channel in one token group
  std::int64_t value_row_bytes() const;  // packed codes of one token's channels
  // Token t's (t < quantized()) values of a head as float32 into row (dim floats);
  // codes holds dim bytes of scratch.
  void expand_value_row(std::int64_t head, std::int64_t t, std::uint8_t* codes, float* row) const;
  // Block `block` of a head as float32 rows [n, dim] into keys and values (each room for
  // max(group, 3) rows): token group `block` of the codes, or after them `group` rows of
  // the residual and then the tail; scratch holds dim bytes.
  void load_block(std::int64_t head, std::int64_t block, const KVView* tail_keys,
                  const KVView* tail_values, float* keys, float* values,
                  std::uint8_t* scratch) const;

  QuantParams params_;
  DType dtype_ = DType::Float32;
  std::int64_t heads_ = 0, tokens_ = 0, dim_ = 0, quantized_ = 0, channel_groups_ = 0;
  // [heads, token groups, key_group_bytes, dim]: a token's codes are one contiguous row of
  // bytes, so a recall reads dim bytes per token (serialized channel-major, as KIVI has it).
  std::vector<std::uint8_t> key_codes_;
  std::vector<_Float16> key_scale_, key_min_;      // [heads, token groups, dim]
  std::vector<std::uint8_t> value_codes_;          // [heads, quantized, value_row_bytes]
  std::vector<_Float16> value_scale_, value_min_;  // [heads, quantized, channel groups]
  std::vector<unsigned char> residual_keys_, residual_values_;  // [heads, rest, dim] in dtype
};

/// Decode attention of a batch's new queries, each row over its own quantized cache and the
/// tokens decoded since (full precision): query i of row b attends quantized[b] and the
/// first decoded - new + i + 1 tail rows, exactly as quantized[b]->attend(queries[b, i],
/// heads_q, rules, out[b, i], tail_keys[b, :, :that], tail_values[b, :, :that]).
/// @param quantized    size tail_keys.batch
/// @param queries      size batch * new_tokens * heads_q * dim float32, [batch, new, heads_q,
///                     dim]
/// @param tail_keys, tail_values  [batch, heads_kv, decoded, dim], decoded >= new_tokens,
///                     each head's rows contiguous (token_stride == dim), any KV dtype
/// @param out          size of queries
void quantized_attention(const QuantizedKV* const* quantized, const float* queries,
                         std::int64_t new_tokens, std::int64_t heads_q,
                         const BatchKVView& tail_keys, const BatchKVView& tail_values,
                         const ScoreRules& rules, float* out);

}  // namespace kvpack
