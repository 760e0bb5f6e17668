#include "kvpack/codec.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>

#include <sys/mman.h>
#include <sstream>
#include <stdexcept>
#include <utility>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "kvpack/checksum.h"
#include "kvpack/compress.h"
#include "kvpack/convert.h"
#include "kvpack/parallel.h"
#include "kvpack/quant.h"

namespace kvpack {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'P', 'A', 'C', 'K', 'B', '1'};
constexpr std::size_t kPayloadAlignment = 64;

// The first 64 bytes of a blob.
struct Header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t codec_kind;
  std::uint32_t bits;
  float rate;
  std::uint32_t dtype;
  std::uint32_t layers;
  std::uint64_t size;      // bytes of the blob
  std::uint64_t checksum;  // XXH64 of bytes [48, size), seeded with XXH64 of bytes [0, 40)
  std::uint32_t key_bytes;
  unsigned char tag[12];  // HMAC-SHA256 of the blob under the store's secret (zeros: none)
};
static_assert(sizeof(Header) == kBlobHeaderBytes, "the header is 64 bytes");
constexpr std::size_t kChecksumField = 40, kAfterChecksum = 48, kTagField = 52;
constexpr std::size_t kTagBytes = sizeof(Header::tag);

// HMAC-SHA256 (OpenSSL) of a blob under `secret`, its checksum and tag fields read as
// zeros, truncated to the tag field (96 bits, as HMAC-SHA-256-96 of RFC 4868's family).
void blob_mac(const unsigned char* data, std::size_t size, const std::string& secret,
              unsigned char* tag) {
  static const unsigned char zeros[kTagBytes] = {};
  EVP_MAC* hmac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  EVP_MAC_CTX* context = hmac ? EVP_MAC_CTX_new(hmac) : nullptr;
  char digest_name[] = "SHA256";
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest_name, 0),
      OSSL_PARAM_construct_end()};
  unsigned char full[EVP_MAX_MD_SIZE];
  std::size_t length = 0;
  const bool done =
      context &&
      EVP_MAC_init(context, reinterpret_cast<const unsigned char*>(secret.data()), secret.size(),
                   params) == 1 &&
      EVP_MAC_update(context, data, kChecksumField) == 1 &&
      EVP_MAC_update(context, zeros, kAfterChecksum - kChecksumField) == 1 &&
      EVP_MAC_update(context, data + kAfterChecksum, kTagField - kAfterChecksum) == 1 &&
      EVP_MAC_update(context, zeros, kTagBytes) == 1 &&
      EVP_MAC_update(context, data + kBlobHeaderBytes, size - kBlobHeaderBytes) == 1 &&
      EVP_MAC_final(context, full, &length, sizeof full) == 1 && length >= kTagBytes;
  EVP_MAC_CTX_free(context);
  EVP_MAC_free(hmac);
  if (!done) throw std::runtime_error("HMAC-SHA256 unavailable from OpenSSL");
  std::memcpy(tag, full, kTagBytes);
}

// One layer's record in the table that follows the key.
struct LayerRecord {
  std::uint32_t heads, tokens, original_tokens, dim;
  std::uint64_t offset, bytes;
};
static_assert(sizeof(LayerRecord) == 32, "layer records are 32 bytes");

