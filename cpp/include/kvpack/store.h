// AdaptCache's tiered store: contexts' KV caches kept in DRAM, on SSD and on a Redis
// server, each entry encoded by the codec and placed in the tier the policy picks.
//
// The adaptive policy measures, when an entry is put, every candidate codec's quality
// (attention-output fidelity on probe queries) and decode time; with the tiers' read
// bandwidths that gives each (codec, tier) a delay, and place() (policy.h) picks one per
// entry, re-run on every insertion so older entries can be recompressed or demoted.
// The LRU baselines store one fixed codec, newest in DRAM, demoting the least recently
// used entry one tier down when a tier is full and promoting an entry on a hit.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "kvpack/codec.h"
#include "kvpack/tier.h"

namespace kvpack {

/// How the store encodes and places entries.
enum class StorePolicy : int {
  Adaptive = 0,      ///< codec, rate and tier per entry by utility (AdaptCache)
  LRU = 1,           ///< no compression, LRU across the tiers
  Kivi2LRU = 2,      ///< KIVI 2-bit, LRU across the tiers
  StreamingLRU = 3,  ///< StreamingLLM at `streaming_rate`, LRU across the tiers
};

/// The adaptive policy's candidate codecs when none are given.
std::vector<Codec> default_codecs();

/// Parameters of TieredStore.
struct StoreParams {
  std::int64_t dram_bytes = 0;
  std::string ssd_dir;  ///< empty: no SSD tier
  std::int64_t ssd_bytes = 0;
  bool o_direct = false;  ///< SSD reads bypass the page cache
  int io_threads = 2;     ///< SSD prefetch readers
  bool remote = false;    ///< a Redis tier after the others
  RedisParams redis;
  StorePolicy policy = StorePolicy::Adaptive;
  double alpha = 0.1;              ///< seconds of loading delay one unit of quality is worth
  std::vector<Codec> codecs;       ///< adaptive candidates (empty: default_codecs())
  float streaming_rate = 0.5f;     ///< StreamingLRU's kept share
  std::vector<double> bandwidths;  ///< read bytes/s per tier, fastest first; empty: profiled
  /// Signs every blob the store writes (HMAC-SHA256, see blob_signed_by) and serves only
  /// blobs signed with it: a blob someone without the secret wrote to a shared tier (the
  /// SSD directory, the Redis server) is a counted miss, never decoded. Empty: unsigned.
  std::string secret;
  /// Stored bytes decoded per second, one per codec of codecs() or one for all (infinity:
  /// free); empty: each candidate's decode is timed at put. Given with `bandwidths`, placement
  /// depends on the inputs alone, not on how busy the machine is.
  std::vector<double> decode_bandwidths;
};

/// What a get returned and cost.
struct GetResult {
  DecodedKV kv;
  std::string tier;
  std::int64_t bytes = 0;   ///< stored bytes read
  double io_seconds = 0.0;  ///< reading the blob from its tier (checksum included)
  double decode_seconds = 0.0;
  double quality = 0.0;  ///< measured at put (NaN when unknown: entries found on disk)
};

/// Counters of one tier.
struct TierStats {
  std::string name;
  std::int64_t hits = 0, entries = 0, used = 0, capacity = 0;
  double bandwidth = 0.0;       ///< bytes/s the policy assumes
  std::int64_t prefetched = 0;  ///< blobs read ahead by prefetch, held in memory
};

/// Counters of a store since it opened.
struct StoreStats {
  std::vector<TierStats> tiers;
  std::int64_t gets = 0, misses = 0, puts = 0;
  std::int64_t evictions = 0;       ///< entries that left the last tier
  std::int64_t moves = 0;           ///< entries moved between tiers
  std::int64_t recompressions = 0;  ///< entries re-encoded with another codec
  std::int64_t corrupt = 0, errors = 0;
  std::int64_t unauthenticated = 0;  ///< blobs not signed with the secret, or another key's
  std::int64_t stale = 0;  ///< blobs older than a version this store has written, seen or deleted
  double mean_delay = 0.0, p95_delay = 0.0;  ///< seconds (io + decode) over hits
  double mean_quality = 0.0;                 ///< over hits with a known quality
};

/// The tiered store. Thread-safe.
///
/// Several stores (processes) may share the SSD directory and the remote tier. Every put
/// gives the entry a version from a hybrid logical clock (nanoseconds of the wall clock,
/// and above every version this store has written or seen), carried in the blob and bound
/// to it by the checksum and, with a secret, the signature. A store never serves a version
/// older than the newest of a key it has written or served, nor one from before it deleted
/// the key (both a counted miss: StoreStats::stale); a newer version another store wrote is
/// served. A blob it cannot verify (another secret, older, malformed) is someone else's: a
/// counted miss, left in place. These floors live in memory: a store that opens knows the
/// versions it finds on its SSD tier, not the deletes of the stores before it. A store
/// moves, promotes and evicts only the blobs it wrote (and those it found on opening):
/// another store's entry it found is served in place, and leaves its placement untouched.
class TieredStore {
 public:
  explicit TieredStore(const StoreParams& params);
  ~TieredStore();

