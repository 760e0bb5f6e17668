#include "kvpack/store.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <system_error>

#include "kvpack/attention.h"
#include "kvpack/policy.h"

namespace kvpack {

namespace {

using Clock = std::chrono::steady_clock;

// The entry version of a blob whose header was checked (0 when it has none).
std::uint64_t blob_version(const Buffer& blob) {
  try {
    return read_blob_info(blob.data(), blob.size()).version;
  } catch (const std::runtime_error&) {
    return 0;
  }
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A decoded layer as views for attention.
LayerView layer_view(const DecodedKV& kv, std::size_t l) {
  const DecodedLayer& layer = kv.layers[l];
  const KVView keys{layer.keys, kv.dtype, layer.heads, layer.tokens, layer.dim, 0};
  KVView values = keys;
  values.data = layer.values;
  return {keys, values};
}

}  // namespace

std::vector<Codec> default_codecs() {
  std::vector<Codec> codecs;
  for (const char* name : {"none", "kivi-8", "kivi-4", "kivi-2", "streaming_llm-0.5", "snapkv-0.5",
                           "h2o-0.5", "kvmerger-0.5", "snapkv-0.25", "h2o-0.25"})
    codecs.push_back(parse_codec(name));
  return codecs;
}

TieredStore::TieredStore(const StoreParams& params) : params_(params) {
  KVPACK_CHECK(std::isfinite(params.alpha) && params.alpha >= 0.0,
               "alpha: expected a finite value >= 0, got " << params.alpha);
  switch (params.policy) {
    case StorePolicy::Adaptive:
      codecs_ = params.codecs.empty() ? default_codecs() : params.codecs;
      KVPACK_CHECK(std::find(codecs_.begin(), codecs_.end(), Codec{}) != codecs_.end(),
                   "codecs: expected 'none' among the candidates (the lossless fallback)");
      break;
    case StorePolicy::LRU:
      codecs_ = {Codec{}};
      break;
    case StorePolicy::Kivi2LRU:
      codecs_ = {Codec::kivi(2)};
      break;
    case StorePolicy::StreamingLRU:
      KVPACK_CHECK(params.streaming_rate > 0.0f && params.streaming_rate <= 1.0f,
                   "streaming_rate: expected a share in (0, 1], got " << params.streaming_rate);
      codecs_ = {Codec::dropping(StreamingLLMParams{}, params.streaming_rate)};
      break;
  }
  tiers_.push_back(make_dram_tier(params.dram_bytes));
  if (!params.ssd_dir.empty())
    tiers_.push_back(make_ssd_tier(SsdParams{params.ssd_dir, params.ssd_bytes, params.o_direct,
                                             params.io_threads, 256ll << 20}));
  if (params.remote) tiers_.push_back(make_redis_tier(params.redis));
  counters_.tiers.resize(tiers_.size());
  if (params.bandwidths.empty()) {
    profile_bandwidths();
  } else {
    KVPACK_CHECK(params.bandwidths.size() == tiers_.size(), "bandwidths: expected one per tier ("
                                                                << tiers_.size() << "), got "
                                                                << params.bandwidths.size());
    for (const double b : params.bandwidths)
      KVPACK_CHECK(std::isfinite(b) && b > 0.0,
                   "bandwidths: expected positive bytes per second, got " << b);
    bandwidths_ = params.bandwidths;
  }
  if (!params.decode_bandwidths.empty()) {
    KVPACK_CHECK(
        params.decode_bandwidths.size() == codecs_.size() || params.decode_bandwidths.size() == 1,
        "decode_bandwidths: expected one per codec (" << codecs_.size() << ") or one for all, got "
                                                      << params.decode_bandwidths.size());
    for (const double b : params.decode_bandwidths)
      KVPACK_CHECK(b > 0.0, "decode_bandwidths: expected positive bytes per second, got " << b);
  }
  // Entries a previous process left on disk.
  for (std::size_t t = 1; t < tiers_.size(); ++t) {
    if (tiers_[t]->name() != "ssd") continue;
    for (const StoredBlob& stored : tiers_[t]->list()) {
      Entry entry;
      const double quality =
          stored.codec.lossless() ? 1.0 : std::numeric_limits<double>::quiet_NaN();
      entry.candidates.push_back(Candidate{stored.codec, stored.bytes, quality, 0.0});
      entry.tier = static_cast<int>(t);
      entry.version = stored.version;
      current(stored.key, stored.version);
      entries_[stored.key] = std::move(entry);
      order_.push_back(stored.key);
    }
  }
  std::sort(order_.begin(), order_.end());
}

TieredStore::~TieredStore() = default;

void TieredStore::profile_bandwidths() {
  // One 8 MiB blob (or what fits) written to and read back from every tier.
  for (const auto& tier : tiers_) {
    const std::int64_t room = tier->capacity() - tier->used();
    const std::int64_t bytes = std::min<std::int64_t>(8ll << 20, room / 2);
    double bandwidth = tier->name() == "dram" ? 8e9 : tier->name() == "ssd" ? 1e9 : 5e8;
    if (bytes >= (256 << 10)) {
      const std::int64_t dim = 128, tokens = bytes / (2 * dim * 4);
      std::vector<float> data(static_cast<std::size_t>(tokens * dim), 0.5f);
      const KVView view{data.data(), DType::Float32, 1, tokens, dim, 0};
      const std::string key = std::string("\x01kvpack-profile", 15);
      const BlobPtr blob = encode(key, {LayerView{view, view}}, Codec{});
      bool stored = false;
      try {
        stored = tier->put(key, blob);
      } catch (const std::system_error&) {  // counted by the tier; the default bandwidth
      }
      if (stored) {
        // A get as the store does it: the read, plus the copy out of a DRAM-held blob.
        double best = std::numeric_limits<double>::infinity();
        for (int repeat = 0; repeat < 3; ++repeat) {
          const auto start = Clock::now();
          const BlobPtr read = tier->get(key);
          if (read) {
            decode(read, tier->name() == "dram");
            best = std::min(best, seconds_since(start));
          }
        }
        tier->remove(key);
        if (std::isfinite(best) && best > 0.0)
          bandwidth = static_cast<double>(stored_bytes(blob->size())) / best;
      }
    }
    bandwidths_.push_back(bandwidth);
  }
}

double TieredStore::utility(const Entry& entry, int candidate, int tier) const {
  const Candidate& c = entry.candidates[candidate];
  const double quality = std::isnan(c.quality) ? 0.0 : c.quality;
  const double delay = static_cast<double>(c.bytes) / bandwidths_[tier] + c.decode_seconds;
  return (1.0 + entry.hits) * (params_.alpha * quality - delay);
}

void TieredStore::put(const std::string& key, const std::vector<LayerView>& layers,
                      const std::vector<Evidence>& probes, const std::vector<double>& qualities) {
  KVPACK_CHECK(!layers.empty(), "kv: expected at least one layer, got 0");
  KVPACK_CHECK(
      probes.empty() || probes.size() == layers.size(),
      "probe_queries: expected one per layer (" << layers.size() << "), got " << probes.size());
  KVPACK_CHECK(
      qualities.empty() || qualities.size() == codecs_.size(),
      "quality: expected one per codec (" << codecs_.size() << "), got " << qualities.size());
  // Probe queries, kept with the entry for later re-encoding.
  Entry entry;
  entry.probe_data.resize(layers.size());
  entry.probes.resize(layers.size());
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const KVView& keys = layers[l].keys;
    Evidence& probe = entry.probes[l];
    if (probes.empty()) {
      const std::int64_t n = std::min(kProxyQueries, keys.tokens);
      entry.probe_data[l] = proxy_queries(keys, n);
      probe.heads_q = keys.heads;
      probe.window = n;
    } else {
      probe = probes[l];
      entry.probe_data[l].assign(probe.queries,
                                 probe.queries + probe.heads_q * probe.window * keys.dim);
    }
    probe.queries = entry.probe_data[l].data();
    probe.scores = nullptr;
  }

