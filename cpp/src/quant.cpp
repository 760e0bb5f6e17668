#include "kvpack/quant.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "merge_states.h"
#include "vec.h"

namespace kvpack {

namespace {

// Asymmetric code range of n values: (scale, minimum) rounded to float16 as stored.
void fit_range(const float* x, std::int64_t n, std::int64_t stride, int bits, _Float16* scale,
               _Float16* minimum) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (std::int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
  *minimum = static_cast<_Float16>(lo);
  *scale = static_cast<_Float16>((hi - lo) / static_cast<float>((1 << bits) - 1));
}

// Code of x in [0, 2^bits - 1] for the stored range.
std::uint8_t encode(float x, float scale, float minimum, int bits) {
  if (!(scale > 0.0f)) return 0;
  const float level = std::nearbyint((x - minimum) / scale);
  return static_cast<std::uint8_t>(std::clamp(level, 0.0f, static_cast<float>((1 << bits) - 1)));
}

// Packs code i of a run at bit i * bits (bits divides 8, so no code straddles a byte).
void put_code(std::uint8_t* packed, std::int64_t i, int bits, std::uint8_t code) {
  const std::int64_t bit = i * bits;
  packed[bit / 8] = static_cast<std::uint8_t>(packed[bit / 8] | (code << (bit % 8)));
}

// out[c * rows + r] = in[r * cols + c]: a token group's key codes between the layout held
// in memory ([group bytes, dim]) and the serialized one ([dim, group bytes]).
void transpose_bytes(const std::uint8_t* in, std::int64_t rows, std::int64_t cols,
                     std::uint8_t* out) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
}

// Expands n codes packed at Bits each (n a multiple of 8 / Bits, or the tail of a row)
// into one byte per code; Bits is a template argument so the shifts are constants and
// the loop vectorises.
template <int Bits>
void unpack_codes(const std::uint8_t* packed, std::int64_t n, std::uint8_t* codes) {
  constexpr int kPerByte = 8 / Bits, kMask = (1 << Bits) - 1;
  const std::int64_t whole = n / kPerByte;
#pragma omp simd
  for (std::int64_t b = 0; b < whole; ++b)
    for (int s = 0; s < kPerByte; ++s)
      codes[b * kPerByte + s] = static_cast<std::uint8_t>((packed[b] >> (s * Bits)) & kMask);
  for (std::int64_t i = whole * kPerByte; i < n; ++i)
    codes[i] = static_cast<std::uint8_t>((packed[i / kPerByte] >> (i % kPerByte * Bits)) & kMask);
}

void unpack_codes(const std::uint8_t* packed, std::int64_t n, int bits, std::uint8_t* codes) {
  switch (bits) {
    case 2:
      return unpack_codes<2>(packed, n, codes);
    case 4:
      return unpack_codes<4>(packed, n, codes);
    default:
      return unpack_codes<8>(packed, n, codes);
  }
}

}  // namespace

