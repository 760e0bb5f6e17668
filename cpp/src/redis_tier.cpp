// The remote tier: a minimal RESP2 client (SET / GET / EXISTS / DEL / SCAN / SELECT) over
// one TCP connection with timeouts on connect, send and receive, so a server that is gone
// or hung turns into fast misses instead of a blocked caller.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

#include "kvpack/tier.h"

namespace kvpack {

namespace {

struct RedisError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A RESP reply: integers, simple strings, bulk strings (bytes or a Buffer) and arrays.
struct Reply {
  char type = 0;  // '+', '-', ':', '$', '*'
  std::int64_t integer = 0;
  bool nil = false;
  std::string text;                // simple string, error, or small bulk string
  std::shared_ptr<Buffer> buffer;  // bulk string read into an aligned buffer
  std::vector<Reply> elements;
};

class Connection {
 public:
  Connection(const RedisParams& params) : params_(params) {}
  ~Connection() { close(); }

  bool connected() const { return fd_ >= 0; }

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    buffered_.clear();
    read_at_ = 0;
  }

  void connect() {
    close();
    addrinfo hints{}, *found = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (::getaddrinfo(params_.host.c_str(), std::to_string(params_.port).c_str(), &hints, &found) !=
            0 ||
        !found)
      throw RedisError("cannot resolve " + params_.host);
    const int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      ::freeaddrinfo(found);
      throw RedisError("socket failed");
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    int rc = ::connect(fd, found->ai_addr, found->ai_addrlen);
    ::freeaddrinfo(found);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd waiting{fd, POLLOUT, 0};
      rc = ::poll(&waiting, 1, params_.timeout_ms) == 1 ? 0 : -1;
      int error = 0;
      socklen_t length = sizeof error;
      if (rc == 0 && (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0 || error))
        rc = -1;
    }
    if (rc != 0) {
      ::close(fd);
      throw RedisError("cannot connect to " + params_.host + ":" + std::to_string(params_.port));
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    timeval timeout{params_.timeout_ms / 1000, (params_.timeout_ms % 1000) * 1000};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fd_ = fd;
    if (params_.db != 0) {
      const Reply reply = command({"SELECT", std::to_string(params_.db)});
      if (reply.type == '-') throw RedisError("SELECT failed: " + reply.text);
    }
  }

  // Sends one command of binary-safe arguments and reads its reply.
  Reply command(const std::vector<std::string_view>& args) {
    std::string head = "*" + std::to_string(args.size()) + "\r\n";
    std::vector<iovec> parts;
    std::vector<std::string> prefixes;
    prefixes.reserve(args.size());
    for (const std::string_view arg : args)
      prefixes.push_back("$" + std::to_string(arg.size()) + "\r\n");
    static const char kEnd[] = "\r\n";
    parts.push_back({head.data(), head.size()});
    for (std::size_t i = 0; i < args.size(); ++i) {
      parts.push_back({prefixes[i].data(), prefixes[i].size()});
      parts.push_back({const_cast<char*>(args[i].data()), args[i].size()});
      parts.push_back({const_cast<char*>(kEnd), 2});
    }
    send_all(parts);
    return read_reply();
  }

 private:
  void send_all(std::vector<iovec> parts) {
    for (iovec& part : parts) {
      const char* data = static_cast<const char*>(part.iov_base);
      std::size_t size = part.iov_len;
      while (size > 0) {
        const ssize_t n = ::send(fd_, data, size, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) throw RedisError("send failed or timed out");
        data += n;
        size -= static_cast<std::size_t>(n);
      }
    }
  }

  void fill() {
    if (read_at_ > 0 && read_at_ == buffered_.size()) {
      buffered_.clear();
      read_at_ = 0;
    }
    char chunk[1 << 16];
    ssize_t n;
    do n = ::recv(fd_, chunk, sizeof chunk, 0);
    while (n < 0 && errno == EINTR);
    if (n <= 0) throw RedisError(n == 0 ? "server closed the connection" : "receive timed out");
    buffered_.append(chunk, static_cast<std::size_t>(n));
  }

  std::string read_line() {
    for (;;) {
      const auto end = buffered_.find("\r\n", read_at_);
      if (end != std::string::npos) {
        std::string line = buffered_.substr(read_at_, end - read_at_);
        read_at_ = end + 2;
        return line;
      }
      fill();
    }
  }