  // The probes' attention over the original cache: the reference every candidate's
  // quality is measured against, computed once.
  std::vector<std::vector<float>> reference(layers.size());
  if (qualities.empty())
    for (std::size_t l = 0; l < layers.size(); ++l)
      reference[l] = probe_outputs(entry.probes[l].queries, entry.probes[l].heads_q,
                                   entry.probes[l].window, layers[l].keys, layers[l].values);

  std::uint64_t version;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    version = next_version();
  }
  // Every candidate encoded, decoded (timed) and scored; one that cannot encode this
  // context (too few tokens to drop) is left out.
  std::unordered_map<int, BlobPtr> fresh;
  for (std::size_t c = 0; c < codecs_.size(); ++c) {
    BlobPtr blob;
    try {
      blob = encode(key, layers, codecs_[c], entry.probes, params_.secret, version);
    } catch (const std::invalid_argument&) {
      if (codecs_[c].lossless()) throw;
      continue;
    }
    // Decode time as a get from SSD pays it (no copy for 'none'); the copy out of DRAM is
    // in the DRAM tier's profiled bandwidth.
    const auto start = Clock::now();
    const DecodedKV decoded = decode(blob, false);
    Candidate candidate{codecs_[c], stored_bytes(blob->size()), 1.0, seconds_since(start)};
    if (!params_.decode_bandwidths.empty())
      candidate.decode_seconds =
          static_cast<double>(candidate.bytes) /
          params_.decode_bandwidths[params_.decode_bandwidths.size() == 1 ? 0 : c];
    if (!qualities.empty()) {
      candidate.quality = qualities[c];
    } else if (!codecs_[c].lossless()) {
      double error = 0.0;
      for (std::size_t l = 0; l < layers.size(); ++l) {
        const LayerView out = layer_view(decoded, l);
        const Evidence& probe = entry.probes[l];
        error += attention_error(probe.queries, probe.heads_q, probe.window, reference[l], out.keys,
                                 out.values);
      }
      candidate.quality = std::max(0.0, 1.0 - error / static_cast<double>(layers.size()));
    }
    fresh[static_cast<int>(entry.candidates.size())] = blob;
    entry.candidates.push_back(candidate);
  }