std::size_t align_up(std::size_t n, std::size_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

std::size_t table_offset(std::size_t key_bytes) {
  return align_up(sizeof(Header) + key_bytes, 8);
}

// Version 1 blobs carry XXH64 checksums, later ones XXH3: the hash named by the version
// field of a blob's first bytes.
ChecksumKind checksum_kind(const unsigned char* data) {
  std::uint32_t version;
  std::memcpy(&version, data + offsetof(Header, version), sizeof version);
  return version == 1 ? ChecksumKind::Xxh64 : ChecksumKind::Xxh3;
}

// The hash of bytes [0, 40) seeds the hash of bytes [48, size): every byte but the
// checksum field's own.
std::uint64_t checksum_seed(const unsigned char* data) {
  return checksum_kind(data) == ChecksumKind::Xxh64 ? xxh64(data, kChecksumField)
                                                    : xxh3(data, kChecksumField);
}

std::uint64_t blob_checksum(const unsigned char* data, std::size_t size) {
  ChecksumStream stream(checksum_kind(data), data + kAfterChecksum, checksum_seed(data));
  return stream.digest(data + size);
}

// "'none', 'kivi-8|4|2' or '<streaming_llm|...>-R'": what parse_codec reads, for errors.
std::string codec_forms() {
  std::string dropping;
  for_each_method([&](const auto& p) {
    using Params = std::decay_t<decltype(p)>;
    if (Codec{Params{}}.drops_tokens() && Params::blob_code >= 0)
      dropping += (dropping.empty() ? "" : "|") + std::string(Params::name);
  });
  return "'none', 'kivi-8|4|2' or '<" + dropping + ">-R' with R in (0, 1]";
}

std::size_t row_bytes(const KVView& view) {
  return static_cast<std::size_t>(view.dim) * dtype_size(view.dtype);
}

// One layer encoded, before it is laid into the blob.
struct EncodedLayer {
  LayerRecord record{};
  std::vector<unsigned char> payload;  // empty for codec none: copied from the views
};

void copy_rows(const KVView& view, unsigned char* out) {
  const std::size_t bytes = static_cast<std::size_t>(view.tokens) * row_bytes(view);
  for (std::int64_t h = 0; h < view.heads; ++h)
    std::memcpy(out + static_cast<std::size_t>(h) * bytes, view.row(h, 0), bytes);
}

EncodedLayer encode_dropped(const LayerView& layer, const Codec& codec, const Evidence* given) {
  CompressParams params;
  params.method = codec.method;
  params.budget = budget_tokens(codec.rate, layer.keys.tokens);
  std::vector<float> proxy;
  Evidence evidence;
  if (given) {
    evidence = *given;
  } else {
    const std::int64_t n = std::min(kProxyQueries, layer.keys.tokens);
    proxy = proxy_queries(layer.keys, n);
    evidence.queries = proxy.data();
    evidence.heads_q = layer.keys.heads;
    evidence.window = n;
  }
  const std::int64_t slots = compressed_length(params, layer.keys.tokens, layer.keys.heads);
  const std::int64_t heads = layer.keys.heads, dim = layer.keys.dim;
  const std::size_t kv_bytes = static_cast<std::size_t>(heads * slots) * row_bytes(layer.keys);
  const std::size_t index_bytes = static_cast<std::size_t>(heads * slots) * sizeof(std::int32_t);
  EncodedLayer encoded;
  encoded.payload.resize(2 * kv_bytes + 2 * index_bytes);
  unsigned char* base = encoded.payload.data();
  CompressOutput out;
  out.keys = base;
  out.values = base + kv_bytes;
  out.positions = reinterpret_cast<std::int32_t*>(base + 2 * kv_bytes);
  out.counts = reinterpret_cast<std::int32_t*>(base + 2 * kv_bytes + index_bytes);
  compress(layer.keys, layer.values, evidence, params, out);
  encoded.record = {static_cast<std::uint32_t>(heads),
                    static_cast<std::uint32_t>(slots),
                    static_cast<std::uint32_t>(layer.keys.tokens),
                    static_cast<std::uint32_t>(dim),
                    0,
                    encoded.payload.size()};
  return encoded;
}

EncodedLayer encode_layer(const LayerView& layer, const Codec& codec, const Evidence* evidence) {
  const KVView& keys = layer.keys;
  EncodedLayer encoded;
  encoded.record = {static_cast<std::uint32_t>(keys.heads),
                    static_cast<std::uint32_t>(keys.tokens),
                    static_cast<std::uint32_t>(keys.tokens),
                    static_cast<std::uint32_t>(keys.dim),
                    0,
                    0};
  if (codec.lossless()) {
    encoded.record.bytes =
        2 * static_cast<std::uint64_t>(keys.heads * keys.tokens) * row_bytes(keys);
  } else if (codec.quantizes()) {
    const QuantizedKV quantized(layer.keys, layer.values, std::get<QuantParams>(codec.method));
    encoded.payload.resize(quantized.serialized_size());
    quantized.serialize(encoded.payload.data());
    encoded.record.bytes = encoded.payload.size();
  } else {
    encoded = encode_dropped(layer, codec, evidence);
  }
  return encoded;
}

[[noreturn]] void malformed(const std::string& what) {
  throw std::runtime_error("not a valid kvpack blob: " + what);
}

// No layer decodes to more than this many times its blob's size (KIVI 2-bit of float32
// is 16x, plus its scales).
constexpr std::size_t kMaxExpansion = 32;

// Positions of a token-dropping layer ascend per head within its original tokens, and
// every slot stands for at least one token.
void check_slots(const DecodedLayer& layer) {
  for (std::int64_t h = 0; h < layer.heads; ++h) {
    const std::int32_t* positions = layer.positions + h * layer.tokens;
    const std::int32_t* counts = layer.counts + h * layer.tokens;
    for (std::int64_t t = 0; t < layer.tokens; ++t) {
      if (positions[t] < 0 || positions[t] >= layer.original_tokens ||
          (t > 0 && positions[t] <= positions[t - 1]))
        malformed("positions out of range or not ascending");
      if (counts[t] < 1 || counts[t] > layer.original_tokens) malformed("counts");
    }
  }
}

}  // namespace