QuantizedKV::QuantizedKV(const KVView& keys, const KVView& values, const QuantParams& params)
    : params_(params),
      dtype_(keys.dtype),
      heads_(keys.heads),
      tokens_(keys.tokens),
      dim_(keys.dim) {
  KVPACK_CHECK(params.bits == 2 || params.bits == 4 || params.bits == 8,
               "bits: expected 2, 4 or 8, got " << params.bits);
  KVPACK_CHECK(params.group >= 1 && params.group < (1ll << 32),
               "group: expected 1 to 2^32 - 1 tokens / channels, got " << params.group);
  KVPACK_CHECK(params.residual >= 0, "residual: expected >= 0, got " << params.residual);
  const std::int64_t group = params.group;
  quantized_ = std::max<std::int64_t>(0, tokens_ - params.residual) / group * group;
  allocate();
  const std::int64_t token_groups = quantized_ / group, rest = tokens_ - quantized_;
  const std::size_t row_bytes = static_cast<std::size_t>(dim_) * dtype_size(dtype_);

  parallel_for(heads_, [&](std::int64_t h) {
    // [group tokens, dim]; none when the context is shorter than a group
    std::vector<float> block(static_cast<std::size_t>(token_groups > 0 ? group * dim_ : 0));
    for (std::int64_t g = 0; g < token_groups; ++g) {
      for (std::int64_t j = 0; j < group; ++j)
        to_float(keys.row(h, g * group + j), dtype_, dim_, block.data() + j * dim_);
      // Token j's code of channel c: byte row j / per_byte, column c, at bit j % per_byte.
      std::uint8_t* rows = key_codes_.data() + (h * token_groups + g) * dim_ * key_group_bytes();
      const std::int64_t per_byte = 8 / params.bits;
      for (std::int64_t c = 0; c < dim_; ++c) {
        const std::int64_t at = (h * token_groups + g) * dim_ + c;
        fit_range(block.data() + c, group, dim_, params.bits, &key_scale_[at], &key_min_[at]);
        const float scale = key_scale_[at], minimum = key_min_[at];
        for (std::int64_t j = 0; j < group; ++j)
          put_code(rows + (j / per_byte) * dim_ + c, j % per_byte, params.bits,
                   encode(block[j * dim_ + c], scale, minimum, params.bits));
      }
    }
    std::vector<float> row(static_cast<std::size_t>(dim_));
    for (std::int64_t t = 0; t < quantized_; ++t) {
      to_float(values.row(h, t), dtype_, dim_, row.data());
      std::uint8_t* packed = value_codes_.data() + (h * quantized_ + t) * value_row_bytes();
      for (std::int64_t j = 0; j < channel_groups_; ++j) {
        const std::int64_t first = j * group, n = std::min(group, dim_ - first);
        const std::int64_t at = (h * quantized_ + t) * channel_groups_ + j;
        fit_range(row.data() + first, n, 1, params.bits, &value_scale_[at], &value_min_[at]);
        const float scale = value_scale_[at], minimum = value_min_[at];
        for (std::int64_t c = first; c < first + n; ++c)
          put_code(packed, c, params.bits, encode(row[c], scale, minimum, params.bits));
      }
    }
    for (std::int64_t t = quantized_; t < tokens_; ++t) {
      const std::size_t at = static_cast<std::size_t>(h * rest + t - quantized_) * row_bytes;
      std::memcpy(residual_keys_.data() + at, keys.row(h, t), row_bytes);
      std::memcpy(residual_values_.data() + at, values.row(h, t), row_bytes);
    }
  });
}

std::int64_t QuantizedKV::key_group_bytes() const {
  return (params_.group * params_.bits + 7) / 8;
}

std::int64_t QuantizedKV::value_row_bytes() const {
  return (dim_ * params_.bits + 7) / 8;
}

std::int64_t QuantizedKV::nbytes() const {
  const auto scales = static_cast<std::int64_t>(key_scale_.size() + key_min_.size() +
                                                value_scale_.size() + value_min_.size());
  return static_cast<std::int64_t>(key_codes_.size() + value_codes_.size() + residual_keys_.size() +
                                   residual_values_.size()) +
         scales * static_cast<std::int64_t>(sizeof(_Float16));
}

void QuantizedKV::allocate() {
  const std::int64_t group = params_.group, token_groups = quantized_ / group;
  const std::int64_t rest = tokens_ - quantized_;
  channel_groups_ = (dim_ + group - 1) / group;
  key_codes_.assign(static_cast<std::size_t>(heads_ * token_groups * dim_ * key_group_bytes()), 0);
  key_scale_.resize(static_cast<std::size_t>(heads_ * token_groups * dim_));
  key_min_.resize(key_scale_.size());
  value_codes_.assign(static_cast<std::size_t>(heads_ * quantized_ * value_row_bytes()), 0);
  value_scale_.resize(static_cast<std::size_t>(heads_ * quantized_ * channel_groups_));
  value_min_.resize(value_scale_.size());
  const std::size_t row_bytes = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  residual_keys_.resize(static_cast<std::size_t>(heads_ * rest) * row_bytes);
  residual_values_.resize(residual_keys_.size());
}

