// 16-lane float vectors in GCC/Clang vector extensions, and loads that widen
// float16 / bfloat16 storage on the fly. The compiler lowers them to whatever the
// target has (one AVX-512 register, two AVX2 registers, four SSE registers).
#pragma once

#include <cstdint>
#include <cstring>

#include "kvpack/common.h"
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace kvpack::detail {

constexpr std::int64_t kLanes = 16;
typedef float f32x16 __attribute__((vector_size(64)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));
typedef std::uint16_t u16x16 __attribute__((vector_size(32)));
typedef std::uint32_t u32x16 __attribute__((vector_size(64)));

/// bfloat16 storage element (the high half of a float32).
struct bf16 {
  std::uint16_t bits;
};

/// Scalar widening of one stored element.
inline float widen(float x) {
  return x;
}
inline float widen(_Float16 x) {
  return static_cast<float>(x);
}
inline float widen(bf16 x) {
  const std::uint32_t wide = static_cast<std::uint32_t>(x.bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}

/// Loads 16 consecutive stored elements at p as float32.
inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const _Float16* p) {
  // GCC lowers a generic half->float vector conversion element by element; use the
  // hardware conversion where the target has one.
#if defined(__AVX512F__)
  return reinterpret_cast<f32x16>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  f32x16 v;
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
  return v;
#else
  f16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, f32x16);
#endif
}
inline f32x16 load16(const bf16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 wide = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

inline void store16(float* p, f32x16 v) {
  std::memcpy(p, &v, sizeof v);
}

inline float reduce_add(f32x16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
#endif
}

}  // namespace kvpack::detail

namespace kvpack::detail {

/// Calls fn with a value of the storage element type of `dtype` (float, _Float16 or bf16),
/// so one template serves every dtype.
template <class Fn>
decltype(auto) with_storage_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16:
      return fn(_Float16{});
    case DType::BFloat16:
      return fn(bf16{});
    case DType::Float32:
      break;
  }
  return fn(float{});
}

/// Dot product of a and b, n elements each, in float32.
template <class A, class B>
inline float dot(const A* a, const B* b, std::int64_t n) {
  f32x16 acc = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load16(a + i) * load16(b + i);
  float sum = reduce_add(acc);
  for (; i < n; ++i) sum += widen(a[i]) * widen(b[i]);
  return sum;
}

typedef std::int32_t i32x16 __attribute__((vector_size(64)));

/// exp of 16 floats at once, vectorised: range reduction by ln2 in two parts and a
/// degree-6 polynomial; relative error below 2e-7 (inputs clamped to [-87, 88]; NaN stays NaN).
inline f32x16 exp16(f32x16 in) {
  const f32x16 lo = f32x16{} - 87.0f, hi = f32x16{} + 88.0f;
  f32x16 x = in > lo ? in : lo;  // NaN lanes become lo here (a defined integer conversion)
  x = x < hi ? x : hi;           // and NaN again at the end
  // floor(x * log2(e) + 0.5) by truncating a value made positive.
  const i32x16 shifted = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, i32x16);
  const f32x16 n = __builtin_convertvector(shifted - 128, f32x16);
  const f32x16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  f32x16 p = f32x16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (shifted - 128 + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return in == in ? p * scale : in;
}

}  // namespace kvpack::detail
