// The remote tier on hiredis (Debian's libhiredis): one Redis server, or a Redis Cluster
// routed here (hiredis 0.14 has no cluster client). One connection per server node, every
// call bounded by one timeout in all (connecting, redirections and replies together), and
// a back-off per node after repeated failures, so a node that is gone or hung turns into
// fast misses (and puts that throw) instead of a blocked caller.
//
// Cluster routing follows the Redis Cluster specification: a key's hash slot is CRC16 of
// its hash tag mod 16384, the slot map is read with CLUSTER SLOTS from any node that
// answers, a MOVED reply updates the slot and marks the map for a refresh, an ASK reply
// sends ASKING and the command once to the importing node.
#include <hiredis/hiredis.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "kvpack/tier.h"

namespace kvpack {

namespace {

using Clock = std::chrono::steady_clock;

struct ReplyDeleter {
  void operator()(redisReply* reply) const { freeReplyObject(reply); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

struct ContextDeleter {
  void operator()(redisContext* context) const { redisFree(context); }
};

// The calls of one RemoteOperation on this thread: when the first began, and whether one
// has failed.
struct Operation {
  int depth = 0;
  bool started = false, failed = false;
  Clock::time_point start{};
};
thread_local Operation operation;

timeval as_timeval(Clock::duration left) {
  const auto us = std::max<std::int64_t>(
      1000, std::chrono::duration_cast<std::chrono::microseconds>(left).count());
  return timeval{static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
}

// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the hash of Redis Cluster.
constexpr std::array<std::uint16_t, 256> crc16_table() {
  std::array<std::uint16_t, 256> table{};
  for (int byte = 0; byte < 256; ++byte) {
    std::uint16_t crc = static_cast<std::uint16_t>(byte << 8);
    for (int bit = 0; bit < 8; ++bit)
      crc = static_cast<std::uint16_t>(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
    table[byte] = crc;
  }
  return table;
}
constexpr std::array<std::uint16_t, 256> kCrc16 = crc16_table();

bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

// "MOVED 3999 127.0.0.1:6381" / "ASK ...": the slot and the node's address; false when
// the error is not a redirection.
bool parse_redirect(std::string_view error, int& slot, std::string& host, int& port) {
  const std::size_t space = error.find(' '), second = error.find(' ', space + 1);
  if (space == std::string_view::npos || second == std::string_view::npos) return false;
  const std::string_view address = error.substr(second + 1);
  const std::size_t colon = address.rfind(':');
  if (colon == std::string_view::npos) return false;
  try {
    slot = std::stoi(std::string(error.substr(space + 1, second - space - 1)));
    port = std::stoi(std::string(address.substr(colon + 1)));
  } catch (const std::exception&) {
    return false;
  }
  host = std::string(address.substr(0, colon));
  return slot >= 0 && slot < kClusterSlots && port > 0 && port < 65536;
}

// One server node: its connection, used by one call at a time.
struct Node {
  Node(std::string node_host, int node_port) : host(std::move(node_host)), port(node_port) {}
  std::string address() const { return host + ":" + std::to_string(port); }
  const std::string host;
  const int port;
  std::timed_mutex call_mutex;  // one call on the connection at a time; guards `context`
  std::unique_ptr<redisContext, ContextDeleter> context;
  // Guarded by the tier's mutex_:
  int failures = 0;  // calls failed in a row
  Clock::time_point back_off_until{};
};

class RedisTier final : public Tier {
 public:
  explicit RedisTier(const RedisParams& params)
      : params_(params),
        timeout_(std::chrono::milliseconds(params.timeout_ms)),
        cluster_(!params.cluster.empty()) {
    if (cluster_) {
      for (const auto& [host, port] : params.cluster) node_at(host, port);
      slots_.assign(kClusterSlots, -1);
    } else {
      node_at(params.host, params.port);
    }
  }

  std::string name() const override { return "remote"; }
  std::int64_t used() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_;
  }
  std::int64_t capacity() const override { return params_.capacity; }

  bool put(const std::string& key, const BlobPtr& blob) override {
    Call call(*this);
    if (!call) call.raise();
    const std::int64_t bytes = stored_bytes(blob->size());
    {
      // Reserve the room first so concurrent puts (to other nodes) cannot overshoot it.
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = sizes_.find(key);
      const std::int64_t old = it == sizes_.end() ? 0 : it->second.bytes;
      if (used_ + reserved_ - old + bytes > params_.capacity) return false;
      reserved_ += bytes;
    }
    const std::string_view data(reinterpret_cast<const char*>(blob->data()), blob->size());
    const Reply reply = call.on_key(params_.prefix + key, {"SET", params_.prefix + key, data});
    const bool stored = reply && reply->type == REDIS_REPLY_STATUS;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      reserved_ -= bytes;
      if (stored) {
        const BlobInfo info = read_blob_info(blob->data(), blob->size());
        const auto it = sizes_.find(key);
        used_ += bytes - (it == sizes_.end() ? 0 : it->second.bytes);
        sizes_[key] = StoredBlob{key, bytes, info.codec, info.version};
      }
    }
    if (!reply) call.raise();
    if (!stored)  // the server refused it (out of memory, the cluster down, ...)
      throw std::system_error(EIO, std::generic_category(),
                              "remote: " + call.address() + " refused the write: " +
                                  std::string(reply->str ? reply->str : "", reply->len));
    return true;
  }

  BlobPtr get(const std::string& key) override {
    Call call(*this);
    if (!call) return nullptr;
    const Reply reply = call.on_key(params_.prefix + key, {"GET", params_.prefix + key});
    if (!reply || reply->type != REDIS_REPLY_STRING) {
      if (reply && reply->type == REDIS_REPLY_NIL) forget(key);  // gone (a restart, DEL)
      return nullptr;
    }
    auto blob = std::make_shared<Buffer>(reply->len);
    std::memcpy(blob->data(), reply->str, reply->len);
    bool valid = false;
    try {
      valid = verify_blob(*blob) && read_blob_info(blob->data(), blob->size()).key == key;
    } catch (const std::runtime_error&) {
    }
    if (!valid) {
      // Left in place: another process may have replaced it since, and a blob this store
      // cannot read is not its to delete.
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++counters_.corrupt;
      }
      forget(key);
      return nullptr;
    }
    return blob;
  }

  bool contains(const std::string& key) override {
    Call call(*this);
    if (!call) return false;
    const Reply reply = call.on_key(params_.prefix + key, {"EXISTS", params_.prefix + key});
    const bool found = reply && reply->type == REDIS_REPLY_INTEGER && reply->integer > 0;
    if (reply && reply->type == REDIS_REPLY_INTEGER && !found) forget(key);
    return found;
  }

  void remove(const std::string& key) override {
    Call call(*this);
    if (call) call.on_key(params_.prefix + key, {"DEL", params_.prefix + key});
    forget(key);  // never counted again, reached or not
  }

  void forget(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = sizes_.find(key);
    if (it == sizes_.end()) return;
    used_ -= it->second.bytes;
    sizes_.erase(it);
  }

  std::vector<StoredBlob> list() override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<StoredBlob> out;
    for (const auto& [key, stored] : sizes_) out.push_back(stored);
    return out;
  }