  std::lock_guard<std::mutex> lock(mutex_);
  RemoteOperation operation;  // every remote call of this put within one timeout
  ++counters_.puts;
  const auto seen = seen_.find(key);
  if (seen != seen_.end() &&
      (seen->second.newest > version || (seen->second.deleted && seen->second.newest >= version)))
    return;  // overtaken by a newer version (or a delete) while it was encoded
  const std::optional<Seen> seen_before =
      seen == seen_.end() ? std::nullopt : std::optional<Seen>(seen->second);
  seen_[key] = Seen{version, false};
  // The version this put replaces stays in its tier until the new one is in place: a
  // crash (or a failed write) meanwhile leaves the old version, never neither.
  std::optional<Entry> replaced;
  if (const auto it = entries_.find(key); it != entries_.end()) {
    replaced = std::move(it->second);
    entries_.erase(it);
    order_.erase(std::find(order_.begin(), order_.end(), key));
  }
  entry.held = -1;  // not stored yet
  entry.tier = -1;
  entry.last_use = ++clock_;
  entry.version = version;
  entries_[key] = std::move(entry);
  order_.push_back(key);
  const Replaced old{
      replaced ? replaced->tier : -1,
      replaced && replaced->held >= 0 ? replaced->candidates[replaced->held].bytes : 0};
  const std::optional<std::system_error> error = params_.policy == StorePolicy::Adaptive
                                                     ? place_adaptive(key, fresh, old)
                                                     : place_lru(key, fresh.begin()->second, old);
  const auto it = entries_.find(key);
  const int tier = it == entries_.end() ? -1 : it->second.tier;
  if (tier < 0 && error) {
    // The new version could not be written: the old one, untouched, stays the entry. (A
    // remote tier that just failed is not asked again: the put is over its time.)
    const bool remote_old = params_.remote && old.tier + 1 == static_cast<int>(tiers_.size());
    if (seen_before)
      seen_[key] = *seen_before;
    else
      seen_.erase(key);
    if (old.tier >= 0 && (remote_old || tiers_[old.tier]->contains(key))) {
      entries_[key] = std::move(*replaced);
      order_.push_back(key);
    }
    // what() ends with the code's own message, which the new error appends again.
    std::string cause = error->what();
    const std::string suffix = ": " + error->code().message();
    if (cause.size() >= suffix.size() &&
        cause.compare(cause.size() - suffix.size(), suffix.size(), suffix) == 0)
      cause.resize(cause.size() - suffix.size());
    throw std::system_error(error->code(), "put: '" + key + "' not stored: " + cause);
  }
  if (old.tier >= 0 && old.tier != tier) tiers_[old.tier]->remove(key);
}

