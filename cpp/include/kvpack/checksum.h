// XXH64 (Yann Collet's xxHash, 64-bit variant): the checksum of every stored blob, fast
// enough (several GB/s per core) to verify each read without becoming the bottleneck.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvpack {

/// XXH64 of `size` bytes at `data` with `seed`; matches the reference implementation.
std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed = 0);

}  // namespace kvpack