std::vector<float> proxy_queries(const KVView& keys, std::int64_t n) {
  std::vector<float> queries(static_cast<std::size_t>(keys.heads * n * keys.dim));
  for (std::int64_t h = 0; h < keys.heads; ++h)
    for (std::int64_t i = 0; i < n; ++i)
      to_float(keys.row(h, keys.tokens - n + i), keys.dtype, keys.dim,
               queries.data() + (h * n + i) * keys.dim);
  return queries;
}

Codec Codec::kivi(int bits) {
  QuantParams params;
  params.bits = bits;
  return Codec{params, 1.0f};
}

Codec Codec::dropping(const MethodParams& method, float rate) {
  return Codec{method, rate};
}

int Codec::bits() const {
  return quantizes() ? std::get<QuantParams>(method).bits : 0;
}

int Codec::code() const {
  return std::visit([](const auto& p) { return p.blob_code; }, method);
}

std::string Codec::name() const {
  if (lossless()) return "none";
  std::ostringstream os;
  os << method_name(method) << "-";
  if (quantizes())
    os << bits();
  else
    os << rate;
  return os.str();
}

Codec parse_codec(const std::string& name) {
  if (name == "none") return Codec{};
  const auto dash = name.rfind('-');
  KVPACK_CHECK(dash != std::string::npos,
               "codec: expected " << codec_forms() << ", got '" << name << "'");
  const std::string kind = name.substr(0, dash), rate = name.substr(dash + 1);
  char* end = nullptr;
  const double number = std::strtod(rate.c_str(), &end);
  const bool numeric = !rate.empty() && end == rate.c_str() + rate.size();
  const std::optional<MethodParams> method = find_method(kind);
  const Codec codec{method ? *method : MethodParams{}};
  KVPACK_CHECK(method && !codec.lossless() && codec.code() >= 0,
               "codec: expected " << codec_forms() << ", got '" << name << "'");
  if (codec.quantizes()) {
    KVPACK_CHECK(numeric && (number == 2 || number == 4 || number == 8),
                 "codec: expected kivi-8, kivi-4 or kivi-2, got '" << name << "'");
    return Codec::kivi(static_cast<int>(number));
  }
  KVPACK_CHECK(numeric && number > 0.0 && number <= 1.0,
               "codec: expected a kept share R in (0, 1] in '" << name << "'");
  return Codec::dropping(*method, static_cast<float>(number));
}

// The codec a blob's header records, or nothing for an unknown code or bits.
std::optional<Codec> codec_of(std::uint32_t code, std::uint32_t bits, float rate) {
  std::optional<Codec> found;
  for_each_method([&](const auto& p) {
    if (std::decay_t<decltype(p)>::blob_code == static_cast<std::int64_t>(code))
      found = Codec{p, rate};
  });
  if (found && found->quantizes()) {
    if (bits != 2 && bits != 4 && bits != 8) return std::nullopt;
    found = Codec::kivi(static_cast<int>(bits));
  }
  return found;
}