bool TieredStore::authentic(const std::string& key, const Buffer& blob) const {
  try {
    if (read_blob_info(blob.data(), blob.size()).key != key) return false;
  } catch (const std::runtime_error&) {
    return false;
  }
  return params_.secret.empty() || blob_signed_by(blob, params_.secret);
}

std::uint64_t TieredStore::next_version() {
  const auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  versions_ = std::max(versions_ + 1, static_cast<std::uint64_t>(std::max<std::int64_t>(now, 0)));
  return versions_;
}

bool TieredStore::current(const std::string& key, std::uint64_t version) {
  const auto it = seen_.find(key);
  if (it != seen_.end() &&
      (version < it->second.newest || (it->second.deleted && version == it->second.newest))) {
    ++counters_.stale;
    return false;
  }
  if (it == seen_.end() || version > it->second.newest) seen_[key] = Seen{version, false};
  versions_ = std::max(versions_, version);  // the next put is newer than what was seen
  return true;
}

void TieredStore::disown(const std::string& key, int tier) {
  const auto it = entries_.find(key);
  if (it != entries_.end() && it->second.tier == tier) {
    entries_.erase(it);
    order_.erase(std::find(order_.begin(), order_.end(), key));
  }
  tiers_[tier]->forget(key);
}

bool TieredStore::put_blob(int tier, const std::string& key, const BlobPtr& blob,
                           std::optional<std::system_error>* failure) {
  try {
    return tiers_[tier]->put(key, blob);
  } catch (const std::system_error& error) {  // counted by the tier
    if (failure) failure->emplace(error);
    return false;
  }
}

void TieredStore::drop(const std::string& key) {
  const auto it = entries_.find(key);
  if (it == entries_.end()) return;
  if (it->second.tier >= 0) tiers_[it->second.tier]->remove(key);
  entries_.erase(it);
  order_.erase(std::find(order_.begin(), order_.end(), key));
}

