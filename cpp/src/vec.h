// Float vectors of the target's native width in GCC/Clang vector extensions, and loads
// that widen float16 / bfloat16 storage on the fly: 16 lanes (one register) with
// AVX-512, 8 lanes (one register) otherwise. A wider type than the registers would be
// split by the compiler and kept on the stack, which made the AVX2 kernels 3-5x slower.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvpack/common.h"
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace kvpack::detail {

#if defined(__AVX512F__)
constexpr std::int64_t kLanes = 16;
#else
constexpr std::int64_t kLanes = 8;
#endif
typedef float floatv __attribute__((vector_size(kLanes * 4)));
typedef _Float16 halfv __attribute__((vector_size(kLanes * 2)));
typedef std::uint16_t u16v __attribute__((vector_size(kLanes * 2)));
typedef std::uint32_t u32v __attribute__((vector_size(kLanes * 4)));
typedef std::int32_t i32v __attribute__((vector_size(kLanes * 4)));

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

/// Loads kLanes consecutive stored elements at p as float32.
inline floatv load_lanes(const float* p) {
  floatv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline floatv load_lanes(const _Float16* p) {
  // GCC lowers a generic half->float vector conversion element by element; use the
  // hardware conversion where the target has one.
#if defined(__AVX512F__)
  return reinterpret_cast<floatv>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  return reinterpret_cast<floatv>(
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  // Without F16C the compiler converts each element in software (a library call): widen the
  // bits instead, exactly (F. Giesen's half_to_float_fast2): shift exponent and mantissa
  // into place, rebias, then fix up infinities / NaN and renormalise subnormals.
  u16v h;
  std::memcpy(&h, p, sizeof h);
  const u32v bits = __builtin_convertvector(h, u32v);
  const u32v shifted_exponent = u32v{} + (0x7c00u << 13);
  u32v magnitude = ((bits & 0x7fffu) << 13) + ((127u - 15u) << 23);
  const u32v exponent = (bits << 13) & shifted_exponent;
  magnitude += (exponent == shifted_exponent) ? u32v{} + ((128u - 16u) << 23) : u32v{};
  floatv subnormal;
  const u32v raised = magnitude + (1u << 23);
  std::memcpy(&subnormal, &raised, sizeof subnormal);
  subnormal -= 6.103515625e-05f;  // 2^-14, the float whose bits are 113 << 23
  u32v renormalised;
  std::memcpy(&renormalised, &subnormal, sizeof renormalised);
  const u32v out = ((exponent == 0) ? renormalised : magnitude) | ((bits & 0x8000u) << 16);
  floatv v;
  std::memcpy(&v, &out, sizeof v);
  return v;
#endif
}
inline floatv load_lanes(const bf16* p) {
  u16v h;
  std::memcpy(&h, p, sizeof h);
  const u32v wide = __builtin_convertvector(h, u32v) << 16;
  floatv v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

inline void store_lanes(float* p, floatv v) {
  std::memcpy(p, &v, sizeof v);
}

inline float reduce_add(floatv v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
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
  floatv acc = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load_lanes(a + i) * load_lanes(b + i);
  float sum = reduce_add(acc);
  for (; i < n; ++i) sum += widen(a[i]) * widen(b[i]);
  return sum;
}

/// exp of kLanes floats at once, vectorised: range reduction by ln2 in two parts and a
/// degree-6 polynomial; relative error below 2e-7 (inputs clamped to [-87, 88]; NaN stays NaN).
inline floatv exp_lanes(floatv in) {
  const floatv lo = floatv{} - 87.0f, hi = floatv{} + 88.0f;
  floatv x = in > lo ? in : lo;  // NaN lanes become lo here (a defined integer conversion)
  x = x < hi ? x : hi;           // and NaN again at the end
  // floor(x * log2(e) + 0.5) by truncating a value made positive.
  const i32v shifted = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, i32v);
  const floatv n = __builtin_convertvector(shifted - 128, floatv);
  const floatv r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  floatv p = floatv{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32v bits = (shifted - 128 + 127) << 23;
  floatv scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return in == in ? p * scale : in;
}

}  // namespace kvpack::detail