  TierCounters counters() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return counters_;
  }

 private:
  // One call to the tier: a deadline of one timeout from its start (or its operation's)
  // for connecting, redirections and every command together, and the connection of the
  // node it talks to now. False (an error counted, nothing sent) when the operation's
  // earlier call failed.
  class Call {
   public:
    explicit Call(RedisTier& tier) : tier_(tier), deadline_(Clock::now() + tier.timeout_) {
      if (operation.depth > 0) {  // one deadline for every call of the operation
        if (!operation.started) operation = Operation{operation.depth, true, false, Clock::now()};
        deadline_ = std::min(deadline_, operation.start + tier.timeout_);
        if (operation.failed) {
          why_ = "an earlier call of this operation failed";
          tier_.count_error();
          usable_ = false;
        }
      }
    }
    ~Call() {
      release();
      if (failed_ && operation.depth > 0) operation.failed = true;
    }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;
    explicit operator bool() const { return usable_; }

    // The reply to a command about `redis_key`, sent to the node serving its slot and
    // following redirections; null (a failure counted) when no node answered in time.
    // An error reply other than a redirection is counted as an error and returned.
    Reply on_key(const std::string& redis_key, const std::vector<std::string_view>& args) {
      if (!usable_) return nullptr;
      const int slot = tier_.cluster_ ? cluster_slot(redis_key) : 0;
      Node* asking = nullptr;
      for (int hop = 0; hop < kMaxRedirections; ++hop) {
        Node* node = asking ? asking : route(slot);
        if (!node) return fail("no node known to serve slot " + std::to_string(slot));
        if (!use(node)) return fail();
        if (asking && !send({"ASKING"})) return fail();
        Reply reply = send(args);
        if (!reply) return fail();
        if (reply->type != REDIS_REPLY_ERROR || !tier_.cluster_) {
          if (reply->type == REDIS_REPLY_ERROR) tier_.count_error();
          return reply;
        }
        const std::string_view error(reply->str, reply->len);
        int moved_slot = 0, port = 0;
        std::string host;
        if ((starts_with(error, "MOVED ") || starts_with(error, "ASK ")) &&
            parse_redirect(error, moved_slot, host, port)) {
          Node* target = tier_.node_at(host, port);
          if (starts_with(error, "MOVED ")) {
            tier_.moved(moved_slot, target);
            asking = nullptr;
          } else {
            asking = target;  // this command only: the slot is migrating
          }
          continue;
        }
        if (starts_with(error, "TRYAGAIN") && Clock::now() + kRetryPause < deadline_) {
          std::this_thread::sleep_for(kRetryPause);  // a multi-key move in progress
          continue;
        }
        if (starts_with(error, "CLUSTERDOWN")) tier_.mark_stale();
        tier_.count_error();
        return reply;
      }
      return fail("too many redirections");
    }