namespace {

// One token's keys as float32 from its byte row of a token group's key codes (its codes at
// `shift`) and the group's ranges.
inline void expand_key_row(const std::uint8_t* bytes, int shift, int mask, std::int64_t dim,
                           const float* lo, const float* step, float* row) {
#pragma omp simd
  for (std::int64_t c = 0; c < dim; ++c)
    row[c] = lo[c] + step[c] * static_cast<float>((bytes[c] >> shift) & mask);
}

// Expands one token group of key codes (group tokens x dim channels, held as rows of bytes
// over the channels) into rows of `dtype`: each output row is a contiguous vector
// expression over channels.
template <int Bits>
void expand_key_group(const std::uint8_t* packed, std::int64_t group, std::int64_t dim,
                      const float* lo, const float* step, DType dtype, std::size_t out_row,
                      unsigned char* out, float* row) {
  constexpr int kPerByte = 8 / Bits, kMask = (1 << Bits) - 1;
  for (std::int64_t j = 0; j < group; ++j) {
    expand_key_row(packed + (j / kPerByte) * dim, static_cast<int>(j % kPerByte) * Bits, kMask, dim,
                   lo, step, row);
    from_float(row, dim, dtype, out + j * out_row);
  }
}

}  // namespace

void QuantizedKV::dequantize(DType dtype, void* keys, void* values) const {
  const std::int64_t group = params_.group, token_groups = quantized_ / group;
  const std::int64_t rest = tokens_ - quantized_;
  const int bits = params_.bits;
  const std::size_t in_row = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  const std::size_t out_row = static_cast<std::size_t>(dim_) * dtype_size(dtype);
  const auto expand = bits == 2   ? &expand_key_group<2>
                      : bits == 4 ? &expand_key_group<4>
                                  : &expand_key_group<8>;
  // Scratch is sized by what the cache holds (a deserialized header may name any group
  // for a cache without token groups, and any head_dim for one without tokens).
  if (tokens_ == 0) return;
  parallel_for(heads_, [&](std::int64_t h) {
    unsigned char* k = static_cast<unsigned char*>(keys) + h * tokens_ * out_row;
    unsigned char* v = static_cast<unsigned char*>(values) + h * tokens_ * out_row;
    std::vector<float> row(static_cast<std::size_t>(dim_)), lo(row.size()), step(row.size());
    std::vector<std::uint8_t> run(static_cast<std::size_t>(dim_));
    for (std::int64_t g = 0; g < token_groups; ++g) {
      const std::int64_t base = (h * token_groups + g) * dim_;
      for (std::int64_t c = 0; c < dim_; ++c) {
        // In float: _Float16 arithmetic would round the result to float16.
        lo[c] = static_cast<float>(key_min_[base + c]);
        step[c] = static_cast<float>(key_scale_[base + c]);
      }
      expand(key_codes_.data() + base * key_group_bytes(), group, dim_, lo.data(), step.data(),
             dtype, out_row, k + g * group * out_row, row.data());
    }
    for (std::int64_t t = 0; t < quantized_; ++t) {
      expand_value_row(h, t, run.data(), row.data());
      from_float(row.data(), dim_, dtype, v + t * out_row);
    }
    for (std::int64_t t = quantized_; t < tokens_; ++t) {
      const std::size_t at = static_cast<std::size_t>(h * rest + t - quantized_) * in_row;
      to_float(residual_keys_.data() + at, dtype_, dim_, row.data());
      from_float(row.data(), dim_, dtype, k + t * out_row);
      to_float(residual_values_.data() + at, dtype_, dim_, row.data());
      from_float(row.data(), dim_, dtype, v + t * out_row);
    }
  });
}

