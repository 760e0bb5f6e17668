#include "kvpack/tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "kvpack/checksum.h"

namespace kvpack {

namespace {

class DramTier final : public Tier {
 public:
  explicit DramTier(std::int64_t capacity) : capacity_(capacity) {}

  std::string name() const override { return "dram"; }
  std::int64_t used() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_;
  }
  std::int64_t capacity() const override { return capacity_; }

  bool put(const std::string& key, const BlobPtr& blob) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = blobs_.find(key);
    const std::int64_t old = it == blobs_.end() ? 0 : stored_bytes(it->second->size());
    if (used_ - old + stored_bytes(blob->size()) > capacity_) return false;
    used_ += stored_bytes(blob->size()) - old;
    blobs_[key] = blob;
    return true;
  }

  BlobPtr get(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = blobs_.find(key);
    return it == blobs_.end() ? nullptr : it->second;
  }

  bool contains(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return blobs_.count(key) > 0;
  }

  void remove(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = blobs_.find(key);
    if (it == blobs_.end()) return;
    used_ -= stored_bytes(it->second->size());
    blobs_.erase(it);
  }

  void forget(const std::string& key) override { remove(key); }  // only this process sees it

  std::vector<StoredBlob> list() override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<StoredBlob> out;
    for (const auto& [key, blob] : blobs_) {
      const BlobInfo info = read_blob_info(blob->data(), blob->size());
      out.push_back({key, stored_bytes(blob->size()), info.codec, info.version});
    }
    return out;
  }

  TierCounters counters() const override { return {}; }

 private:
  const std::int64_t capacity_;
  mutable std::mutex mutex_;
  std::int64_t used_ = 0;
  std::unordered_map<std::string, BlobPtr> blobs_;
};

// A file descriptor closed on scope exit.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