    // Throws what made this call fail, as a put reports it.
    [[noreturn]] void raise() const {
      std::ostringstream message;
      message << "remote: " << address();
      if (why_ != std::generic_category().message(error_))  // what() ends with that already
        message << ": " << (why_.empty() ? "no answer within the timeout" : why_);
      message << " (timeout " << tier_.params_.timeout_ms << " ms)";
      throw std::system_error(error_, std::generic_category(), message.str());
    }

    std::string address() const { return node_ ? node_->address() : tier_.describe(); }

   private:
    static constexpr int kMaxRedirections = 5;
    static constexpr auto kRetryPause = std::chrono::milliseconds(10);

    Reply fail(std::string why = {}) {
      if (!why.empty()) {
        why_ = std::move(why);
        tier_.count_error();
      }
      failed_ = true;
      return nullptr;
    }

    // The node serving `slot`, the slot map read again first when it is due.
    Node* route(int slot) {
      if (!tier_.cluster_) return tier_.node(0);
      if (tier_.refresh_due(slot)) refresh_map();
      return tier_.node_of(slot);
    }

    // Reads the slot map from the first node that answers, nodes that have not failed
    // first. Failures here are counted per node but do not fail the call by themselves.
    void refresh_map() {
      tier_.begin_refresh();
      for (Node* node : tier_.nodes_by_health()) {
        if (Clock::now() >= deadline_) return;
        if (!use(node)) continue;
        const Reply reply = send({"CLUSTER", "SLOTS"});
        if (reply && reply->type == REDIS_REPLY_ARRAY) {
          tier_.apply_slots(*reply, node->host);
          return;
        }
      }
    }