void QuantizedKV::dequantize_rows(std::int64_t head, const std::int32_t* tokens, std::int64_t n,
                                  float* keys, float* values) const {
  const std::int64_t group = params_.group, token_groups = quantized_ / group;
  const std::int64_t rest = tokens_ - quantized_, group_bytes = key_group_bytes();
  const int bits = params_.bits, mask = (1 << bits) - 1;
  const std::size_t row_bytes = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(dim_));  // a value row's codes
  // The key ranges of the token group last read, as float32: tokens come ascending, so a
  // group's ranges are converted once for all its tokens rather than once per token.
  std::vector<float> low(static_cast<std::size_t>(dim_)), step(static_cast<std::size_t>(dim_));
  std::int64_t ranges_of = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t t = tokens[i];
    KVPACK_CHECK(t >= 0 && t < tokens_,
                 "tokens: expected ids in [0, " << tokens_ << "), got " << t);
    float* k = keys ? keys + i * dim_ : nullptr;
    float* v = values ? values + i * dim_ : nullptr;
    if (t >= quantized_) {
      const std::size_t at = static_cast<std::size_t>(head * rest + t - quantized_) * row_bytes;
      if (k) to_float(residual_keys_.data() + at, dtype_, dim_, k);
      if (v) to_float(residual_values_.data() + at, dtype_, dim_, v);
      continue;
    }
    if (k) {  // code t % group of each channel's run in its token group
      const std::int64_t base = (head * token_groups + t / group) * dim_;
      if (base != ranges_of) {
        to_float(key_min_.data() + base, DType::Float16, dim_, low.data());
        to_float(key_scale_.data() + base, DType::Float16, dim_, step.data());
        ranges_of = base;
      }
      // The token's codes: dim contiguous bytes (its byte row), shifted to its bits.
      const std::int64_t per_byte = 8 / bits, j = t % group;
      expand_key_row(key_codes_.data() + base * group_bytes + (j / per_byte) * dim_,
                     static_cast<int>(j % per_byte) * bits, mask, dim_, low.data(), step.data(), k);
    }
    if (v) expand_value_row(head, t, codes.data(), v);
  }
}

namespace {

struct SerialHeader {
  std::int32_t bits, dtype;
  std::int64_t group, residual, heads, tokens, dim, quantized;
};

template <class T>
void write_section(unsigned char*& out, const std::vector<T>& section) {
  if (section.empty()) return;  // memcpy from an empty vector's null data is undefined
  std::memcpy(out, section.data(), section.size() * sizeof(T));
  out += section.size() * sizeof(T);
}

template <class T>
void read_section(const unsigned char*& in, std::vector<T>& section) {
  if (section.empty()) return;
  std::memcpy(section.data(), in, section.size() * sizeof(T));
  in += section.size() * sizeof(T);
}

}  // namespace

std::size_t QuantizedKV::serialized_size() const {
  return sizeof(SerialHeader) + key_codes_.size() + value_codes_.size() + residual_keys_.size() +
         residual_values_.size() +
         (key_scale_.size() + key_min_.size() + value_scale_.size() + value_min_.size()) *
             sizeof(_Float16);
}

void QuantizedKV::serialize(unsigned char* out) const {
  const SerialHeader header{params_.bits,  static_cast<std::int32_t>(dtype_),
                            params_.group, params_.residual,
                            heads_,        tokens_,
                            dim_,          quantized_};
  std::memcpy(out, &header, sizeof header);
  out += sizeof header;
  // Key codes channel-major, as KIVI lays them out: each channel's run of group codes.
  const std::int64_t group_bytes = key_group_bytes();
  for (std::size_t at = 0; at < key_codes_.size(); at += dim_ * group_bytes) {
    transpose_bytes(key_codes_.data() + at, group_bytes, dim_, out);
    out += dim_ * group_bytes;
  }
  write_section(out, key_scale_);
  write_section(out, key_min_);
  write_section(out, value_codes_);
  write_section(out, value_scale_);
  write_section(out, value_min_);
  write_section(out, residual_keys_);
  write_section(out, residual_values_);
}