Buffer::Buffer(std::size_t size)
    : size_(size), capacity_(std::max(align_up(size, kAlignment), kAlignment)) {
  // Large buffers start on a 2 MiB boundary and ask for transparent huge pages: a fresh
  // decoded entry is then faulted in with 512x fewer page faults.
  constexpr std::size_t kHuge = 2u << 20;
  const bool huge = capacity_ >= kHuge;
  const std::size_t allocated = huge ? align_up(capacity_, kHuge) : capacity_;
  data_ = static_cast<unsigned char*>(std::aligned_alloc(huge ? kHuge : kAlignment, allocated));
  if (!data_) throw std::bad_alloc();
  if (huge) ::madvise(data_, allocated, MADV_HUGEPAGE);
  std::memset(data_ + size_, 0, capacity_ - size_);
}

Buffer::~Buffer() {
  std::free(data_);
}

bool blob_has_version(const unsigned char* header) {
  std::uint32_t version;
  std::memcpy(&version, header + offsetof(Header, version), sizeof version);
  return version >= 3;
}

bool has_blob_magic(const unsigned char* header) {
  return std::memcmp(header, kMagic, sizeof kMagic) == 0;
}

std::size_t blob_prefix_bytes(const unsigned char* header_bytes) {
  Header header;
  std::memcpy(&header, header_bytes, sizeof header);
  if (!has_blob_magic(header_bytes)) malformed("bad magic");
  if (header.key_bytes > (1u << 20)) malformed("sizes");
  return sizeof(Header) + header.key_bytes;
}

BlobInfo read_blob_info(const unsigned char* data, std::size_t available) {
  if (available < sizeof(Header)) malformed("shorter than its header");
  Header header;
  std::memcpy(&header, data, sizeof header);
  if (std::memcmp(header.magic, kMagic, sizeof kMagic) != 0) malformed("bad magic");
  if (header.version < 1 || header.version > kBlobVersion)  // 1: XXH64, 2: no entry version
    malformed("version " + std::to_string(header.version) + ", expected 1 to " +
              std::to_string(kBlobVersion));
  const std::optional<Codec> codec = codec_of(header.codec_kind, header.bits, header.rate);
  if (!codec) malformed("codec");
  if (header.dtype > static_cast<std::uint32_t>(DType::BFloat16)) malformed("dtype");
  if (header.layers == 0) malformed("no layers");  // encode writes at least one
  const std::size_t table = table_offset(header.key_bytes);
  if (header.key_bytes > (1u << 20) || header.size < table + header.layers * sizeof(LayerRecord))
    malformed("sizes");
  const std::size_t trailer = header.version >= 3 ? sizeof(std::uint64_t) : 0;
  if (header.size < table + header.layers * sizeof(LayerRecord) + trailer) malformed("sizes");
  if (available < sizeof(Header) + header.key_bytes) malformed("key truncated");
  BlobInfo info;
  info.key.assign(reinterpret_cast<const char*>(data + sizeof(Header)), header.key_bytes);
  info.codec = *codec;
  info.dtype = static_cast<DType>(header.dtype);
  info.layers = header.layers;
  info.size = header.size;
  info.checksum = header.checksum;
  if (trailer && available >= header.size)
    std::memcpy(&info.version, data + header.size - trailer, sizeof info.version);
  return info;
}

void BlobVerifier::update(std::size_t available) {
  available = std::min(available, blob_.size());
  if (!stream_ && available >= kAfterChecksum)
    stream_.emplace(checksum_kind(blob_.data()), blob_.data() + kAfterChecksum,
                    checksum_seed(blob_.data()));
  if (stream_) stream_->update(blob_.data() + available);
}

bool BlobVerifier::valid() {
  try {
    const BlobInfo info = read_blob_info(blob_.data(), blob_.size());
    update(blob_.size());
    return info.size == blob_.size() && stream_ &&
           stream_->digest(blob_.data() + blob_.size()) == info.checksum;
  } catch (const std::runtime_error&) {
    return false;
  }
}

bool verify_blob(const Buffer& blob) {
  BlobVerifier verifier(blob);
  verifier.update(blob.size());
  return verifier.valid();
}

void reseal_blob(unsigned char* data, std::size_t size) {
  KVPACK_CHECK(size >= kBlobHeaderBytes,
               "size: expected at least " << kBlobHeaderBytes << " bytes, got " << size);
  const std::uint64_t checksum = blob_checksum(data, size);
  std::memcpy(data + kChecksumField, &checksum, sizeof checksum);
}