    // Holds `node`'s connection (made within the deadline); false, a failure counted,
    // when the node is backing off, busy past the deadline or does not connect.
    bool use(Node* node) {
      if (node_ == node && node->context) return true;
      release();
      // Waiting for another caller's command counts against this call's timeout too.
      // (Either failure marks the slot map stale: a replica may be taking over.)
      if (!node->call_mutex.try_lock_until(deadline_)) {
        why_ = "busy with other calls past the timeout";
        tier_.count_error();
        tier_.mark_stale();
        return false;
      }
      node_ = node;
      if (tier_.backing_off(*node)) {
        why_ = "left alone after repeated failures (back-off)";
        tier_.count_error();
        tier_.mark_stale();
        return false;
      }
      return connect();
    }

    void release() {
      if (node_) node_->call_mutex.unlock();
      node_ = nullptr;
    }

    // A connection to the held node (the database selected); on a new one the byte counts
    // are checked against what the node still holds.
    bool connect() {
      if (node_->context) return true;
      if (Clock::now() >= deadline_) return node_failed("no time left to connect");
      std::unique_ptr<redisContext, ContextDeleter> context(redisConnectWithTimeout(
          node_->host.c_str(), node_->port, as_timeval(deadline_ - Clock::now())));
      if (!context || context->err) {
        const int code = errno;
        if (code == ECONNREFUSED || code == EHOSTUNREACH || code == ENETUNREACH) error_ = code;
        return node_failed(context ? context->errstr : "cannot allocate a connection");
      }
      node_->context = std::move(context);
      if (tier_.params_.db != 0) {
        const Reply reply = send({"SELECT", std::to_string(tier_.params_.db)});
        if (!reply || reply->type == REDIS_REPLY_ERROR) {
          node_->context.reset();  // never used unselected
          return false;
        }
      }
      return tier_.refresh_sizes(*this, node_);
    }

    // The reply to one command of binary-safe arguments on the held node; null (the
    // connection dropped, a failure counted) when the node did not answer in time.
    Reply send(const std::vector<std::string_view>& args) {
      std::vector<const char*> argv;
      std::vector<std::size_t> lengths;
      for (const std::string_view arg : args) {
        argv.push_back(arg.data());
        lengths.push_back(arg.size());
      }
      for (;;) {
        Reply reply;
        redisContext* context = node_->context.get();
        if (Clock::now() < deadline_ &&
            redisSetTimeout(context, as_timeval(deadline_ - Clock::now())) == REDIS_OK)
          reply.reset(static_cast<redisReply*>(redisCommandArgv(
              context, static_cast<int>(argv.size()), argv.data(), lengths.data())));
        if (reply) {
          tier_.answered(*node_);
          return reply;
        }
        // A connection the node closed (it restarted) is made again once, in this call's
        // time; a node that does not answer is a failure.
        const bool closed = context->err == REDIS_ERR_EOF;
        const bool timed_out = !context->err || (context->err == REDIS_ERR_IO &&
                                                 (errno == EAGAIN || errno == EWOULDBLOCK));
        const std::string why = timed_out ? std::string() : std::string(context->errstr);
        node_->context.reset();
        if (closed && !reconnected_ && Clock::now() < deadline_) {
          reconnected_ = true;
          if (connect()) continue;
          return nullptr;
        }
        node_failed(why);
        return nullptr;
      }
    }

    bool node_failed(std::string why) {
      why_ = std::move(why);
      node_->context.reset();
      tier_.failed(*node_);
      return false;
    }

    RedisTier& tier_;
    Clock::time_point deadline_;
    Node* node_ = nullptr;  // the node whose connection is held
    bool usable_ = true, failed_ = false, reconnected_ = false;
    std::string why_;        // what made the call fail
    int error_ = ETIMEDOUT;  // its errno as a put reports it

    friend class RedisTier;
  };

