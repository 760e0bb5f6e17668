// Mutation fuzzer of the blob decoder: valid blobs from a corpus are mutated (bits, bytes,
// sizes and offsets set to boundary values, records copied over each other, lengths cut
// or grown), mostly re-checksummed as a writer to a shared tier could, then verified and
// decoded. Every input must be refused with std::runtime_error or decode to arrays that lie
// inside the decoded storage with valid positions and counts; a mutated blob that was not
// re-checksummed must never verify. Built with the C++ tests, so the sanitizer build runs
// it under AddressSanitizer + UBSan, where a read outside a buffer stops it.
//
//   kvpack_fuzz_decode CORPUS_DIR INPUTS SEED      fuzz INPUTS inputs (exit 1 on a finding)
//   kvpack_fuzz_decode --write-corpus CORPUS_DIR   write the seed blobs (of this version;
//                                                  the corpus keeps version 1 seeds too)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvpack/codec.h"
#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "reference.h"

namespace kvpack {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<unsigned char>;

// Small contexts of every codec and dtype: each decode path, a few KB each.
void write_corpus(const fs::path& directory) {
  fs::create_directories(directory);
  const struct {
    const char* codec;
    DType dtype;
    std::int64_t tokens;
  } seeds[] = {
      {"none", DType::Float32, 24},          {"none", DType::Float16, 24},
      {"none", DType::BFloat16, 24},         {"kivi-2", DType::Float32, 168},
      {"kivi-4", DType::Float16, 168},       {"kivi-8", DType::BFloat16, 168},
      {"kivi-2", DType::Float16, 40},        {"streaming_llm-0.5", DType::Float32, 40},
      {"snapkv-0.25", DType::Float16, 40},   {"h2o-0.5", DType::Float32, 40},
      {"kvmerger-0.5", DType::BFloat16, 40},
  };
  int n = 0;
  for (const auto& seed : seeds) {
    testing::Cache c(2, seed.tokens, 4, static_cast<unsigned>(n + 1));
    std::vector<std::uint16_t> k16(c.keys.size()), v16(c.values.size());
    KVView k = c.k, v = c.v;
    if (seed.dtype != DType::Float32) {
      from_float(c.keys.data(), static_cast<std::int64_t>(c.keys.size()), seed.dtype, k16.data());
      from_float(c.values.data(), static_cast<std::int64_t>(c.values.size()), seed.dtype,
                 v16.data());
      k = KVView{k16.data(), seed.dtype, c.k.heads, c.k.tokens, c.k.dim};
      v = KVView{v16.data(), seed.dtype, c.v.heads, c.v.tokens, c.v.dim};
    }
    const BlobPtr blob =
        encode("seed-" + std::to_string(n), {{k, v}, {k, v}}, parse_codec(seed.codec));
    char name[64];
    std::snprintf(name, sizeof name, "v%u-%02d-%s-%s.kvb", kBlobVersion, n++, seed.codec,
                  dtype_name(seed.dtype));
    std::ofstream(directory / name, std::ios::binary)
        .write(reinterpret_cast<const char*>(blob->data()),
               static_cast<std::streamsize>(blob->size()));
  }
}

std::vector<Bytes> read_corpus(const fs::path& directory) {
  std::vector<fs::path> paths;
  for (const auto& item : fs::directory_iterator(directory))
    if (item.path().extension() == ".kvb") paths.push_back(item.path());
  std::sort(paths.begin(), paths.end());
  std::vector<Bytes> corpus;
  for (const fs::path& path : paths) {
    std::ifstream file(path, std::ios::binary);
    corpus.emplace_back(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }
  return corpus;
}

BlobPtr as_blob(const Bytes& bytes) {
  auto blob = std::make_shared<Buffer>(bytes.size());
  if (!bytes.empty()) std::memcpy(blob->data(), bytes.data(), bytes.size());
  return blob;
}

// Offsets where a mutation does the most: the header, the layer table and the start of
// each payload (a quantized layer's own header, the first positions).
std::vector<std::size_t> hot_offsets(const Bytes& blob) {
  std::vector<std::size_t> hot;
  for (std::size_t at = 0; at < kBlobHeaderBytes; at += 4) hot.push_back(at);
  std::uint32_t key_bytes = 0, layers = 0;
  std::memcpy(&key_bytes, blob.data() + 48, 4);
  std::memcpy(&layers, blob.data() + 28, 4);
  const std::size_t table = (kBlobHeaderBytes + key_bytes + 7) / 8 * 8;
  for (std::uint32_t l = 0; l < layers; ++l) {
    const std::size_t record = table + 32 * l;
    for (std::size_t at = 0; at < 32; at += 4) hot.push_back(record + at);
    std::uint64_t offset = 0, bytes = 0;
    std::memcpy(&offset, blob.data() + record + 16, 8);
    std::memcpy(&bytes, blob.data() + record + 24, 8);
    for (std::size_t at = 0; at < 64; at += 4) hot.push_back(offset + at);
    // A dropping codec's positions and counts close the payload.
    for (std::size_t at = 4; at <= 64 && at <= bytes; at += 4) hot.push_back(offset + bytes - at);
  }
  // The entry version closing a blob of format 3 (and what precedes it).
  for (std::size_t at = 4; at <= 16 && at <= blob.size(); at += 4) hot.push_back(blob.size() - at);
  return hot;
}

class Mutator {
 public:
  explicit Mutator(std::uint64_t seed) : gen_(seed) {}

  std::uint64_t below(std::uint64_t n) { return n ? gen_() % n : 0; }

  void mutate(Bytes& blob, const std::vector<std::size_t>& hot) {
    const int count = 1 + static_cast<int>(below(4));
    for (int i = 0; i < count && !blob.empty(); ++i) {
      const std::size_t at = below(2) ? hot[below(hot.size())] : below(blob.size());
      switch (below(8)) {
        case 0:  // one bit
          if (at < blob.size()) blob[at] ^= static_cast<unsigned char>(1u << below(8));
          break;
        case 1:  // one byte
          if (at < blob.size()) blob[at] = static_cast<unsigned char>(gen_());
          break;
        case 2:
        case 3:  // a 32-bit boundary value
          put(blob, at, interesting(blob.size()), 4);
          break;
        case 4:  // a 64-bit boundary value
          put(blob, at & ~std::size_t{7}, interesting(blob.size()), 8);
          break;
        case 5: {  // a field nudged by a little
          std::uint32_t value = 0;
          if (at + 4 <= blob.size()) std::memcpy(&value, blob.data() + at, 4);
          put(blob, at, value + static_cast<std::uint32_t>(below(17)) - 8u, 4);
          break;
        }
        case 6: {  // 32 bytes copied over others (a layer record repeated)
          const std::size_t from = hot[below(hot.size())] & ~std::size_t{7};
          if (from + 32 <= blob.size() && at + 32 <= blob.size())
            std::memmove(blob.data() + (at & ~std::size_t{7}), blob.data() + from, 32);
          break;
        }
        default: {  // cut or grown, the header's size field sometimes following
          const std::size_t size = below(2) ? below(blob.size() + 1) : blob.size() + below(4096);
          blob.resize(std::max<std::size_t>(size, 1), static_cast<unsigned char>(gen_()));
          if (below(2)) put(blob, 32, blob.size(), 8);
          break;
        }
      }
    }
  }

 private:
  std::uint64_t interesting(std::size_t size) {
    const std::uint64_t values[] = {0,
                                    1,
                                    2,
                                    3,
                                    4,
                                    8,
                                    31,
                                    32,
                                    64,
                                    127,
                                    128,
                                    4096,
                                    size,
                                    size - 64,
                                    size + 64,
                                    0x7fffffffull,
                                    0x80000000ull,
                                    0xffffffffull,
                                    1ull << 20,
                                    (1ull << 20) - 1,
                                    1ull << 32,
                                    0x7fffffffffffffffull,
                                    0x8000000000000000ull,
                                    ~0ull,
                                    ~0ull - (8ull << 20) + 1,
                                    gen_()};
    return values[below(std::size(values))];
  }

  static void put(Bytes& blob, std::size_t at, std::uint64_t value, std::size_t width) {
    if (at + width <= blob.size()) std::memcpy(blob.data() + at, &value, width);
  }

  std::mt19937_64 gen_;
};

// Every decoded array inside the storage, read in full (a read outside stops ASan), and
// the positions and counts of a dropping codec in range and ascending.
void check_decoded(const DecodedKV& kv) {
  const auto& storage = *static_cast<const Buffer*>(kv.storage.get());
  const unsigned char* begin = storage.data();
  const unsigned char* end = begin + storage.capacity();
  const auto inside = [&](const void* p, std::size_t bytes) {
    const auto* at = static_cast<const unsigned char*>(p);
    if (bytes == 0) return;
    if (at < begin || at > end || bytes > static_cast<std::size_t>(end - at))
      throw std::logic_error("decoded array outside its storage");
    volatile unsigned char sink = 0;
    for (std::size_t i = 0; i < bytes; i += 61) sink = static_cast<unsigned char>(sink ^ at[i]);
    sink = static_cast<unsigned char>(sink ^ at[bytes - 1]);
  };
  for (const DecodedLayer& layer : kv.layers) {
    const auto elements = static_cast<std::size_t>(layer.heads * layer.tokens * layer.dim);
    inside(layer.keys, elements * dtype_size(kv.dtype));
    inside(layer.values, elements * dtype_size(kv.dtype));
    if (!layer.positions) continue;
    const auto slots = static_cast<std::size_t>(layer.heads * layer.tokens);
    inside(layer.positions, slots * 4);
    inside(layer.counts, slots * 4);
    for (std::int64_t h = 0; h < layer.heads; ++h)
      for (std::int64_t t = 0; t < layer.tokens; ++t) {
        const std::int32_t p = layer.positions[h * layer.tokens + t];
        const std::int32_t n = layer.counts[h * layer.tokens + t];
        if (p < 0 || p >= layer.original_tokens ||
            (t > 0 && p <= layer.positions[h * layer.tokens + t - 1]) || n < 1)
          throw std::logic_error("decoded positions or counts out of range");
      }
  }
}

int fuzz(const fs::path& directory, std::int64_t inputs, std::uint64_t seed) {
  const std::vector<Bytes> corpus = read_corpus(directory);
  if (corpus.empty()) {
    std::cerr << "fuzz_decode: no *.kvb seeds in " << directory << "\n";
    return 1;
  }
  std::vector<std::vector<std::size_t>> hot;
  for (const Bytes& blob : corpus) {
    const BlobPtr valid = as_blob(blob);
    if (!verify_blob(*valid)) {
      std::cerr << "fuzz_decode: a seed does not verify\n";
      return 1;
    }
    check_decoded(decode(valid, true));
    hot.push_back(hot_offsets(blob));
  }
  Mutator mutator(seed);
  std::int64_t verified = 0, decoded = 0, refused = 0, unsealed = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::int64_t i = 0; i < inputs; ++i) {
    const std::size_t which = mutator.below(corpus.size());
    Bytes bytes = corpus[which];
    mutator.mutate(bytes, hot[which]);
    // One input in eight keeps its stale checksum: it must never verify.
    const bool reseal = mutator.below(8) != 0 && bytes.size() >= kBlobHeaderBytes;
    if (reseal) reseal_blob(bytes.data(), bytes.size());
    const BlobPtr blob = as_blob(bytes);
    const char* finding = nullptr;
    std::string detail;
    try {
      if (verify_blob(*blob)) {
        ++verified;
        if (!reseal && bytes != corpus[which]) finding = "a mutated blob passed its old checksum";
        if (!finding) {
          check_decoded(decode(blob, mutator.below(2) != 0));
          ++decoded;
        }
      } else if (!reseal) {
        ++unsealed;
      }
    } catch (const std::runtime_error&) {
      ++refused;  // malformed: what the decoder must say
    } catch (const std::exception& error) {
      finding = "an exception other than std::runtime_error";
      detail = error.what();
    }
    if (finding) {
      const fs::path saved = fs::temp_directory_path() / ("fuzz_decode-" + std::to_string(i));
      std::ofstream(saved, std::ios::binary)
          .write(reinterpret_cast<const char*>(bytes.data()),
                 static_cast<std::streamsize>(bytes.size()));
      std::cerr << "fuzz_decode: input " << i << " (seed " << seed << "): " << finding << " "
                << detail << "; saved to " << saved << "\n";
      return 1;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "fuzz_decode: " << inputs << " inputs in " << seconds << " s: " << verified
            << " passed the checksum, " << decoded << " decoded, " << refused
            << " refused as malformed, " << unsealed
            << " not re-checksummed and caught; 0 crashes, 0 reads outside a buffer\n";
  return 0;
}

}  // namespace
}  // namespace kvpack

int main(int argc, char** argv) {
  kvpack::set_num_threads(1);  // one decode at a time: the fuzzer's time goes to inputs
  if (argc == 3 && std::string(argv[1]) == "--write-corpus") {
    kvpack::write_corpus(argv[2]);
    return 0;
  }
  if (argc != 4) {
    std::cerr << "usage: kvpack_fuzz_decode CORPUS_DIR INPUTS SEED | --write-corpus CORPUS_DIR\n";
    return 2;
  }
  return kvpack::fuzz(argv[1], std::stoll(argv[2]), std::stoull(argv[3]));
}