QuantizedKV QuantizedKV::deserialize(const unsigned char* data, std::size_t size) {
  SerialHeader header{};
  if (size < sizeof header) throw std::runtime_error("quantized payload: truncated header");
  std::memcpy(&header, data, sizeof header);
  const bool sane =
      (header.bits == 2 || header.bits == 4 || header.bits == 8) && header.dtype >= 0 &&
      header.dtype <= 2 && header.group >= 1 && header.heads >= 0 && header.tokens >= 0 &&
      header.dim >= 1 && header.quantized >= 0 && header.quantized <= header.tokens &&
      header.quantized % header.group == 0 && header.dim < (1 << 20) && header.heads < (1 << 20) &&
      header.tokens < (1ll << 32) && header.group < (1ll << 32) && header.residual >= 0;
  if (!sane) throw std::runtime_error("quantized payload: malformed header");
  // The serialized size the header implies, without overflow, before anything is
  // allocated from it: a payload cannot claim more memory than it occupies.
  const auto heads = static_cast<std::size_t>(header.heads);
  const auto dim = static_cast<std::size_t>(header.dim);
  const auto quantized = static_cast<std::size_t>(header.quantized);
  const auto group = static_cast<std::size_t>(header.group);
  const std::size_t token_groups = quantized / group;
  const std::size_t rest = static_cast<std::size_t>(header.tokens) - quantized;
  const std::size_t channel_groups = (dim + group - 1) / group;
  const std::size_t bits = static_cast<std::size_t>(header.bits);
  const std::size_t key_group_bytes = (group * bits + 7) / 8,
                    value_row_bytes = (dim * bits + 7) / 8;
  const std::size_t half = sizeof(_Float16);
  const std::size_t element = dtype_size(static_cast<DType>(header.dtype));
  std::size_t key_codes, key_ranges, value_codes, value_ranges, residual, expected = sizeof header;
  const bool fits = checked_product({heads, token_groups, dim, key_group_bytes}, key_codes) &&
                    checked_product({heads, token_groups, dim, 2 * half}, key_ranges) &&
                    checked_product({heads, quantized, value_row_bytes}, value_codes) &&
                    checked_product({heads, quantized, channel_groups, 2 * half}, value_ranges) &&
                    checked_product({heads, rest, dim, 2 * element}, residual) &&
                    !__builtin_add_overflow(expected, key_codes, &expected) &&
                    !__builtin_add_overflow(expected, key_ranges, &expected) &&
                    !__builtin_add_overflow(expected, value_codes, &expected) &&
                    !__builtin_add_overflow(expected, value_ranges, &expected) &&
                    !__builtin_add_overflow(expected, residual, &expected);
  if (!fits || expected != size) throw std::runtime_error("quantized payload: wrong size");
  QuantizedKV kv;
  kv.params_ = QuantParams{header.bits, header.group, header.residual};
  kv.dtype_ = static_cast<DType>(header.dtype);
  kv.heads_ = header.heads;
  kv.tokens_ = header.tokens;
  kv.dim_ = header.dim;
  kv.quantized_ = header.quantized;
  kv.allocate();
  assert(kv.serialized_size() == size);
  const unsigned char* in = data + sizeof header;
  const auto block = static_cast<std::int64_t>(dim * key_group_bytes);
  for (std::size_t at = 0; at < kv.key_codes_.size(); at += block, in += block)
    transpose_bytes(in, header.dim, static_cast<std::int64_t>(key_group_bytes),
                    kv.key_codes_.data() + at);
  read_section(in, kv.key_scale_);
  read_section(in, kv.key_min_);
  read_section(in, kv.value_codes_);
  read_section(in, kv.value_scale_);
  read_section(in, kv.value_min_);
  read_section(in, kv.residual_keys_);
  read_section(in, kv.residual_values_);
  return kv;
}

void QuantizedKV::expand_value_row(std::int64_t head, std::int64_t t, std::uint8_t* codes,
                                   float* row) const {
  const std::int64_t group = params_.group;
  unpack_codes(value_codes_.data() + (head * quantized_ + t) * value_row_bytes(), dim_,
               params_.bits, codes);
  const std::int64_t at = (head * quantized_ + t) * channel_groups_;
  for (std::int64_t j = 0; j < channel_groups_; ++j) {
    const float minimum = static_cast<float>(value_min_[at + j]);
    const float scale = static_cast<float>(value_scale_[at + j]);
    const std::int64_t first = j * group, last = std::min(dim_, first + group);
#pragma omp simd
    for (std::int64_t c = first; c < last; ++c) row[c] = minimum + scale * codes[c];
  }
}