std::optional<std::system_error> TieredStore::place_adaptive(
    const std::string& key, std::unordered_map<int, BlobPtr>& fresh, const Replaced& old) {
  std::vector<PlacementItem> items;
  std::vector<std::vector<std::pair<int, int>>> meaning;  // option -> (candidate, tier)
  for (const std::string& name : order_) {
    const Entry& entry = entries_.at(name);
    PlacementItem item;
    std::vector<std::pair<int, int>> options;
    // A lossy encoding cannot be re-encoded: such entries only change tier.
    const bool reencodable = entry.held < 0 || entry.candidates[entry.held].codec == Codec{};
    for (int c = 0; c < static_cast<int>(entry.candidates.size()); ++c) {
      if (!reencodable && c != entry.held) continue;
      for (int t = 0; t < static_cast<int>(tiers_.size()); ++t) {
        item.options.push_back({t, entry.candidates[c].bytes, utility(entry, c, t)});
        options.emplace_back(c, t);
      }
    }
    item.priority = entry.hits + 1e-12 * static_cast<double>(entry.last_use);
    items.push_back(std::move(item));
    meaning.push_back(std::move(options));
  }
  std::vector<std::int64_t> capacities;
  for (const auto& tier : tiers_) capacities.push_back(tier->capacity());
  const std::vector<int> choice = place(items, capacities);

  // Take every moving blob out of its tier first, so the new layout fits while it is built.
  struct Move {
    std::string key;
    BlobPtr blob;  // held blob (or the fresh one)
    int candidate = -1, tier = -1;
  };
  std::vector<Move> moves;
  std::vector<std::string> foreign;  // another store's entries the plan would move
  for (std::size_t i = 0; i < order_.size(); ++i) {
    const std::string& name = order_[i];
    Entry& entry = entries_.at(name);
    const int candidate = choice[i] < 0 ? -1 : meaning[i][choice[i]].first;
    const int tier = choice[i] < 0 ? -1 : meaning[i][choice[i]].second;
    if (name != key && candidate == entry.held && tier == entry.tier) continue;
    if (name != key && entry.foreign) {
      foreign.push_back(name);
      continue;
    }
    Move move{name, nullptr, candidate, tier};
    if (name == key) {
      if (candidate >= 0) move.blob = fresh.at(candidate);
    } else {
      move.blob = tiers_[entry.tier]->get(name);
      if (move.blob && (!authentic(name, *move.blob) ? (++counters_.unauthenticated, true)
                                                     : !current(name, blob_version(*move.blob)))) {
        // Replaced behind the store's back: someone else's, left where it is.
        tiers_[entry.tier]->forget(name);
        move.blob = nullptr;
      } else {
        tiers_[entry.tier]->remove(name);
      }
    }
    moves.push_back(std::move(move));
  }
  // Not this store's to move: no longer its entries, their blobs left where they are.
  for (const std::string& name : foreign) disown(name, entries_.at(name).tier);
  // The new entry first: once it is in place the version it replaces can leave its tier,
  // making the room the plan counted on for the others.
  std::stable_partition(moves.begin(), moves.end(),
                        [&key](const Move& move) { return move.key == key; });
  std::optional<std::system_error> failure;
  for (Move& move : moves) {
    Entry& entry = entries_.at(move.key);
    if (move.candidate >= 0 && move.blob && entry.held >= 0 && move.candidate != entry.held) {
      // Recompress from the lossless copy with the codec the plan chose.
      try {
        const DecodedKV original = decode(move.blob, false);
        std::vector<LayerView> layers;
        for (std::size_t l = 0; l < original.layers.size(); ++l)
          layers.push_back(layer_view(original, l));
        move.blob = encode(move.key, layers, entry.candidates[move.candidate].codec, entry.probes,
                           params_.secret, entry.version);
        ++counters_.recompressions;
      } catch (const std::runtime_error&) {  // checksummed but malformed: dropped, counted
        ++counters_.corrupt;
        move.blob = nullptr;
      }
    }
    const bool placed =
        move.candidate >= 0 && move.blob &&
        put_blob(move.tier, move.key, move.blob, move.key == key ? &failure : nullptr);
    if (move.key == key && placed && old.tier >= 0 && old.tier != move.tier)
      tiers_[old.tier]->remove(key);
    if (!placed) {
      // Out of every tier (or unreadable): counted.
      ++counters_.evictions;
      if (move.key == key && move.candidate >= 0 && !failure) ++counters_.errors;
      entries_.erase(move.key);
      order_.erase(std::find(order_.begin(), order_.end(), move.key));
      continue;
    }
    if (entry.held >= 0 && entry.tier != move.tier) ++counters_.moves;
    entry.held = move.candidate;
    entry.tier = move.tier;
  }
  return failure;
}

