// Element conversion between the storage dtypes and float32. Written as plain
// scalar code over _Float16 / bit shifts so the compiler vectorises it (AVX-512) inside
// the callers' simd loops; float16 to float32 with F16C by its intrinsics, which the
// compiler does not emit for _Float16 on its own.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "kvpack/common.h"

namespace kvpack {

inline float bf16_to_float(std::uint16_t bits) {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}

inline std::uint16_t float_to_bf16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);                      // round to nearest even
  return static_cast<std::uint16_t>(bits >> 16);
}

/// float16 bits to float32, exactly, by integer arithmetic (F. Giesen's half_to_float_fast2):
/// what x86-64 code without F16C converts with, where the compiler would call a library
/// routine for each element; it vectorises inside simd loops.
inline float half_bits_to_float(std::uint16_t half) {
  constexpr std::uint32_t kShiftedExponent = 0x7c00u << 13;
  const std::uint32_t bits = half;
  std::uint32_t magnitude = ((bits & 0x7fffu) << 13) + ((127u - 15u) << 23);
  const std::uint32_t exponent = (bits << 13) & kShiftedExponent;
  if (exponent == kShiftedExponent) magnitude += (128u - 16u) << 23;  // Inf / NaN
  float out;
  if (exponent == 0) {  // zero / subnormal: renormalise through a float subtraction
    magnitude += 1u << 23;
    std::memcpy(&out, &magnitude, sizeof out);
    out -= 6.103515625e-05f;  // 2^-14
    std::memcpy(&magnitude, &out, sizeof out);
  }
  magnitude |= (bits & 0x8000u) << 16;
  std::memcpy(&out, &magnitude, sizeof out);
  return out;
}

namespace detail {
/// float16 -> float32 (and back) by the best build of the CPU kernels (F16C where the
/// processor has it; cpu_kernels.h). Code compiled without F16C for a portable build
/// (KVPACK_HALF_VIA_KERNELS) converts through these: on its own the compiler would
/// convert one element at a time in software.
void half_to_float(const void* src, std::int64_t n, float* dst);
void float_to_half(const float* src, std::int64_t n, void* dst);
}  // namespace detail

/// Converts n elements of `dtype` at src to float32 at dst.
inline void to_float(const void* src, DType dtype, std::int64_t n, float* dst) {
  switch (dtype) {
    case DType::Float32:
      std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
      return;
    case DType::Float16: {
#if defined(KVPACK_HALF_VIA_KERNELS) && !defined(__F16C__)
      detail::half_to_float(src, n, dst);
#elif defined(__x86_64__) && !defined(__F16C__)
      const std::uint16_t* s = static_cast<const std::uint16_t*>(src);
#pragma omp simd
      for (std::int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(s[i]);
#elif defined(__F16C__)
      // Eight at a time: the compiler converts _Float16 one element at a time.
      const std::uint16_t* s = static_cast<const std::uint16_t*>(src);
      std::int64_t i = 0;
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i,
                         _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
#else
      const _Float16* s = static_cast<const _Float16*>(src);
#pragma omp simd
      for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
#endif
      return;
    }
    case DType::BFloat16: {
      const std::uint16_t* s = static_cast<const std::uint16_t*>(src);
#pragma omp simd
      for (std::int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
  }
}

/// Index of the first row (head * tokens + token) of `view` holding a NaN or Inf, or -1.
std::int64_t first_non_finite_row(const KVView& view);

/// Converts n float32 values at src to `dtype` at dst.
inline void from_float(const float* src, std::int64_t n, DType dtype, void* dst) {
  switch (dtype) {
    case DType::Float32:
      std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
      return;
    case DType::Float16: {
#if defined(KVPACK_HALF_VIA_KERNELS) && !defined(__F16C__)
      detail::float_to_half(src, n, dst);
#else
      _Float16* d = static_cast<_Float16*>(dst);
#pragma omp simd
      for (std::int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i]);
#endif
      return;
    }
    case DType::BFloat16: {
      std::uint16_t* d = static_cast<std::uint16_t*>(dst);
      for (std::int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
      return;
    }
  }
}

}  // namespace kvpack
