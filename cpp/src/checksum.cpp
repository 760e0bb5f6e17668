#include "kvpack/checksum.h"

#include <cstring>

namespace kvpack {

namespace {

constexpr std::uint64_t kPrime1 = 0x9E3779B185EBCA87ull;
constexpr std::uint64_t kPrime2 = 0xC2B2AE3D27D4EB4Full;
constexpr std::uint64_t kPrime3 = 0x165667B19E3779F9ull;
constexpr std::uint64_t kPrime4 = 0x85EBCA77C2B2AE63ull;
constexpr std::uint64_t kPrime5 = 0x27D4EB2F165667C5ull;

inline std::uint64_t rotl(std::uint64_t x, int r) {
  return (x << r) | (x >> (64 - r));
}

inline std::uint64_t read64(const unsigned char* p) {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);  // little-endian hosts only (x86-64, aarch64)
  return v;
}

inline std::uint32_t read32(const unsigned char* p) {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline std::uint64_t round(std::uint64_t acc, std::uint64_t input) {
  return rotl(acc + input * kPrime2, 31) * kPrime1;
}

inline std::uint64_t merge_round(std::uint64_t acc, std::uint64_t lane) {
  return (acc ^ round(0, lane)) * kPrime1 + kPrime4;
}

}  // namespace

Xxh64Stream::Xxh64Stream(const unsigned char* begin, std::uint64_t seed)
    : begin_(begin),
      next_(begin),
      seed_(seed),
      v1_(seed + kPrime1 + kPrime2),
      v2_(seed + kPrime2),
      v3_(seed),
      v4_(seed - kPrime1) {}

void Xxh64Stream::update(const unsigned char* end) {
  for (; end - next_ >= 32; next_ += 32) {
    v1_ = round(v1_, read64(next_));
    v2_ = round(v2_, read64(next_ + 8));
    v3_ = round(v3_, read64(next_ + 16));
    v4_ = round(v4_, read64(next_ + 24));
  }
}

std::uint64_t Xxh64Stream::digest(const unsigned char* end) {
  update(end);
  const auto size = static_cast<std::uint64_t>(end - begin_);
  std::uint64_t h;
  if (size >= 32) {
    h = rotl(v1_, 1) + rotl(v2_, 7) + rotl(v3_, 12) + rotl(v4_, 18);
    h = merge_round(h, v1_);
    h = merge_round(h, v2_);
    h = merge_round(h, v3_);
    h = merge_round(h, v4_);
  } else {
    h = seed_ + kPrime5;
  }
  h += size;
  const unsigned char* p = next_;
  for (; p + 8 <= end; p += 8) h = rotl(h ^ round(0, read64(p)), 27) * kPrime1 + kPrime4;
  if (p + 4 <= end) {
    h = rotl(h ^ (static_cast<std::uint64_t>(read32(p)) * kPrime1), 23) * kPrime2 + kPrime3;
    p += 4;
  }
  for (; p < end; ++p) h = rotl(h ^ (*p * kPrime5), 11) * kPrime1;
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  h *= kPrime3;
  h ^= h >> 32;
  return h;
}

std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  return Xxh64Stream(p, seed).digest(p + size);
}

}  // namespace kvpack
