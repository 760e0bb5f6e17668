// Codecs of the tiered store: one context's KV cache (all layers) encoded by one lossy or
// lossless method into a versioned, checksummed byte blob, and decoded back.
//
// Blob layout (little-endian): a 64-byte header (magic, version, codec, dtype, layer
// count, sizes, XXH3 checksum, an optional HMAC tag), the entry's key, a table of one record per
// layer, each layer's payload at a 64-byte aligned offset, then (from format 3) the entry's
// version in the blob's last 8 bytes. The checksum covers every byte but its own field, so a
// flipped byte anywhere is detected; the tag binds the key and the version with the data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvpack/attention.h"
#include "kvpack/checksum.h"
#include "kvpack/common.h"
#include "kvpack/methods.h"

namespace kvpack {

/// One codec and its rate: a method of the registry (methods.h) that has a blob_code.
/// FullParams stores the cache as is, QuantParams as KIVI codes at its bits, and every
/// other compression method stores the slots it keeps of `rate` of the tokens.
struct Codec {
  MethodParams method = FullParams{};
  float rate = 1.0f;  ///< dropping / merging: share of the tokens kept, in (0, 1]

  static Codec kivi(int bits);
  static Codec dropping(const MethodParams& method, float rate);

  bool lossless() const { return std::holds_alternative<FullParams>(method); }
  bool quantizes() const { return std::holds_alternative<QuantParams>(method); }
  bool drops_tokens() const { return !lossless() && method_kind(method) == MethodKind::Compress; }
  int bits() const;  ///< KIVI's bits, else 0
  int code() const;  ///< the method's blob_code, written into the blob's header

  /// "none", "kivi-2", "h2o-0.5", ...: the name parse_codec reads back.
  std::string name() const;
  bool operator==(const Codec& other) const {
    return code() == other.code() && bits() == other.bits() && rate == other.rate;
  }
};

/// The codec named by `name` ("none", "kivi-8|4|2", or "<method>-R" with R in (0, 1] for
/// each compression method that has a blob_code); std::invalid_argument otherwise.
Codec parse_codec(const std::string& name);

/// Format version written into every blob (3: the entry version after the payloads); decode
/// reads it, version 2 (no entry version) and version 1 (XXH64 checksums), and refuses others.
constexpr std::uint32_t kBlobVersion = 3;

/// An owning byte buffer whose start and padded capacity are multiples of 4096, as
/// O_DIRECT I/O needs; the padding is zeroed.
class Buffer {
 public:
  static constexpr std::size_t kAlignment = 4096;
  explicit Buffer(std::size_t size);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  unsigned char* data() { return data_; }
  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }          ///< meaningful bytes
  std::size_t capacity() const { return capacity_; }  ///< size rounded up to 4096

 private:
  unsigned char* data_ = nullptr;
  std::size_t size_ = 0, capacity_ = 0;
};

using BlobPtr = std::shared_ptr<const Buffer>;

/// One layer's cache as views [heads_kv, tokens, dim].
struct LayerView {
  KVView keys;
  KVView values;
};

/// What a blob's header says about it.
struct BlobInfo {
  std::string key;
  Codec codec;
  DType dtype = DType::Float32;
  std::int64_t layers = 0;
  std::size_t size = 0;  ///< bytes of the blob (unpadded)
  std::uint64_t checksum = 0;
  /// Which put wrote the entry (ordered across stores, see TieredStore); 0 for blobs of
  /// format 1 and 2, and when read_blob_info was not given the whole blob.
  std::uint64_t version = 0;
};

/// Smallest prefix of a blob that holds its header and key.
constexpr std::size_t kBlobHeaderBytes = 64;

/// Parses and sanity-checks a header (magic, version, codec, sizes) from the first
/// `available` bytes; throws std::runtime_error when they are not a kvpack blob.
BlobInfo read_blob_info(const unsigned char* data, std::size_t available);

/// True when `header` (its first kBlobHeaderBytes) starts like a kvpack blob.
bool has_blob_magic(const unsigned char* header);
/// Bytes of a blob's header and key, from its first kBlobHeaderBytes: what
/// read_blob_info needs. Throws std::runtime_error for a bad header.
std::size_t blob_prefix_bytes(const unsigned char* header);

/// True when the blob's checksum matches its bytes.
bool verify_blob(const Buffer& blob);

/// Rewrites the checksum of `size` bytes (at least kBlobHeaderBytes) changed after encode:
/// what anyone who can write to a shared tier can do, so tests and the decoder's fuzzer
/// use it to forge blobs that pass the checksum.
void reseal_blob(unsigned char* data, std::size_t size);

/// Verifies a blob while it is being read into `blob`, so checking overlaps the I/O:
/// update(n) each time the first n bytes are in place (n growing), valid() at the end.
class BlobVerifier {
 public:
  explicit BlobVerifier(const Buffer& blob) : blob_(blob) {}
  void update(std::size_t available);
  /// True when every byte arrived and the header and checksum match.
  bool valid();

 private:
  const Buffer& blob_;
  std::optional<ChecksumStream> stream_;
};

/// Encodes `layers` (all with one dtype) under `key` with `codec`. Dropping and merging
/// rank tokens by the accumulated attention of each layer's evidence (evidence[l]);
/// with no evidence (empty vector) the layer's last 32 keys stand in for queries. A
/// non-empty `secret` signs the blob (see blob_signed_by); `version` is the entry version
/// it carries.
BlobPtr encode(const std::string& key, const std::vector<LayerView>& layers, const Codec& codec,
               const std::vector<Evidence>& evidence = {}, const std::string& secret = {},
               std::uint64_t version = 0);

/// True when the blob whose first kBlobHeaderBytes are `header` ends with an entry version
/// (format 3 on): its last 8 bytes, which read_blob_info reads when given the whole blob.
bool blob_has_version(const unsigned char* header);

/// True when the blob carries the tag of `secret`: HMAC-SHA256 (OpenSSL) of the whole blob
/// (its checksum and tag fields as zeros), 96 bits of it kept in the header. The checksum
/// catches accidents; only this catches a blob written by someone without the secret.
bool blob_signed_by(const Buffer& blob, const std::string& secret);

/// How many of a layer's last keys stand in for its queries when the caller gives none.
constexpr std::int64_t kProxyQueries = 32;

/// The last n keys of a layer as float32 [heads, n, dim]: the queries that stand in for
/// a context's own when the caller gives none (the Evidence layout).
std::vector<float> proxy_queries(const KVView& keys, std::int64_t n);

/// One decoded layer: [heads, tokens, dim] keys and values in the blob's dtype; for
/// dropped or merged caches also the kept positions and token counts [heads, tokens].
struct DecodedLayer {
  void* keys = nullptr;
  void* values = nullptr;
  const std::int32_t* positions = nullptr;  ///< null for none / quantization
  const std::int32_t* counts = nullptr;     ///< null for none / quantization
  std::int64_t heads = 0, tokens = 0, dim = 0;
  std::int64_t original_tokens = 0;  ///< tokens of the context before dropping / merging
};

/// A decoded context; `storage` owns the memory the layers point into.
struct DecodedKV {
  std::shared_ptr<void> storage;
  Codec codec;
  DType dtype = DType::Float32;
  std::vector<DecodedLayer> layers;
};

/// Decodes a verified blob. For codec none the layers point into the blob itself unless
/// `copy`: a blob still held by a tier must be copied before a caller may write to it;
/// one the caller alone holds (just read from a file) is handed over without a copy.
DecodedKV decode(const BlobPtr& blob, bool copy);

}  // namespace kvpack
