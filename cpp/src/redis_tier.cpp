// The remote tier on hiredis (Debian's libhiredis): one connection, every call bounded by
// one timeout in all (connect, send and reply together), and a back-off after repeated
// failures, so a server that is gone or hung turns into fast misses (and puts that throw)
// instead of a blocked caller.
#include <hiredis/hiredis.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string_view>
#include <system_error>
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

class RedisTier final : public Tier {
 public:
  explicit RedisTier(const RedisParams& params)
      : params_(params), timeout_(std::chrono::milliseconds(params.timeout_ms)) {}

  std::string name() const override { return "remote"; }
  std::int64_t used() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_;
  }
  std::int64_t capacity() const override { return params_.capacity; }

  bool put(const std::string& key, const BlobPtr& blob) override {
    Call call(*this);  // puts run one at a time: the room checked here is still there after
    if (!call) call.raise();
    const std::int64_t bytes = stored_bytes(blob->size());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = sizes_.find(key);
      const std::int64_t old = it == sizes_.end() ? 0 : it->second.bytes;
      if (used_ - old + bytes > params_.capacity) return false;
    }
    const std::string_view data(reinterpret_cast<const char*>(blob->data()), blob->size());
    const Reply reply = call.command({"SET", params_.prefix + key, data});
    if (!reply) call.raise();
    if (reply->type != REDIS_REPLY_STATUS)  // the server refused it (out of memory, ...)
      throw std::system_error(EIO, std::generic_category(),
                              "remote: " + address() + " refused the write: " +
                                  std::string(reply->str ? reply->str : "", reply->len));
    const BlobInfo info = read_blob_info(blob->data(), blob->size());
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = sizes_.find(key);
    used_ += bytes - (it == sizes_.end() ? 0 : it->second.bytes);
    sizes_[key] = StoredBlob{key, bytes, info.codec, info.version};
    return true;
  }

  BlobPtr get(const std::string& key) override {
    Call call(*this);
    if (!call) return nullptr;
    const Reply reply = call.command({"GET", params_.prefix + key});
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
    const Reply reply = call.command({"EXISTS", params_.prefix + key});
    const bool found = reply && reply->type == REDIS_REPLY_INTEGER && reply->integer > 0;
    if (reply && !found) forget(key);
    return found;
  }

  void remove(const std::string& key) override {
    Call call(*this);
    if (call) call.command({"DEL", params_.prefix + key});
    forget(key);  // never counted again, reached or not
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
  // One call to the server: holds the connection and a deadline of one timeout from its
  // start, for connecting and every command together. False (an error counted, nothing
  // sent) while a back-off after repeated failures lasts or when the deadline passes.
  class Call {
   public:
    explicit Call(RedisTier& tier) : tier_(tier), deadline_(Clock::now() + tier.timeout_) {
      if (operation.depth > 0) {  // one deadline for every call of the operation
        if (!operation.started) operation = Operation{operation.depth, true, false, Clock::now()};
        deadline_ = std::min(deadline_, operation.start + tier.timeout_);
        if (operation.failed) {
          why_ = "an earlier call of this operation failed";
          tier_.count_error();
          return;
        }
      }
      // Waiting for another caller's command counts against this call's timeout too.
      locked_ = tier_.call_mutex_.try_lock_until(deadline_);
      if (locked_ && Clock::now() >= tier_.back_off_until_) {
        ready_ = connect();  // a failure is counted there
      } else {
        why_ = locked_ ? "left alone after repeated failures (back-off)"
                       : "busy with other calls past the timeout";
        tier_.count_error();
        if (operation.depth > 0) operation.failed = true;
      }
    }
    ~Call() {
      if (locked_) tier_.call_mutex_.unlock();
    }
    explicit operator bool() const { return ready_; }

    // Throws what made this call fail, as a put reports it.
    [[noreturn]] void raise() const {
      std::ostringstream message;
      message << "remote: " << tier_.address();
      if (why_ != std::generic_category().message(error_))  // what() ends with that already
        message << ": " << (why_.empty() ? "no answer within the timeout" : why_);
      message << " (timeout " << tier_.params_.timeout_ms << " ms)";
      throw std::system_error(error_, std::generic_category(), message.str());
    }

    // The reply to one command of binary-safe arguments; null (the connection dropped,
    // a failure counted) when the server did not answer in time.
    Reply command(const std::vector<std::string_view>& args) {
      if (!ready_) return nullptr;
      std::vector<const char*> argv;
      std::vector<std::size_t> lengths;
      for (const std::string_view arg : args) {
        argv.push_back(arg.data());
        lengths.push_back(arg.size());
      }
      for (;;) {
        Reply reply;
        redisContext* context = tier_.context_.get();
        if (Clock::now() < deadline_ &&
            redisSetTimeout(context, as_timeval(deadline_ - Clock::now())) == REDIS_OK)
          reply.reset(static_cast<redisReply*>(redisCommandArgv(
              context, static_cast<int>(argv.size()), argv.data(), lengths.data())));
        if (reply) {
          tier_.failures_ = 0;
          if (reply->type == REDIS_REPLY_ERROR) tier_.count_error();
          return reply;
        }
        // A connection the server closed (it restarted) is made again once, in this call's
        // time; a server that does not answer is a failure.
        const bool closed = context->err == REDIS_ERR_EOF;
        if (context->err &&
            !(context->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK)))
          why_ = context->errstr;  // (a timeout keeps the plain message)
        tier_.context_.reset();
        ready_ = false;
        if (closed && !reconnected_ && Clock::now() < deadline_) {
          reconnected_ = true;
          if (connect()) continue;
          return nullptr;
        }
        tier_.failed();
        return nullptr;
      }
    }

   private:
    // A connection (made within the deadline, the database selected); on a new one the
    // byte counts are checked against what the server still holds.
    bool connect() {
      if (tier_.context_) return true;
      const timeval left = as_timeval(deadline_ - Clock::now());
      std::unique_ptr<redisContext, ContextDeleter> context(
          redisConnectWithTimeout(tier_.params_.host.c_str(), tier_.params_.port, left));
      if (!context || context->err) {
        const int code = errno;
        why_ = context ? context->errstr : "cannot allocate a connection";
        if (code == ECONNREFUSED || code == EHOSTUNREACH || code == ENETUNREACH) error_ = code;
        tier_.failed();
        return false;
      }
      tier_.context_ = std::move(context);
      ready_ = true;
      if (tier_.params_.db != 0) {
        const Reply reply = command({"SELECT", std::to_string(tier_.params_.db)});
        if (!reply || reply->type == REDIS_REPLY_ERROR) {
          tier_.context_.reset();  // never used unselected
          return ready_ = false;
        }
      }
      return tier_.refresh_sizes(*this);
    }

    RedisTier& tier_;
    Clock::time_point deadline_;
    bool locked_ = false, ready_ = false, reconnected_ = false;
    std::string why_;        // what made the call fail
    int error_ = ETIMEDOUT;  // its errno as a put reports it
  };

  std::string address() const { return params_.host + ":" + std::to_string(params_.port); }

  void count_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.errors;
  }

  // A failed call: the connection is dropped, and from the third failure in a row the
  // server is left alone for a back-off (1 s, doubling to 30 s) while calls fail at once.
  void failed() {
    count_error();
    if (operation.depth > 0) operation.failed = true;
    context_.reset();
    if (++failures_ >= kFailuresBeforeBackOff) {
      const auto back_off =
          std::min<std::int64_t>(30000, 1000ll << std::min(failures_ - kFailuresBeforeBackOff, 5));
      back_off_until_ = Clock::now() + std::chrono::milliseconds(back_off);
    }
  }

  // After a (re)connection: the entries this process placed that the server lost (a
  // restart without persistence, an eviction of its own) stop counting as used bytes.
  bool refresh_sizes(Call& call) {
    std::vector<std::string> placed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& [key, stored] : sizes_) placed.push_back(key);
    }
    for (const std::string& key : placed) {
      const Reply reply = call.command({"EXISTS", params_.prefix + key});
      if (!reply) return false;
      if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 0) forget(key);
    }
    return true;
  }

  void forget(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = sizes_.find(key);
    if (it == sizes_.end()) return;
    used_ -= it->second.bytes;
    sizes_.erase(it);
  }

  static constexpr int kFailuresBeforeBackOff = 3;
  const RedisParams params_;
  const Clock::duration timeout_;
  std::timed_mutex call_mutex_;  // one call on the connection at a time; guards the next three
  std::unique_ptr<redisContext, ContextDeleter> context_;
  int failures_ = 0;  // calls failed in a row
  Clock::time_point back_off_until_{};
  mutable std::mutex mutex_;  // the fields below, held briefly (never across a network call)
  std::unordered_map<std::string, StoredBlob> sizes_;  // entries this process placed
  std::int64_t used_ = 0;
  TierCounters counters_;
};

}  // namespace

RemoteOperation::RemoteOperation() {
  if (operation.depth++ == 0) operation = Operation{1, false, false, {}};
}

RemoteOperation::~RemoteOperation() {
  --operation.depth;
}

std::unique_ptr<Tier> make_redis_tier(const RedisParams& params) {
  KVPACK_CHECK(params.port > 0 && params.port < 65536,
               "redis_url: expected a port in [1, 65535], got " << params.port);
  KVPACK_CHECK(params.capacity >= 0, "redis_bytes: expected >= 0, got " << params.capacity);
  KVPACK_CHECK(params.timeout_ms > 0, "timeout: expected > 0 ms, got " << params.timeout_ms);
  return std::make_unique<RedisTier>(params);
}

}  // namespace kvpack