void QuantizedKV::load_block(std::int64_t head, std::int64_t block, const KVView* tail_keys,
                             const KVView* tail_values, float* keys, float* values,
                             std::uint8_t* scratch) const {
  const std::int64_t group = params_.group, token_groups = quantized_ / group;
  const int bits = params_.bits;
  if (block < token_groups) {
    const std::int64_t base = (head * token_groups + block) * dim_;
    float* lo = values;  // the value rows are written after the keys are expanded
    float* step = values + dim_;
    for (std::int64_t c = 0; c < dim_; ++c) {
      lo[c] = static_cast<float>(key_min_[base + c]);
      step[c] = static_cast<float>(key_scale_[base + c]);
    }
    const auto expand = bits == 2   ? &expand_key_group<2>
                        : bits == 4 ? &expand_key_group<4>
                                    : &expand_key_group<8>;
    expand(key_codes_.data() + base * key_group_bytes(), group, dim_, lo, step, DType::Float32,
           static_cast<std::size_t>(dim_) * sizeof(float), reinterpret_cast<unsigned char*>(keys),
           values + 2 * dim_);
    for (std::int64_t j = 0; j < group; ++j)
      expand_value_row(head, block * group + j, scratch, values + j * dim_);
    return;
  }
  // Full-precision rows: the residual, then the tail.
  const std::int64_t rest = tokens_ - quantized_, extra = tail_keys ? tail_keys->tokens : 0;
  const std::int64_t first = (block - token_groups) * group;
  const std::int64_t n = std::min(group, rest + extra - first);
  const std::size_t row_bytes = static_cast<std::size_t>(dim_) * dtype_size(dtype_);
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t i = first + j;
    if (i < rest) {
      const std::size_t at = static_cast<std::size_t>(head * rest + i) * row_bytes;
      to_float(residual_keys_.data() + at, dtype_, dim_, keys + j * dim_);
      to_float(residual_values_.data() + at, dtype_, dim_, values + j * dim_);
    } else {
      to_float(tail_keys->row(head, i - rest), tail_keys->dtype, dim_, keys + j * dim_);
      to_float(tail_values->row(head, i - rest), tail_values->dtype, dim_, values + j * dim_);
    }
  }
}

void QuantizedKV::attend(const float* q, std::int64_t heads_q, const ScoreRules& rules,
                         const AttentionOutput& output, const KVView* tail_keys,
                         const KVView* tail_values) const {
  KVPACK_CHECK(!tail_keys == !tail_values, "tail: expected both keys and values, or neither");
  KVPACK_CHECK(rules.window == 0 && rules.softcap >= 0.0f,
               "rules: expected window 0 (every token is seen) and softcap >= 0");
  const std::int64_t extra = tail_keys ? tail_keys->tokens : 0;
  if (tail_keys) {
    for (const KVView* t : {tail_keys, tail_values})
      KVPACK_CHECK(t->data && t->heads == heads_ && t->dim == dim_ && t->tokens == extra,
                   "tail: expected keys and values of shape ["
                       << heads_ << ", n, " << dim_ << "], got [" << t->heads << ", " << t->tokens
                       << ", " << t->dim << "]");
  }
  const std::int64_t group = params_.group, token_groups = quantized_ / group;
  const std::int64_t rest = tokens_ - quantized_, per_kv = heads_q / heads_;
  const std::int64_t attended = tokens_ + extra;
  const float scale = resolve_scale(rules.scale, dim_);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // A flash-decoding pass over blocks of `group` tokens: each block (a token group of
  // codes, or full-precision rows) is expanded to float32 once and attended by every
  // query head of its KV head; blocks are split into chunks merged by log-sum-exp.
  const std::int64_t blocks = token_groups + (rest + extra + group - 1) / group;
  const std::int64_t chunks = std::clamp<std::int64_t>((4 * num_threads() + heads_ - 1) / heads_, 1,
                                                       std::max<std::int64_t>(1, blocks));
  const std::int64_t stride = per_kv * (dim_ + 2);
  const std::int64_t block_tokens = std::min(group, std::max<std::int64_t>(attended, 1));
  std::vector<float> partials(static_cast<std::size_t>(heads_ * chunks * stride));
  parallel_for(heads_ * chunks, [&](std::int64_t item) {
    const std::int64_t h = item / chunks, chunk = item % chunks;
    const std::int64_t begin = blocks * chunk / chunks, end = blocks * (chunk + 1) / chunks;
    float* max = partials.data() + item * stride;
    float* sum = max + per_kv;
    float* acc = sum + per_kv;
    std::fill(max, max + per_kv, kNegInf);
    std::fill(sum, sum + per_kv, 0.0f);
    std::fill(acc, acc + per_kv * dim_, 0.0f);
    // Blocks hold at most the tokens attended, however large the group.
    std::vector<float> keys(static_cast<std::size_t>(block_tokens * dim_)),
        values(static_cast<std::size_t>(std::max(block_tokens, std::int64_t{3}) * dim_)),
        s(static_cast<std::size_t>(block_tokens)), qs(static_cast<std::size_t>(per_kv * dim_));
    std::vector<std::uint8_t> scratch(static_cast<std::size_t>(dim_));
    for (std::int64_t i = 0; i < per_kv * dim_; ++i) qs[i] = q[h * per_kv * dim_ + i] * scale;
    for (std::int64_t b = begin; b < end; ++b) {
      load_block(h, b, tail_keys, tail_values, keys.data(), values.data(), scratch.data());
      const std::int64_t first =
          b < token_groups ? b * group : quantized_ + (b - token_groups) * group;
      const std::int64_t n = std::min(group, attended - first);
      for (std::int64_t g = 0; g < per_kv; ++g) {
        float block_max = kNegInf;
        for (std::int64_t j = 0; j < n; ++j) {
          s[j] = capped_score(detail::dot(qs.data() + g * dim_, keys.data() + j * dim_, dim_),
                              rules.softcap);
          block_max = std::max(block_max, s[j]);
        }
        if (output.weights)
          std::copy(s.begin(), s.begin() + n, output.weights + (h * per_kv + g) * attended + first);
        const float new_max = std::max(max[g], block_max);
        float* out = acc + g * dim_;
        if (max[g] != kNegInf && max[g] != new_max) {
          const float correction = std::exp(max[g] - new_max);
          sum[g] *= correction;
          for (std::int64_t c = 0; c < dim_; ++c) out[c] *= correction;
        }
        max[g] = new_max;
        for (std::int64_t j = 0; j < n; ++j) {
          const float p = std::exp(s[j] - new_max);
          sum[g] += p;
          const float* v = values.data() + j * dim_;
#pragma omp simd
          for (std::int64_t c = 0; c < dim_; ++c) out[c] += p * v[c];
        }
      }
    }
  });

  // Merge the chunks of every query head.
  parallel_for(heads_q, [&](std::int64_t hq) {
    const std::int64_t h = hq / per_kv, g = hq % per_kv;
    float* out = output.out + hq * dim_;
    float lse = detail::merge_states(partials.data() + h * chunks * stride, chunks, stride, per_kv,
                                     g, dim_, out);
    if (rules.sinks) {  // the sink's share of the softmax goes nowhere
      const float kept = sink_share(rules.sinks[hq], lse);
      for (std::int64_t c = 0; c < dim_; ++c) out[c] *= kept;
      lse -= std::log(kept);
    }
    if (output.lse) output.lse[hq] = lse;
    if (output.weights)
      for (std::int64_t t = 0; t < attended; ++t)
        output.weights[hq * attended + t] = std::exp(output.weights[hq * attended + t] - lse);
  });
}