  // Copies `size` bytes of the stream to out (buffered bytes first, then straight from
  // the socket into out).
  void read_exact(unsigned char* out, std::size_t size) {
    const std::size_t ready = std::min(size, buffered_.size() - read_at_);
    std::memcpy(out, buffered_.data() + read_at_, ready);
    read_at_ += ready;
    out += ready;
    size -= ready;
    while (size > 0) {
      const ssize_t n = ::recv(fd_, out, size, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw RedisError("receive failed or timed out");
      out += n;
      size -= static_cast<std::size_t>(n);
    }
  }

  Reply read_reply() {
    const std::string line = read_line();
    if (line.empty()) throw RedisError("empty reply");
    Reply reply;
    reply.type = line[0];
    const std::string rest = line.substr(1);
    switch (reply.type) {
      case '+':
      case '-':
        reply.text = rest;
        return reply;
      case ':':
        reply.integer = std::stoll(rest);
        return reply;
      case '$': {
        const std::int64_t size = std::stoll(rest);
        if (size < 0) {
          reply.nil = true;
          return reply;
        }
        reply.buffer = std::make_shared<Buffer>(static_cast<std::size_t>(size));
        read_exact(reply.buffer->data(), static_cast<std::size_t>(size));
        unsigned char end[2];
        read_exact(end, 2);
        return reply;
      }
      case '*': {
        const std::int64_t count = std::stoll(rest);
        if (count < 0) {
          reply.nil = true;
          return reply;
        }
        for (std::int64_t i = 0; i < count; ++i) reply.elements.push_back(read_reply());
        return reply;
      }
      default:
        throw RedisError("malformed reply");
    }
  }

  const RedisParams params_;
  int fd_ = -1;
  std::string buffered_;
  std::size_t read_at_ = 0;
};

class RedisTier final : public Tier {
 public:
  explicit RedisTier(const RedisParams& params) : params_(params), connection_(params) {}

  std::string name() const override { return "remote"; }
  std::int64_t used() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_;
  }
  std::int64_t capacity() const override { return params_.capacity; }

  bool put(const std::string& key, const BlobPtr& blob) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = sizes_.find(key);
    const std::int64_t old = it == sizes_.end() ? 0 : it->second.bytes;
    const std::int64_t bytes = stored_bytes(blob->size());
    if (used_ - old + bytes > params_.capacity) return false;
    const std::string_view data(reinterpret_cast<const char*>(blob->data()), blob->size());
    const auto reply = call({"SET", params_.prefix + key, data});
    if (!reply || reply->type != '+') return false;
    used_ += bytes - old;
    sizes_[key] = StoredBlob{key, bytes, read_blob_info(blob->data(), blob->size()).codec};
    return true;
  }

  BlobPtr get(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto reply = call({"GET", params_.prefix + key});
    if (!reply || reply->type != '$' || reply->nil) return nullptr;
    std::shared_ptr<Buffer> blob = reply->buffer;
    bool valid = false;
    try {
      valid = verify_blob(*blob) && read_blob_info(blob->data(), blob->size()).key == key;
    } catch (const std::runtime_error&) {
    }
    if (!valid) {
      ++counters_.corrupt;
      call({"DEL", params_.prefix + key});
      forget(key);
      return nullptr;
    }
    return blob;
  }

  bool contains(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto reply = call({"EXISTS", params_.prefix + key});
    return reply && reply->type == ':' && reply->integer > 0;
  }

  void remove(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    call({"DEL", params_.prefix + key});
    forget(key);
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
  // One command, reconnecting once if the connection dropped; nothing (and an error
  // counted) when the server cannot be reached. After a failed connect the server is
  // left alone for a second so a dead server does not cost a timeout on every call.
  std::optional<Reply> call(const std::vector<std::string_view>& args) {
    using Clock = std::chrono::steady_clock;
    for (int attempt = 0; attempt < 2; ++attempt) {
      try {
        if (!connection_.connected()) {
          if (Clock::now() < retry_after_) break;
          try {
            connection_.connect();
          } catch (const RedisError&) {
            retry_after_ = Clock::now() + std::chrono::seconds(1);
            throw;
          }
        }
        Reply reply = connection_.command(args);
        if (reply.type == '-') ++counters_.errors;
        return reply;
      } catch (const RedisError&) {
        connection_.close();
        if (attempt == 1 || Clock::now() < retry_after_) break;
      } catch (const std::exception&) {  // malformed numbers in a reply
        connection_.close();
        break;
      }
    }
    ++counters_.errors;
    return std::nullopt;
  }

  void forget(const std::string& key) {
    const auto it = sizes_.find(key);
    if (it == sizes_.end()) return;
    used_ -= it->second.bytes;
    sizes_.erase(it);
  }

  const RedisParams params_;
  mutable std::mutex mutex_;
  Connection connection_;
  std::chrono::steady_clock::time_point retry_after_{};
  std::unordered_map<std::string, StoredBlob> sizes_;  // entries this process placed
  std::int64_t used_ = 0;
  TierCounters counters_;
};

}  // namespace

std::unique_ptr<Tier> make_redis_tier(const RedisParams& params) {
  KVPACK_CHECK(params.port > 0 && params.port < 65536,
               "redis_url: expected a port in [1, 65535], got " << params.port);
  KVPACK_CHECK(params.capacity >= 0, "redis_bytes: expected >= 0, got " << params.capacity);
  KVPACK_CHECK(params.timeout_ms > 0, "timeout: expected > 0 ms, got " << params.timeout_ms);
  return std::make_unique<RedisTier>(params);
}

}  // namespace kvpack