void TieredStore::make_room(int tier, std::int64_t bytes, const std::string& keep) {
  Tier& target = *tiers_[tier];
  while (target.capacity() - target.used() < bytes) {
    // The least recently used entry of this tier goes one tier down (or out).
    const std::string* victim = nullptr;
    std::uint64_t oldest = std::numeric_limits<std::uint64_t>::max();
    for (const auto& [name, entry] : entries_)
      if (entry.tier == tier && name != keep && entry.last_use < oldest) {
        oldest = entry.last_use;
        victim = &name;
      }
    if (!victim) return;
    const std::string name = *victim;
    Entry& entry = entries_.at(name);
    if (entry.foreign) {  // another store's: no longer this one's entry, left where it is
      disown(name, tier);
      continue;
    }
    BlobPtr blob = target.get(name);
    if (blob && (!authentic(name, *blob) ? (++counters_.unauthenticated, true)
                                         : !current(name, blob_version(*blob)))) {
      disown(name, tier);  // someone else's: left in place, not moved
      continue;
    }
    target.remove(name);
    const int below = tier + 1;
    bool placed = false;
    if (blob && below < static_cast<int>(tiers_.size()) &&
        stored_bytes(blob->size()) <= tiers_[below]->capacity()) {
      make_room(below, stored_bytes(blob->size()), keep);
      placed = put_blob(below, name, blob);
    }
    if (placed) {
      entry.tier = below;
      ++counters_.moves;
    } else {
      ++counters_.evictions;
      entries_.erase(name);
      order_.erase(std::find(order_.begin(), order_.end(), name));
    }
  }
}

std::optional<std::system_error> TieredStore::place_lru(const std::string& key, const BlobPtr& blob,
                                                        const Replaced& old) {
  Entry& entry = entries_.at(key);
  entry.held = 0;
  const std::int64_t bytes = stored_bytes(blob->size());
  std::optional<std::system_error> failure;
  for (int t = 0; t < static_cast<int>(tiers_.size()); ++t) {
    if (bytes > tiers_[t]->capacity()) continue;
    // The version replaced in this tier frees its room as the new one takes its place.
    make_room(t, bytes - (t == old.tier ? old.bytes : 0), key);
    if (put_blob(t, key, blob, &failure)) {
      entry.tier = t;
      if (old.tier >= 0 && old.tier != t) tiers_[old.tier]->remove(key);
      return std::nullopt;
    }
    if (failure) break;  // the tier failed: reported, not silently stored elsewhere
  }
  entries_.erase(key);  // larger than every tier
  order_.erase(std::find(order_.begin(), order_.end(), key));
  ++counters_.evictions;
  return failure;
}

