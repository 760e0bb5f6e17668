// The storage tiers of the tiered store behind one interface: DRAM, SSD (a directory of
// blob files) and a remote Redis server or Redis Cluster. Tiers hold encoded blobs; every read is
// verified against the blob's checksum, and a corrupt blob is dropped and counted,
// never returned.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvpack/codec.h"

namespace kvpack {

/// What went wrong in a tier, counted since it opened.
struct TierCounters {
  std::int64_t corrupt = 0;     ///< blobs whose checksum or header failed (dropped)
  std::int64_t errors = 0;      ///< I/O or connection errors (reported as misses)
  std::int64_t prefetched = 0;  ///< blobs read ahead and held in memory now
};

/// One blob a tier holds.
struct StoredBlob {
  std::string key;
  std::int64_t bytes = 0;  ///< stored bytes
  Codec codec;
  std::uint64_t version = 0;  ///< the entry version the blob carries (BlobInfo::version)
};

/// Bytes a blob occupies in any tier: its size rounded up to 4096 (the I/O block).
inline std::int64_t stored_bytes(std::size_t blob_size) {
  return static_cast<std::int64_t>((blob_size + Buffer::kAlignment - 1) / Buffer::kAlignment *
                                   Buffer::kAlignment);
}

/// One storage tier. Thread-safe: every method may be called from many threads.
class Tier {
 public:
  virtual ~Tier() = default;
  virtual std::string name() const = 0;
  /// Bytes of stored blobs (stored_bytes of each); never above the capacity.
  virtual std::int64_t used() const = 0;
  virtual std::int64_t capacity() const = 0;
  /// Stores `blob` under `key`, replacing any previous blob; false (and nothing stored)
  /// when it does not fit. Throws std::system_error when the write failed, the previous
  /// blob kept: the SSD tier's disk full or read-only, the remote tier's server
  /// unreachable or not answering within its timeout (ETIMEDOUT, ECONNREFUSED, ...).
  virtual bool put(const std::string& key, const BlobPtr& blob) = 0;
  /// The verified blob under `key`, or null when absent, corrupt or unreachable. Tiers other
  /// processes write (SSD, remote) also return blobs they did not place themselves.
  virtual BlobPtr get(const std::string& key) = 0;
  virtual bool contains(const std::string& key) = 0;
  virtual void remove(const std::string& key) = 0;
  /// Stops holding `key` (no longer listed or counted in used()) but leaves its blob where
  /// other processes find it: a blob this store cannot verify, or older than a version it
  /// has seen, is someone else's, not this store's to delete.
  virtual void forget(const std::string& key) = 0;
  /// The keys this tier holds with their stored bytes (for the SSD tier, rebuilt from the
  /// directory when it opened).
  virtual std::vector<StoredBlob> list() = 0;
  /// Starts reading `key` in the background so a later get finds it in memory.
  virtual void prefetch(const std::string& /*key*/) {}
  virtual TierCounters counters() const = 0;
};

/// Blobs in process memory.
std::unique_ptr<Tier> make_dram_tier(std::int64_t capacity);

/// Parameters of the SSD tier.
struct SsdParams {
  std::string directory;      ///< created when missing
  std::int64_t capacity = 0;  ///< bytes
  bool o_direct = false;      ///< read with O_DIRECT (page cache bypassed) where supported
  int io_threads = 2;         ///< background readers serving prefetch
  std::int64_t prefetch_bytes = 256ll << 20;  ///< most bytes held by prefetched reads
};

/// Blobs as files in a directory: written to a temporary file (named after the blob, the
/// writer's pid and a serial), fsynced and renamed into place (a crash leaves the old file
/// or the new one, never a torn one); the index is rebuilt from the files when the
/// directory is reopened. Several processes of one machine (one pid namespace) may share
/// the directory: opening it removes only temporary files whose writer is gone, and a file
/// another process replaced (another size, another codec) is read whole and verified, never
/// taken for a corrupt one; a key another process stored is found at its first get.
std::unique_ptr<Tier> make_ssd_tier(const SsdParams& params);

/// Parameters of the remote tier.
struct RedisParams {
  std::string host = "127.0.0.1";
  int port = 6379;
  int db = 0;
  std::string prefix = "kvpack:";  ///< namespace of the store's keys on the server
  std::int64_t capacity = 0;       ///< bytes this process may place there
  int timeout_ms = 2000;           ///< one bound on a call: connect, send, redirections, reply
  /// Seed nodes (host, port) of a Redis Cluster (any live one is enough: the slot map is
  /// read from it); empty: the one server at host:port.
  std::vector<std::pair<std::string, int>> cluster;
};

/// Hash slots of a Redis Cluster.
constexpr int kClusterSlots = 16384;

/// The Redis Cluster hash slot of a Redis key: CRC16 (XMODEM) of its hash tag (what lies
/// between its first '{' and the next '}', when not empty) or else of the whole key, mod
/// 16384, as CLUSTER KEYSLOT gives it. An entry is one Redis key (its metadata is in the
/// blob's header), so it lives in one slot.
int cluster_slot(std::string_view key);

/// Blobs on a Redis server or a Redis Cluster, shared by every process that uses the same
/// prefix. A server (a cluster node) that is down or stops answering makes the calls that
/// reach it fail fast (counted as errors): a get is a miss, a put throws
/// std::system_error. After three failures in a row the node is left alone for a back-off
/// (1 s, doubling to 30 s) during which its calls fail at once. In a cluster each key goes
/// to the master of its slot (cluster_slot), one connection per node; MOVED updates the slot
/// map (read again with CLUSTER SLOTS, at most every 100 ms while it is stale), ASK is
/// followed with ASKING, and a failed node makes the map be read again, so the slots of a
/// master that failed over are served by its promoted replica without a restart.
std::unique_ptr<Tier> make_redis_tier(const RedisParams& params);

/// While one lives on a thread, the remote tier's calls made on that thread share one
/// deadline (one timeout from the first call) and, once one has failed, the others fail at
/// once: a store operation that makes several calls (a put, the moves it causes) is bounded
/// like a single call. Scopes nest; the outermost one counts.
class RemoteOperation {
 public:
  RemoteOperation();
  ~RemoteOperation();
  RemoteOperation(const RemoteOperation&) = delete;
  RemoteOperation& operator=(const RemoteOperation&) = delete;
};

}  // namespace kvpack