  /// Stores one context (all layers, one dtype) under `key`, replacing any entry there; the
  /// replaced version stays until the new one is in place. Throws std::system_error when a
  /// tier failed to write the entry (full or read-only disk, a remote server unreachable or
  /// not answering; all remote calls of one put share one timeout): then the old version
  /// stays. A put overtaken by a newer version of the key (a concurrent put or delete, or a
  /// newer version seen meanwhile) is ordered before it and stores nothing.
  /// probes[l]: queries [heads_q, n, dim] of layer l scoring quality and guiding token
  /// dropping (empty: each layer's last 32 keys stand in). qualities: the caller's
  /// quality per codec of codecs() (empty: measured).
  void put(const std::string& key, const std::vector<LayerView>& layers,
           const std::vector<Evidence>& probes, const std::vector<double>& qualities = {});

  /// The entry decoded, or nothing when absent (or found corrupt, then dropped).
  std::optional<GetResult> get(const std::string& key);
  bool contains(const std::string& key);
  bool remove(const std::string& key);
  /// Starts reading an SSD entry in the background.
  void prefetch(const std::string& key);

  StoreStats stats() const;
  /// Tier name and codec of an entry held by this store.
  std::optional<std::pair<std::string, Codec>> where(const std::string& key) const;
  /// The codecs the policy chooses among (one for the LRU baselines).
  const std::vector<Codec>& codecs() const { return codecs_; }
  const std::vector<double>& bandwidths() const { return bandwidths_; }

 private:
  struct Candidate {
    Codec codec;
    std::int64_t bytes = 0;  ///< stored bytes
    double quality = 0.0;
    double decode_seconds = 0.0;
  };
  struct Entry {
    std::vector<Candidate> candidates;
    int held = 0;  ///< candidate held now
    int tier = 0;
    double hits = 0.0;
    std::uint64_t last_use = 0;
    std::uint64_t version = 0;  ///< the entry version of the blob held
    /// Its blob is another store's (found in a shared tier, or replaced there by another
    /// store): served, but never moved, promoted or deleted by this store's placement.
    bool foreign = false;
    std::vector<std::vector<float>> probe_data;  ///< for re-encoding later
    std::vector<Evidence> probes;
  };

  // Where the version a put replaces is held, until the new one is in place.
  struct Replaced {
    int tier = -1;           ///< -1: nothing replaced (or held nowhere)
    std::int64_t bytes = 0;  ///< its stored bytes
  };

  double utility(const Entry& entry, int candidate, int tier) const;
  // Place the entry `key` just put (and re-plan the others); the tier error that kept it
  // out of every tier, if one did.
  std::optional<std::system_error> place_adaptive(const std::string& key,
                                                  std::unordered_map<int, BlobPtr>& fresh,
                                                  const Replaced& old);
  std::optional<std::system_error> place_lru(const std::string& key, const BlobPtr& blob,
                                             const Replaced& old);
  // tiers_[tier]->put, an I/O failure (counted by the tier) reported in `failure` when given
  // and otherwise a blob not placed.
  // True when `blob` is the blob of `key` and, with a secret, signed with it.
  bool authentic(const std::string& key, const Buffer& blob) const;
  // The next entry version: above every version written or seen, at least the wall clock.
  std::uint64_t next_version();
  // True when `version` of `key` may be served (recorded as seen); false, counted as
  // stale, when it is older than one written, served or deleted.
  bool current(const std::string& key, std::uint64_t version);
  // Forget the entry without deleting its blob, which is someone else's.
  void disown(const std::string& key, int tier);
  bool shared(int tier) const { return tiers_[tier]->name() != "dram"; }
  bool put_blob(int tier, const std::string& key, const BlobPtr& blob,
                std::optional<std::system_error>* failure = nullptr);
  void make_room(int tier, std::int64_t bytes, const std::string& keep);
  void drop(const std::string& key);  // forget an entry and its blob
  // A read blob decoded (outside the lock) and counted as a hit of `tier`; nothing when it
  // is malformed (then dropped and counted as corrupt).
  std::optional<GetResult> served(const std::string& key, const BlobPtr& blob, int tier,
                                  double io_seconds, double quality, bool shared);
  void profile_bandwidths();

  StoreParams params_;
  std::vector<Codec> codecs_;
  std::vector<std::unique_ptr<Tier>> tiers_;
  std::vector<double> bandwidths_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Entry> entries_;
  std::vector<std::string> order_;  ///< keys in insertion order (deterministic placement)
  std::uint64_t clock_ = 0;
  std::uint64_t versions_ = 0;  ///< the newest version written or seen
  struct Seen {
    std::uint64_t newest = 0;  ///< the newest version written or served
    bool deleted = false;      ///< deleted since: only newer versions are served
  };
  std::unordered_map<std::string, Seen> seen_;
  StoreStats counters_;
  std::vector<double> delays_, qualities_;
};

}  // namespace kvpack