std::optional<GetResult> TieredStore::get(const std::string& key) {
  RemoteOperation operation;  // every remote call of this get within one timeout
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.gets;
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    int tier;
    double quality;
    std::uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = entries_.find(key);
      if (it == entries_.end()) break;
      Entry& entry = it->second;
      entry.hits += 1.0;
      entry.last_use = ++clock_;
      tier = entry.tier;
      quality = entry.candidates[entry.held].quality;
      version = entry.version;
    }
    const auto start = Clock::now();
    const std::int64_t errors = tiers_[tier]->counters().errors;
    BlobPtr blob = tiers_[tier]->get(key);
    const double io = seconds_since(start);
    const bool signed_here = blob && authentic(key, *blob);
    std::unique_lock<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    const bool remote = params_.remote && tier + 1 == static_cast<int>(tiers_.size());
    if (!blob && remote && tiers_[tier]->counters().errors > errors) {
      // The server failed (down, or not answering): a miss now, the entry kept, and no
      // second wait on it to ask whether it still holds the entry.
      ++counters_.misses;
      return std::nullopt;
    }
    if (!blob) {
      if (it != entries_.end() && it->second.tier == tier && !tiers_[tier]->contains(key)) {
        // The tier dropped it (corrupt, or its file gone): the entry is gone.
        entries_.erase(it);
        order_.erase(std::find(order_.begin(), order_.end(), key));
        ++counters_.misses;
        return std::nullopt;
      }
      continue;  // moved meanwhile (look again), or a failed read (try again)
    }
    // Checked before the blob is promoted (which would delete it from its tier): a blob
    // this store cannot verify, or older than a version it has seen, is someone else's.
    // (The version on record when the read began is served even if a put of this store
    // replaced it since: the read began while it was current.)
    const std::uint64_t blob_v = signed_here ? blob_version(*blob) : 0;
    if (!signed_here || blob_v != version) {
      if (it == entries_.end() || it->second.tier != tier || it->second.version != version)
        continue;  // replaced or moved by this store meanwhile: look again
      if (!signed_here || !current(key, blob_v)) {
        if (!signed_here) ++counters_.unauthenticated;
        ++counters_.misses;
        disown(key, tier);
        return std::nullopt;
      }
      // Another store's version replaced this one's in a shared tier: the entry is that
      // version now (its codec and size; its quality unknown).
      const BlobInfo info = read_blob_info(blob->data(), blob->size());
      const double known = info.codec.lossless() ? 1.0 : std::numeric_limits<double>::quiet_NaN();
      it->second.candidates = {Candidate{info.codec, stored_bytes(blob->size()), known, 0.0}};
      it->second.held = 0;
      it->second.version = version = blob_v;
      it->second.foreign = true;
      quality = known;
    }
    bool shared = tier == 0;  // a blob a tier still holds is copied before it is handed out
    const std::int64_t bytes = stored_bytes(blob->size());
    // (Only the version still stored: a put during the read may have replaced it, and its
    // entry moved back to this tier; promoting the blob read would bring the old one back.)
    if (params_.policy != StorePolicy::Adaptive && tier > 0 && it != entries_.end() &&
        !it->second.foreign && it->second.version == version && it->second.tier == tier &&
        bytes <= tiers_[0]->capacity()) {
      // LRU: a hit moves the entry to DRAM; the entries it displaces go one tier down. An
      // entry larger than DRAM stays where it is (moving it out and back costs a write).
      tiers_[tier]->remove(key);
      it->second.tier = -1;
      make_room(0, bytes, key);
      if (put_blob(0, key, blob)) {
        it->second.tier = 0;
        ++counters_.moves;
        shared = true;
      } else {
        make_room(tier, bytes, key);
        if (put_blob(tier, key, blob)) {
          it->second.tier = tier;
        } else {
          ++counters_.evictions;
          entries_.erase(it);
          order_.erase(std::find(order_.begin(), order_.end(), key));
        }
      }
    }
    lock.unlock();
    return served(key, blob, tier, io, quality, shared);
  }
  // Not held here (or unreadable): another store may have put it in a tier they share,
  // the SSD directory (then an entry of this store, served in place) or the remote server.
  for (int tier = 1; tier < static_cast<int>(tiers_.size()); ++tier) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entries_.count(key)) break;  // put here meanwhile
    }
    const auto start = Clock::now();
    BlobPtr blob = tiers_[tier]->get(key);
    const double io = seconds_since(start);
    if (!blob) continue;
    const bool signed_here = authentic(key, *blob);
    std::unique_lock<std::mutex> lock(mutex_);
    if (!signed_here || !current(key, blob_version(*blob))) {
      if (!signed_here) ++counters_.unauthenticated;
      tiers_[tier]->forget(key);
      continue;
    }
    double quality = std::numeric_limits<double>::quiet_NaN();
    const bool remote = params_.remote && tier + 1 == static_cast<int>(tiers_.size());
    if (!remote && !entries_.count(key)) {
      const BlobInfo info = read_blob_info(blob->data(), blob->size());
      if (info.codec.lossless()) quality = 1.0;
      Entry entry;
      entry.candidates.push_back(Candidate{info.codec, stored_bytes(blob->size()), quality, 0.0});
      entry.tier = tier;
      entry.hits = 1.0;
      entry.last_use = ++clock_;
      entry.version = info.version;
      entry.foreign = true;
      entries_[key] = std::move(entry);
      order_.push_back(key);
    }
    lock.unlock();
    return served(key, blob, tier, io, quality, false);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++counters_.misses;
  return std::nullopt;
}