bool blob_signed_by(const Buffer& blob, const std::string& secret) {
  if (blob.size() < kBlobHeaderBytes) return false;
  unsigned char tag[kTagBytes];
  blob_mac(blob.data(), blob.size(), secret, tag);
  return CRYPTO_memcmp(tag, blob.data() + kTagField, kTagBytes) == 0;
}

BlobPtr encode(const std::string& key, const std::vector<LayerView>& layers, const Codec& codec,
               const std::vector<Evidence>& evidence, const std::string& secret,
               std::uint64_t version) {
  KVPACK_CHECK(!layers.empty(), "layers: expected at least one layer, got 0");
  KVPACK_CHECK(
      evidence.empty() || evidence.size() == layers.size(),
      "evidence: expected one per layer (" << layers.size() << "), got " << evidence.size());
  const DType dtype = layers[0].keys.dtype;
  for (const LayerView& layer : layers)
    KVPACK_CHECK(layer.keys.dtype == dtype && layer.values.dtype == dtype,
                 "layers: expected one dtype for all layers (" << dtype_name(dtype) << ")");
  std::vector<EncodedLayer> encoded(layers.size());
  parallel_for(static_cast<std::int64_t>(layers.size()), [&](std::int64_t l) {
    encoded[l] = encode_layer(layers[l], codec, evidence.empty() ? nullptr : &evidence[l]);
  });

  const std::size_t table = table_offset(key.size());
  std::size_t offset = table + layers.size() * sizeof(LayerRecord);
  for (EncodedLayer& layer : encoded) {
    offset = align_up(offset, kPayloadAlignment);
    layer.record.offset = offset;
    offset += layer.record.bytes;
  }
  const std::size_t payload_end = offset;
  offset = align_up(offset, sizeof version) + sizeof version;  // the entry version last
  auto blob = std::make_shared<Buffer>(offset);
  unsigned char* data = blob->data();
  std::memset(data, 0, table + layers.size() * sizeof(LayerRecord));
  Header header{};
  std::memcpy(header.magic, kMagic, sizeof kMagic);
  header.version = kBlobVersion;
  header.codec_kind = static_cast<std::uint32_t>(codec.code());
  header.bits = static_cast<std::uint32_t>(codec.bits());
  header.rate = codec.rate;
  header.dtype = static_cast<std::uint32_t>(dtype);
  header.layers = static_cast<std::uint32_t>(layers.size());
  header.size = offset;
  header.key_bytes = static_cast<std::uint32_t>(key.size());
  std::memcpy(data + sizeof header, key.data(), key.size());
  parallel_for(static_cast<std::int64_t>(layers.size()), [&](std::int64_t l) {
    const EncodedLayer& layer = encoded[l];
    std::memcpy(data + table + l * sizeof(LayerRecord), &layer.record, sizeof(LayerRecord));
    unsigned char* payload = data + layer.record.offset;
    if (codec.lossless()) {
      copy_rows(layers[l].keys, payload);
      copy_rows(layers[l].values, payload + layer.record.bytes / 2);
    } else {
      std::memcpy(payload, layer.payload.data(), layer.payload.size());
    }
    // Zero the alignment gap after the payload so the checksummed bytes are defined.
    const std::size_t end = layer.record.offset + layer.record.bytes;
    const std::size_t next = l + 1 < static_cast<std::int64_t>(layers.size())
                                 ? encoded[l + 1].record.offset
                                 : payload_end;
    std::memset(data + end, 0, next - end);
  });
  // The gap between the table and the first payload.
  const std::size_t table_end = table + layers.size() * sizeof(LayerRecord);
  std::memset(data + table_end, 0, encoded[0].record.offset - table_end);
  std::memset(data + payload_end, 0, offset - sizeof version - payload_end);
  std::memcpy(data + offset - sizeof version, &version, sizeof version);
  header.checksum = 0;
  std::memcpy(data, &header, sizeof header);
  if (!secret.empty()) blob_mac(data, offset, secret, data + kTagField);
  reseal_blob(data, offset);
  return blob;
}

