// Blob checksums from xxHash (Debian's libxxhash): XXH3 (64-bit) for the blobs written now,
// XXH64 for those of blob version 1 and for SSD file names. Fast enough (tens of GB/s per
// core for XXH3) to verify each read without becoming the bottleneck.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace kvpack {

/// XXH64 of `size` bytes at `data` with `seed`.
std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed = 0);

/// XXH3's 64-bit hash of `size` bytes at `data` with `seed`.
std::uint64_t xxh3(const void* data, std::size_t size, std::uint64_t seed = 0);

/// The hashes a blob checksum can use.
enum class ChecksumKind : int { Xxh64 = 0, Xxh3 = 1 };

/// A contiguous region hashed as it arrives: update(end) hashes the bytes of [begin, end)
/// not yet hashed; digest(end) finishes the hash of [begin, end). Equal to xxh64 or xxh3 of
/// [begin, end) with `seed`.
class ChecksumStream {
 public:
  ChecksumStream(ChecksumKind kind, const unsigned char* begin, std::uint64_t seed);
  ~ChecksumStream();
  ChecksumStream(const ChecksumStream&) = delete;
  ChecksumStream& operator=(const ChecksumStream&) = delete;
  void update(const unsigned char* end);
  std::uint64_t digest(const unsigned char* end);

 private:
  ChecksumKind kind_;
  const unsigned char* next_;
  void* state_;  // XXH64_state_t or XXH3_state_t
};

}  // namespace kvpack
