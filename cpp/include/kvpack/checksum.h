// XXH64 (Yann Collet's xxHash, 64-bit variant): the checksum of every stored blob, fast
// enough (several GB/s per core) to verify each read without becoming the bottleneck.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvpack {

/// XXH64 of `size` bytes at `data` with `seed`; matches the reference implementation.
std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed = 0);

/// XXH64 of a contiguous region hashed as it arrives: update(end) consumes the whole
/// 32-byte stripes of [begin, end) not yet consumed; digest(end) finishes the hash of
/// [begin, end). Equal to xxh64(begin, end - begin, seed).
class Xxh64Stream {
 public:
  Xxh64Stream(const unsigned char* begin, std::uint64_t seed);
  void update(const unsigned char* end);
  std::uint64_t digest(const unsigned char* end);

 private:
  const unsigned char* begin_;
  const unsigned char* next_;
  std::uint64_t seed_, v1_, v2_, v3_, v4_;
};

}  // namespace kvpack