DecodedKV decode(const BlobPtr& blob, bool copy) {
  const BlobInfo info = read_blob_info(blob->data(), blob->size());
  if (info.size != blob->size()) malformed("size differs from the header");
  const std::size_t table = table_offset(info.key.size());
  std::vector<LayerRecord> records(static_cast<std::size_t>(info.layers));
  std::memcpy(records.data(), blob->data() + table, records.size() * sizeof(LayerRecord));
  const std::size_t elem = dtype_size(info.dtype);

  DecodedKV decoded;
  decoded.codec = info.codec;
  decoded.dtype = info.dtype;
  decoded.layers.resize(records.size());
  // Output offsets: quantized layers expand; others keep their payload layout.
  std::vector<std::size_t> out_offset(records.size());
  std::size_t out_size = 0;
  // A blob may come from anyone who can write to a shared tier, checksum and all: every
  // size is checked without overflow against the blob before anything is read or
  // allocated from it.
  // Payloads follow the table in layer order without overlapping, as encode lays them
  // out, so together they are no larger than the blob and neither is what they expand to.
  // (Format 3 keeps its last 8 bytes for the entry version: no payload reaches them.)
  const std::size_t limit =
      info.size - (blob_has_version(blob->data()) ? sizeof(std::uint64_t) : 0);
  std::size_t payload_end = table + records.size() * sizeof(LayerRecord);
  for (std::size_t l = 0; l < records.size(); ++l) {
    const LayerRecord& r = records[l];
    if (r.offset < payload_end || r.offset > limit || r.bytes > limit - r.offset || r.dim == 0 ||
        r.offset % kPayloadAlignment != 0)
      malformed("layer table");
    payload_end = r.offset + r.bytes;
    std::size_t kv = 0, index = 0;
    if (!checked_product({r.heads, r.tokens, r.dim, elem}, kv) ||
        !checked_product({r.heads, r.tokens, sizeof(std::int32_t)}, index) ||
        kv > info.size * kMaxExpansion)
      malformed("layer shape");
    const std::size_t expected = info.codec.lossless()       ? 2 * kv
                                 : info.codec.drops_tokens() ? 2 * kv + 2 * index
                                                             : r.bytes;
    if (r.bytes != expected) malformed("layer payload size");
    if (info.codec.drops_tokens() && r.original_tokens < r.tokens)
      malformed("layer keeps more tokens than it had");
    out_size = align_up(out_size, kPayloadAlignment);
    out_offset[l] = out_size;
    out_size += info.codec.quantizes() ? 2 * kv : r.bytes;
    if (out_size > info.size * kMaxExpansion) malformed("layer shapes");
  }

  const bool in_place = !info.codec.quantizes() && !copy;
  std::shared_ptr<Buffer> output;
  unsigned char* base;
  if (in_place) {
    // The caller holds the only reference to a freshly read blob: hand its memory over.
    decoded.storage = std::const_pointer_cast<Buffer>(blob);
    base = const_cast<unsigned char*>(blob->data());
  } else {
    output = std::make_shared<Buffer>(std::max<std::size_t>(out_size, 1));
    decoded.storage = output;
    base = output->data();
  }
  parallel_for(static_cast<std::int64_t>(records.size()), [&](std::int64_t l) {
    const LayerRecord& r = records[l];
    const unsigned char* payload = blob->data() + r.offset;
    unsigned char* out = in_place ? base + r.offset : base + out_offset[l];
    const std::size_t kv = static_cast<std::size_t>(r.heads) * r.tokens * r.dim * elem;
    DecodedLayer& layer = decoded.layers[l];
    layer.heads = r.heads;
    layer.tokens = r.tokens;
    layer.dim = r.dim;
    layer.original_tokens = r.original_tokens;
    layer.keys = out;
    layer.values = out + kv;
    if (info.codec.quantizes()) {
      const QuantizedKV quantized = QuantizedKV::deserialize(payload, r.bytes);
      if (quantized.heads() != r.heads || quantized.tokens() != r.tokens ||
          quantized.dim() != r.dim || quantized.dtype() != info.dtype)
        malformed("quantized layer shape");
      quantized.dequantize(info.dtype, layer.keys, layer.values);
      return;
    }
    if (!in_place) std::memcpy(out, payload, r.bytes);
    if (info.codec.drops_tokens()) {
      const std::size_t index = static_cast<std::size_t>(r.heads) * r.tokens;
      layer.positions = reinterpret_cast<const std::int32_t*>(out + 2 * kv);
      layer.counts = layer.positions + index;
      check_slots(layer);
    }
  });
  return decoded;
}

}  // namespace kvpack