bool write_all(int fd, const unsigned char* data, std::size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

// Reads exactly `size` bytes at `offset`; false on error or early end of file.
bool read_all(int fd, unsigned char* data, std::size_t size, off_t offset) {
  while (size > 0) {
    const ssize_t n = ::pread(fd, data, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<std::size_t>(n);
    offset += n;
  }
  return true;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

class SsdTier final : public Tier {
 public:
  explicit SsdTier(const SsdParams& params) : params_(params) {
    KVPACK_CHECK(!params.directory.empty(), "ssd_dir: expected a directory path, got ''");
    KVPACK_CHECK(params.io_threads >= 1, "io_threads: expected >= 1, got " << params.io_threads);
    if (::mkdir(params.directory.c_str(), 0755) != 0 && errno != EEXIST)
      throw std::runtime_error("ssd_dir: cannot create '" + params.directory +
                               "': " + std::strerror(errno));
    rebuild_index();
    for (int i = 0; i < params.io_threads; ++i) workers_.emplace_back([this] { serve(); });
  }

  ~SsdTier() override {
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      stopping_ = true;
    }
    queue_ready_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }

  std::string name() const override { return "ssd"; }
  std::int64_t used() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_;
  }
  std::int64_t capacity() const override { return params_.capacity; }

  bool put(const std::string& key, const BlobPtr& blob) override {
    const std::int64_t bytes = stored_bytes(blob->size());
    {
      // Reserve the room first so concurrent puts cannot overshoot the capacity.
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = index_.find(key);
      const std::int64_t old = it == index_.end() ? 0 : it->second.bytes;
      if (used_ + reserved_ - old + bytes > params_.capacity) return false;
      reserved_ += bytes;
      ++writing_[key];
    }
    const int error = write_file(key, *blob);
    std::lock_guard<std::mutex> lock(mutex_);
    reserved_ -= bytes;
    if (--writing_[key] == 0) writing_.erase(key);
    drop_prefetched(key);
    if (error) {
      ++counters_.errors;
      throw std::system_error(error, std::generic_category(),
                              "ssd: cannot write '" + path_of(key) + "'");
    }
    const auto it = index_.find(key);
    if (it != index_.end()) used_ -= it->second.bytes;
    const BlobInfo info = read_blob_info(blob->data(), blob->size());
    index_[key] = Entry{blob->size(), bytes, info.codec, ++versions_, info.version};
    used_ += bytes;
    return true;
  }

  BlobPtr get(const std::string& key) override {
    std::size_t size;
    std::uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto done = prefetched_.find(key);
      if (done != prefetched_.end()) {
        BlobPtr blob = done->second;
        prefetched_bytes_ -= stored_bytes(blob->size());
        prefetched_.erase(done);
        return blob;
      }
      const auto it = index_.find(key);
      // Not indexed: another process may have stored it since this tier opened.
      size = it == index_.end() ? 0 : it->second.size;
      version = it == index_.end() ? 0 : it->second.version;
    }
    return read_verified(key, size, version);
  }

  bool contains(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return index_.count(key) > 0;
  }

  void remove(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    drop_prefetched(key);
    const auto it = index_.find(key);
    if (it == index_.end()) return;
    ::unlink(path_of(key).c_str());
    used_ -= it->second.bytes;
    index_.erase(it);
  }

  void forget(const std::string& key) override {
    std::lock_guard<std::mutex> lock(mutex_);
    drop_prefetched(key);
    const auto it = index_.find(key);
    if (it == index_.end()) return;
    used_ -= it->second.bytes;
    index_.erase(it);
  }

  std::vector<StoredBlob> list() override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<StoredBlob> out;
    for (const auto& [key, entry] : index_)
      out.push_back({key, entry.bytes, entry.codec, entry.entry_version});
    return out;
  }

  void prefetch(const std::string& key) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!index_.count(key) || prefetched_.count(key)) return;
    }
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      queue_.push_back(key);
    }
    queue_ready_.notify_one();
  }

  TierCounters counters() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    TierCounters out = counters_;
    out.prefetched = static_cast<std::int64_t>(prefetched_.size());
    return out;
  }

 private:
  struct Entry {
    std::size_t size;    // blob bytes
    std::int64_t bytes;  // stored bytes (file size)
    Codec codec;
    std::uint64_t version = 0;        // when this tier indexed the file (from 1; 0: never)
    std::uint64_t entry_version = 0;  // the version the blob carries
  };

  std::string file_name(const std::string& key) const {
    char name[32];
    std::snprintf(name, sizeof name, "%016llx.kvb",
                  static_cast<unsigned long long>(xxh64(key.data(), key.size())));
    return name;
  }
  std::string path_of(const std::string& key) const {
    return params_.directory + "/" + file_name(key);
  }

  // Writes the blob beside its final name, syncs it and renames it into place, so a crash
  // leaves the old file or the new one; 0, or the errno of the step that failed.
  int write_file(const std::string& key, const Buffer& blob) {
    static std::atomic<std::uint64_t> serial{0};
    const std::string final_path = path_of(key);
    const std::string temp_path = final_path + "." + std::to_string(::getpid()) + "." +
                                  std::to_string(serial.fetch_add(1)) + ".tmp";
    const auto failed = [&temp_path] {
      const int error = errno ? errno : EIO;
      ::unlink(temp_path.c_str());
      return error;
    };
    {
      Fd file(::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      if (file.fd < 0) return errno;
      errno = 0;
      if (!write_all(file.fd, blob.data(), blob.capacity()) || ::fsync(file.fd) != 0)
        return failed();
      // Written blobs are not kept in the page cache: reads measure (and use) the device.
      ::posix_fadvise(file.fd, 0, 0, POSIX_FADV_DONTNEED);
    }
    if (::rename(temp_path.c_str(), final_path.c_str()) != 0) return failed();
    // The rename itself is durable once the directory is synced.
    Fd directory(::open(params_.directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (directory.fd < 0 || ::fsync(directory.fd) != 0) return errno ? errno : EIO;
    return 0;
  }

  // Opens a blob file; -1 (errno set) unless it is a regular file. Non-blocking, so a FIFO
  // put in a blob's place cannot hang a get.
  int open_for_read(const std::string& path) const {
    int fd = -1;
    if (params_.o_direct) {
      fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_DIRECT);
      if (fd < 0 && errno != EINVAL) return fd;  // EINVAL: no O_DIRECT on this file system
    }
    if (fd < 0) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat info {};
    if (fd >= 0 && (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode))) {
      ::close(fd);
      errno = EIO;
      return -1;
    }
    return fd;
  }

  // Reads `blob` (its capacity) from `fd` and feeds `verifier` as bytes arrive; false on an
  // I/O error. A helper thread reads ahead in chunks while this one checksums what has
  // arrived.
  static bool read_into(int fd, Buffer& blob, BlobVerifier& verifier) {
    constexpr std::size_t kChunk = 4u << 20;
    if (blob.capacity() <= 2 * kChunk) {
      if (!read_all(fd, blob.data(), blob.capacity(), 0)) return false;
      verifier.update(blob.size());
      return true;
    }
    std::mutex progress_mutex;
    std::condition_variable progress;
    std::size_t arrived = 0;
    bool failed = false;
    std::thread reader([&] {
      for (std::size_t at = 0; at < blob.capacity(); at += kChunk) {
        const std::size_t n = std::min(kChunk, blob.capacity() - at);
        const bool ok = read_all(fd, blob.data() + at, n, static_cast<off_t>(at));
        std::lock_guard<std::mutex> lock(progress_mutex);
        if (!ok) failed = true;
        arrived = ok ? at + n : arrived;
        progress.notify_one();
        if (!ok) return;
      }
    });
    std::size_t populated = kChunk;  // the reader faults in its first chunk itself
    for (std::size_t seen = 0;;) {
      // While the device works, fault in the pages of the chunks ahead (zeroing fresh
      // memory is CPU work that would otherwise stall each read). MADV_POPULATE_WRITE
      // never changes a page already present, so it cannot race with the reader.
      for (; populated < std::min(blob.capacity(), seen + 3 * kChunk); populated += kChunk)
        ::madvise(blob.data() + populated, std::min(kChunk, blob.capacity() - populated),
                  MADV_POPULATE_WRITE);
      std::unique_lock<std::mutex> lock(progress_mutex);
      progress.wait(lock, [&] { return failed || arrived > seen; });
      seen = arrived;
      const bool done = failed || seen >= blob.capacity();
      lock.unlock();
      verifier.update(seen);
      if (done) break;
    }
    reader.join();
    return !failed;
  }

  // Removes the file of `key` if it is still the one described by `seen` (another process
  // may have renamed a new one into place since it was read).
  void unlink_if_same(const std::string& key, const struct stat& seen) const {
    struct stat now {};
    if (::stat(path_of(key).c_str(), &now) == 0 && now.st_dev == seen.st_dev &&
        now.st_ino == seen.st_ino)
      ::unlink(path_of(key).c_str());
  }

  // Reads the file of `key` whole and verifies it. `size` is the blob size on record and
  // `version` when this tier indexed it (both 0: not indexed). The file is read at its own
  // size: another process may have replaced it with a blob of another size or codec, which
  // is then indexed as the key's blob; a file that fails verification is corrupt (files are
  // only ever replaced whole, by rename) and dropped, counted, unless a put of this tier
  // replaced it meanwhile (then a plain miss: the caller looks again).
  BlobPtr read_verified(const std::string& key, std::size_t size, std::uint64_t version) {
    BlobPtr blob;
    bool read = false, valid = false, missing = false;
    struct stat file_info {};
    {
      Fd file(open_for_read(path_of(key)));
      missing = file.fd < 0 && errno == ENOENT;
      if (file.fd >= 0 && ::fstat(file.fd, &file_info) == 0 && file_info.st_size > 0) {
        const auto file_bytes = static_cast<std::int64_t>(file_info.st_size);
        if (stored_bytes(size) != file_bytes) size = static_cast<std::size_t>(file_bytes);
        auto buffer = std::make_shared<Buffer>(size);
        BlobVerifier verifier(*buffer);
        read = buffer->capacity() == static_cast<std::size_t>(file_bytes) &&
               read_into(file.fd, *buffer, verifier);
        if (read) {
          try {
            const BlobInfo info = read_blob_info(buffer->data(), buffer->size());
            valid = info.key == key && verifier.valid();
            if (!valid && info.key == key && info.size != buffer->size() &&
                stored_bytes(info.size) == file_bytes) {
              // The record was of another version: the header gives this one's size.
              auto exact = std::make_shared<Buffer>(info.size);
              std::memcpy(exact->data(), buffer->data(), info.size);
              buffer = exact;
              valid = verify_blob(*buffer);
            }
          } catch (const std::runtime_error&) {
            valid = false;
          }
        }
        blob = std::move(buffer);
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = index_.find(key);
    if (version != 0 &&
        (it == index_.end() || it->second.version != version || writing_.count(key)))
      // Removed or replaced by this tier meanwhile: a whole blob of this key is a version
      // some put wrote, current when the read began (a rename swaps whole files), so it is
      // served; anything else is a plain miss.
      return valid ? blob : nullptr;
    if (valid) {
      // The index follows the file: the version another process wrote, or one found now.
      const BlobInfo info = read_blob_info(blob->data(), blob->size());
      if (it != index_.end()) {
        used_ += stored_bytes(blob->size()) - it->second.bytes;
        it->second.size = blob->size();
        it->second.bytes = stored_bytes(blob->size());
        it->second.codec = info.codec;
        it->second.entry_version = info.version;
      } else if (!writing_.count(key)) {
        index_[key] =
            Entry{blob->size(), stored_bytes(blob->size()), info.codec, ++versions_, info.version};
        used_ += stored_bytes(blob->size());
      }
      return blob;
    }
    if (missing) {
      if (it != index_.end()) {  // removed behind the store's back (or by another process)
        ++counters_.errors;
        used_ -= it->second.bytes;
        index_.erase(it);
      }
      return nullptr;
    }
    if (!read) {  // an I/O error (or not a file) says nothing about the file: keep it
      if (it != index_.end() || blob) ++counters_.errors;
      return nullptr;
    }
    ++counters_.corrupt;
    unlink_if_same(key, file_info);
    if (it != index_.end()) {
      used_ -= it->second.bytes;
      index_.erase(it);
    }
    return nullptr;
  }

  void drop_prefetched(const std::string& key) {
    const auto it = prefetched_.find(key);
    if (it == prefetched_.end()) return;
    prefetched_bytes_ -= stored_bytes(it->second->size());
    prefetched_.erase(it);
  }

  void serve() {
    for (;;) {
      std::string key;
      {
        std::unique_lock<std::mutex> lock(queue_mutex_);
        queue_ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_) return;
        key = std::move(queue_.front());
        queue_.pop_front();
      }
      std::size_t size;
      std::uint64_t version;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto it = index_.find(key);
        if (it == index_.end() || prefetched_.count(key) ||
            prefetched_bytes_ + it->second.bytes > params_.prefetch_bytes)
          continue;
        size = it->second.size;
        version = it->second.version;
      }
      BlobPtr blob = read_verified(key, size, version);
      if (!blob) continue;
      std::lock_guard<std::mutex> lock(mutex_);
      // Held for a later get only while it is still the newest version: a put that
      // replaced the file during the read must not be undone by this copy.
      const auto it = index_.find(key);
      if (it != index_.end() && it->second.version == version && !writing_.count(key) &&
          !prefetched_.count(key)) {
        prefetched_[key] = blob;
        prefetched_bytes_ += stored_bytes(blob->size());
      }
    }
  }

  // Scans the directory: removes leftovers of this tier's interrupted writes, indexes its
  // blobs by the key in their header and removes its blobs found damaged. Anything else
  // (other files, FIFOs, files that are not kvpack blobs) is left alone.
  void rebuild_index() {
    DIR* dir = ::opendir(params_.directory.c_str());
    if (!dir) throw std::runtime_error("ssd_dir: cannot open '" + params_.directory + "'");
    std::vector<std::string> names;
    while (const dirent* item = ::readdir(dir)) names.emplace_back(item->d_name);
    ::closedir(dir);
    for (const std::string& name : names) {
      const std::string path = params_.directory + "/" + name;
      if (is_temp_name(name)) {
        // Another process's put may be writing it: only a writer that is gone left it.
        if (writer_gone(name)) ::unlink(path.c_str());
        continue;
      }
      if (!is_blob_name(name)) continue;
      // Non-blocking, so a FIFO under a blob's name cannot hang the open.
      Fd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      struct stat info {};
      if (file.fd < 0 || ::fstat(file.fd, &info) != 0 || !S_ISREG(info.st_mode)) continue;
      unsigned char header[kBlobHeaderBytes];
      if (info.st_size < static_cast<off_t>(sizeof header) ||
          !read_all(file.fd, header, sizeof header, 0) || !has_blob_magic(header))
        continue;  // not a kvpack blob: not this tier's to delete
      bool indexed = false;
      try {
        // The key follows the header; it may be long, so read exactly as much as it needs.
        std::vector<unsigned char> with_key(blob_prefix_bytes(header));
        if (static_cast<std::size_t>(info.st_size) >= with_key.size() &&
            read_all(file.fd, with_key.data(), with_key.size(), 0)) {
          const BlobInfo blob = read_blob_info(with_key.data(), with_key.size());
          std::uint64_t entry_version = 0;
          if (file_name(blob.key) == name &&
              static_cast<std::int64_t>(info.st_size) == stored_bytes(blob.size) &&
              (!blob_has_version(header) ||
               read_all(file.fd, reinterpret_cast<unsigned char*>(&entry_version),
                        sizeof entry_version,
                        static_cast<off_t>(blob.size - sizeof entry_version)))) {
            index_[blob.key] =
                Entry{blob.size, stored_bytes(blob.size), blob.codec, ++versions_, entry_version};
            used_ += stored_bytes(blob.size);
            indexed = true;
          }
        }
      } catch (const std::runtime_error&) {
      }
      if (!indexed) {  // a kvpack blob under a blob's name, damaged: counted and removed
        ++counters_.corrupt;
        ::unlink(path.c_str());
      }
    }
  }

  // <16 hex digits>.kvb: the names file_name() gives.
  static bool is_blob_name(const std::string& name) {
    if (name.size() != 20 || !ends_with(name, ".kvb")) return false;
    return std::all_of(name.begin(), name.begin() + 16,
                       [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
  }
  // True when the process named in a temporary file's name (<blob name>.<pid>.<serial>.tmp)
  // no longer exists: the file is the leftover of an interrupted write. Pids are those of
  // this machine's pid namespace, where the processes sharing a directory run.
  static bool writer_gone(const std::string& name) {
    const long pid = std::strtol(name.c_str() + 21, nullptr, 10);
    return pid <= 0 || (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH);
  }
  // <blob name>.<pid>.<serial>.tmp: write_file()'s temporary files.
  static bool is_temp_name(const std::string& name) {
    if (!ends_with(name, ".tmp") || name.size() < 20 || !is_blob_name(name.substr(0, 20)))
      return false;
    const std::string middle = name.substr(20, name.size() - 24);  // ".<pid>.<serial>"
    int dots = 0;
    for (const char c : middle) {
      if (c == '.')
        ++dots;
      else if (!std::isdigit(static_cast<unsigned char>(c)))
        return false;
    }
    return dots == 2 && middle.front() == '.';
  }

  const SsdParams params_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Entry> index_;
  std::uint64_t versions_ = 0;                    // puts so far: the next file's version
  std::unordered_map<std::string, int> writing_;  // keys with a put in flight
  std::int64_t used_ = 0, reserved_ = 0;
  TierCounters counters_;
  std::unordered_map<std::string, BlobPtr> prefetched_;
  std::int64_t prefetched_bytes_ = 0;
  std::mutex queue_mutex_;
  std::condition_variable queue_ready_;
  std::deque<std::string> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Tier> make_dram_tier(std::int64_t capacity) {
  KVPACK_CHECK(capacity >= 0, "dram_bytes: expected >= 0, got " << capacity);
  return std::make_unique<DramTier>(capacity);
}

std::unique_ptr<Tier> make_ssd_tier(const SsdParams& params) {
  KVPACK_CHECK(params.capacity >= 0, "ssd_bytes: expected >= 0, got " << params.capacity);
  return std::make_unique<SsdTier>(params);
}

}  // namespace kvpack