std::optional<GetResult> TieredStore::served(const std::string& key, const BlobPtr& blob, int tier,
                                             double io_seconds, double quality, bool shared) {
  GetResult result;
  result.tier = tiers_[tier]->name();
  result.bytes = stored_bytes(blob->size());
  result.io_seconds = io_seconds;
  result.quality = quality;
  const auto start = Clock::now();
  try {
    result.kv = decode(blob, shared);
  } catch (const std::runtime_error&) {
    // Checksummed (and signed, with a secret) but malformed: never served; counted and
    // forgotten, the blob left to whoever wrote it.
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.corrupt;
    ++counters_.misses;
    if (const auto it = entries_.find(key); it != entries_.end() && it->second.tier != tier)
      drop(key);
    disown(key, tier);
    return std::nullopt;
  }
  result.decode_seconds = seconds_since(start);
  std::lock_guard<std::mutex> lock(mutex_);
  ++counters_.tiers[tier].hits;
  delays_.push_back(result.io_seconds + result.decode_seconds);
  if (!std::isnan(quality)) qualities_.push_back(quality);
  return result;
}

bool TieredStore::contains(const std::string& key) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.count(key)) return true;
  }
  return params_.remote && tiers_.back()->contains(key);
}

bool TieredStore::remove(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  RemoteOperation operation;
  const bool held = entries_.count(key) > 0;
  // Every version written before the delete is gone for this store, wherever one turns up.
  seen_[key] = Seen{next_version(), true};
  drop(key);
  if (params_.remote && !held && tiers_.back()->contains(key)) {
    tiers_.back()->remove(key);
    return true;
  }
  return held;
}

void TieredStore::prefetch(const std::string& key) {
  int tier;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it == entries_.end()) return;
    tier = it->second.tier;
  }
  tiers_[tier]->prefetch(key);
}

StoreStats TieredStore::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  StoreStats out = counters_;
  out.tiers.resize(tiers_.size());
  for (std::size_t t = 0; t < tiers_.size(); ++t) {
    TierStats& tier = out.tiers[t];
    tier.name = tiers_[t]->name();
    tier.used = tiers_[t]->used();
    tier.capacity = tiers_[t]->capacity();
    tier.bandwidth = bandwidths_[t];
    const TierCounters problems = tiers_[t]->counters();
    out.corrupt += problems.corrupt;
    out.errors += problems.errors;
    tier.prefetched = problems.prefetched;
  }
  for (const auto& [name, entry] : entries_)
    if (entry.tier >= 0) ++out.tiers[entry.tier].entries;
  if (!delays_.empty()) {
    std::vector<double> sorted(delays_);
    std::sort(sorted.begin(), sorted.end());
    double sum = 0.0;
    for (const double d : sorted) sum += d;
    out.mean_delay = sum / static_cast<double>(sorted.size());
    const auto rank =
        static_cast<std::size_t>(std::ceil(0.95 * static_cast<double>(sorted.size())));
    out.p95_delay = sorted[std::max<std::size_t>(rank, 1) - 1];
  }
  if (!qualities_.empty()) {
    double sum = 0.0;
    for (const double q : qualities_) sum += q;
    out.mean_quality = sum / static_cast<double>(qualities_.size());
  }
  return out;
}

std::optional<std::pair<std::string, Codec>> TieredStore::where(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = entries_.find(key);
  if (it == entries_.end() || it->second.tier < 0) return std::nullopt;
  return std::make_pair(tiers_[it->second.tier]->name(),
                        it->second.candidates[it->second.held].codec);
}

}  // namespace kvpack