  std::string describe() const {
    if (!cluster_) return params_.host + ":" + std::to_string(params_.port);
    return "the cluster of " + params_.cluster.front().first + ":" +
           std::to_string(params_.cluster.front().second);
  }

  // The node at `host:port`, added when new (nodes are never removed, so pointers stay).
  Node* node_at(const std::string& host, int port) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& node : nodes_)
      if (node->host == host && node->port == port) return node.get();
    nodes_.push_back(std::make_unique<Node>(host, port));
    return nodes_.back().get();
  }
  Node* node(std::size_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    return nodes_[index].get();
  }
  Node* node_of(int slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    return slots_[slot] < 0 ? nullptr : nodes_[slots_[slot]].get();
  }
  int index_of(const Node* target) const {  // mutex_ held
    for (std::size_t i = 0; i < nodes_.size(); ++i)
      if (nodes_[i].get() == target) return static_cast<int>(i);
    return -1;
  }

  // The map is read again when a slot has no node, or when it was marked stale (a node
  // failed, a MOVED) and the last reading is older than kRefreshInterval.
  bool refresh_due(int slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    return slots_[slot] < 0 || (map_stale_ && Clock::now() - refreshed_ >= kRefreshInterval);
  }
  void begin_refresh() {
    std::lock_guard<std::mutex> lock(mutex_);
    refreshed_ = Clock::now();
  }
  void mark_stale() {
    std::lock_guard<std::mutex> lock(mutex_);
    map_stale_ = true;
  }
  void moved(int slot, const Node* target) {
    std::lock_guard<std::mutex> lock(mutex_);
    slots_[slot] = index_of(target);
    map_stale_ = true;  // a slot moved: others may have too
  }
  // Nodes that have not failed first, then the others (the seeds among them).
  std::vector<Node*> nodes_by_health() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Node*> out;
    for (const auto& node : nodes_) out.push_back(node.get());
    std::stable_partition(out.begin(), out.end(), [](const Node* n) { return n->failures == 0; });
    return out;
  }
  // A CLUSTER SLOTS reply: [[first, last, [host, port, id], replicas...], ...]; a master
  // with an empty host is the node that answered (`asked`).
  void apply_slots(const redisReply& reply, const std::string& asked) {
    std::vector<std::pair<std::pair<int, int>, std::pair<std::string, int>>> ranges;
    for (std::size_t i = 0; i < reply.elements; ++i) {
      const redisReply* range = reply.element[i];
      if (!range || range->type != REDIS_REPLY_ARRAY || range->elements < 3) continue;
      const redisReply* master = range->element[2];
      if (range->element[0]->type != REDIS_REPLY_INTEGER ||
          range->element[1]->type != REDIS_REPLY_INTEGER || master->type != REDIS_REPLY_ARRAY ||
          master->elements < 2 || master->element[1]->type != REDIS_REPLY_INTEGER)
        continue;
      std::string host = master->element[0]->type == REDIS_REPLY_STRING
                             ? std::string(master->element[0]->str, master->element[0]->len)
                             : std::string();
      if (host.empty() || host == "?") host = asked;
      ranges.push_back({{static_cast<int>(range->element[0]->integer),
                         static_cast<int>(range->element[1]->integer)},
                        {host, static_cast<int>(master->element[1]->integer)}});
    }
    std::vector<std::pair<std::pair<int, int>, Node*>> resolved;
    for (const auto& [span, address] : ranges)
      resolved.push_back({span, node_at(address.first, address.second)});
    std::lock_guard<std::mutex> lock(mutex_);
    std::fill(slots_.begin(), slots_.end(), -1);
    for (const auto& [span, target] : resolved)
      for (int slot = std::max(0, span.first); slot <= std::min(kClusterSlots - 1, span.second);
           ++slot)
        slots_[slot] = index_of(target);
    map_stale_ = false;
  }

  void count_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.errors;
  }
  bool backing_off(const Node& node) {
    std::lock_guard<std::mutex> lock(mutex_);
    return Clock::now() < node.back_off_until;
  }
  void answered(Node& node) {
    std::lock_guard<std::mutex> lock(mutex_);
    node.failures = 0;
  }

  // A failed call on `node`: from the third failure in a row the node is left alone for a
  // back-off (1 s, doubling to 30 s) while calls to it fail at once; in a cluster the slot
  // map is read again (a replica may be taking over).
  void failed(Node& node) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.errors;
    map_stale_ = true;
    if (++node.failures >= kFailuresBeforeBackOff) {
      const auto back_off = std::min<std::int64_t>(
          30000, 1000ll << std::min(node.failures - kFailuresBeforeBackOff, 5));
      node.back_off_until = Clock::now() + std::chrono::milliseconds(back_off);
    }
  }

  // After a (re)connection to `node`: the entries this process placed there that it lost
  // (a restart without persistence, a failover that lost the last writes, an eviction of
  // its own) stop counting as used bytes. In a cluster only the keys of its slots are
  // asked; a redirection says nothing and keeps the entry.
  bool refresh_sizes(Call& call, const Node* node) {
    std::vector<std::string> placed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const int index = index_of(node);
      for (const auto& [key, stored] : sizes_)
        if (!cluster_ || slots_[cluster_slot(params_.prefix + key)] == index) placed.push_back(key);
    }
    for (const std::string& key : placed) {
      const Reply reply = call.send({"EXISTS", params_.prefix + key});
      if (!reply) return false;
      if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 0) forget(key);
    }
    return true;
  }

  static constexpr int kFailuresBeforeBackOff = 3;
  static constexpr auto kRefreshInterval = std::chrono::milliseconds(100);
  const RedisParams params_;
  const Clock::duration timeout_;
  const bool cluster_;
  mutable std::mutex mutex_;  // the fields below, held briefly (never across a network call)
  std::vector<std::unique_ptr<Node>> nodes_;  // the seeds first; never shrinks
  std::vector<int> slots_;                    // node index per hash slot (-1: unknown)
  bool map_stale_ = true;
  Clock::time_point refreshed_{};
  std::unordered_map<std::string, StoredBlob> sizes_;  // entries this process placed
  std::int64_t used_ = 0, reserved_ = 0;
  TierCounters counters_;
};

}  // namespace