void quantized_attention(const QuantizedKV* const* quantized, const float* queries,
                         std::int64_t new_tokens, std::int64_t heads_q,
                         const BatchKVView& tail_keys, const BatchKVView& tail_values,
                         const ScoreRules& rules, float* out) {
  KVPACK_CHECK(tail_values.batch == tail_keys.batch && tail_values.heads == tail_keys.heads &&
                   tail_values.tokens == tail_keys.tokens && tail_values.dim == tail_keys.dim,
               "tail_values: expected the shape of tail_keys");
  KVPACK_CHECK(new_tokens >= 0 && tail_keys.tokens >= new_tokens,
               "tail_keys: expected at least new=" << new_tokens << " decoded tokens, got "
                                                   << tail_keys.tokens);
  for (const BatchKVView* tail : {&tail_keys, &tail_values})
    KVPACK_CHECK(tail->tokens <= 1 || tail->token_stride == tail->dim,
                 "tail: expected each head's rows to be contiguous");
  const std::int64_t size = heads_q * tail_keys.dim, decoded = tail_keys.tokens;
  for (std::int64_t b = 0; b < tail_keys.batch; ++b)
    for (std::int64_t i = 0; i < new_tokens; ++i) {
      const std::int64_t seen = decoded - new_tokens + i + 1, at = (b * new_tokens + i) * size;
      const KVView keys = tail_keys.row(b, 0, seen), values = tail_values.row(b, 0, seen);
      quantized[b]->attend(queries + at, heads_q, rules,
                           AttentionOutput{out + at, nullptr, nullptr}, &keys, &values);
    }
}

}  // namespace kvpack