int cluster_slot(std::string_view key) {
  const std::size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const std::size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1)
      key = key.substr(open + 1, close - open - 1);
  }
  std::uint16_t crc = 0;
  for (const char c : key)
    crc = static_cast<std::uint16_t>((crc << 8) ^
                                     kCrc16[((crc >> 8) ^ static_cast<unsigned char>(c)) & 0xff]);
  return crc & (kClusterSlots - 1);
}

RemoteOperation::RemoteOperation() {
  if (operation.depth++ == 0) operation = Operation{1, false, false, {}};
}

RemoteOperation::~RemoteOperation() {
  --operation.depth;
}

std::unique_ptr<Tier> make_redis_tier(const RedisParams& params) {
  for (const auto& [host, port] : params.cluster)
    KVPACK_CHECK(port > 0 && port < 65536 && !host.empty(),
                 "redis_url: expected cluster nodes as host:port with a port in [1, 65535], got '"
                     << host << ":" << port << "'");
  KVPACK_CHECK(params.cluster.empty() || params.db == 0,
               "redis_url: a Redis Cluster has database 0 only, got " << params.db);
  KVPACK_CHECK(params.port > 0 && params.port < 65536,
               "redis_url: expected a port in [1, 65535], got " << params.port);
  KVPACK_CHECK(params.capacity >= 0, "redis_bytes: expected >= 0, got " << params.capacity);
  KVPACK_CHECK(params.timeout_ms > 0, "timeout: expected > 0 ms, got " << params.timeout_ms);
  return std::make_unique<RedisTier>(params);
}

}  // namespace kvpack
