#include "proxyattn/io.hpp"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "proxyattn/error.hpp"

namespace proxyattn {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Temporary paths removed on SIGINT/SIGTERM/SIGHUP. Fixed slots, so the handler touches no heap.

namespace {

constexpr int kSlots = 256;
constexpr size_t kPathMax = 4096;
struct Slot {
  std::atomic<int> state{0};  // 0 free, 1 being written, 2 in use
  char path[kPathMax];
};
Slot g_slots[kSlots];
std::once_flag g_install_once;
int g_signals[] = {SIGINT, SIGTERM, SIGHUP};

void cleanup_handler(int sig) {
  for (int pass = 0; pass < 2; ++pass)
    for (Slot& s : g_slots)
      if (s.state.load(std::memory_order_acquire) == 2) {
        if (pass == 0) ::unlink(s.path);
        else ::rmdir(s.path);
      }
  // Die of the signal as if no handler were installed.
  struct sigaction sa {};
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  ::sigaction(sig, &sa, nullptr);
  ::raise(sig);
}

void install_handlers() {
  for (int sig : g_signals) {
    struct sigaction old {};
    if (::sigaction(sig, nullptr, &old) != 0) continue;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler != SIG_DFL) continue;  // ignored or owned by someone else
    if (old.sa_flags & SA_SIGINFO) continue;
    struct sigaction sa {};
    sa.sa_handler = cleanup_handler;
    sigemptyset(&sa.sa_mask);
    for (int s : g_signals) sigaddset(&sa.sa_mask, s);
    ::sigaction(sig, &sa, nullptr);
  }
}

}  // namespace

void register_temp_path(const std::string& path) {
  std::call_once(g_install_once, install_handlers);
  if (path.size() + 1 > kPathMax) return;
  for (Slot& s : g_slots) {
    int expected = 0;
    if (s.state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      std::memcpy(s.path, path.c_str(), path.size() + 1);
      s.state.store(2, std::memory_order_release);
      return;
    }
  }
}

void unregister_temp_path(const std::string& path) {
  for (Slot& s : g_slots) {
    int expected = 2;
    if (s.state.load(std::memory_order_acquire) == 2 && path == s.path &&
        s.state.compare_exchange_strong(expected, 0, std::memory_order_acq_rel))
      return;
  }
}

// ---------------------------------------------------------------------------------------------

std::string temp_path_for(const std::string& path) {
  return path + ".tmp-" + std::to_string(::getpid());
}

void require_writable_parent(const std::string& path) {
  fs::path p(path);
  fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(path + ": cannot write: directory " + dir.string() + " does not exist");
  if (::access(dir.c_str(), W_OK) != 0)
    throw Error(path + ": cannot write: directory " + dir.string() + " is not writable");
  if (fs::is_directory(p, ec)) throw Error(path + ": cannot write: is a directory");
}

namespace {
std::string kind_of(const fs::file_status& st) {
  switch (st.type()) {
    case fs::file_type::symlink: return "a symbolic link";
    case fs::file_type::directory: return "a directory";
    case fs::file_type::block: return "a block device";
    case fs::file_type::character: return "a character device";
    case fs::file_type::fifo: return "a FIFO";
    case fs::file_type::socket: return "a socket";
    case fs::file_type::regular: return "a regular file";
    default: return "not a regular file";
  }
}
}  // namespace

void require_output_file_target(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(path, ec);
  if (ec || st.type() == fs::file_type::not_found || st.type() == fs::file_type::regular) return;
  throw Error(path + ": cannot write: exists and is " + kind_of(st) + " (refusing to replace it)");
}

AtomicFile::AtomicFile(std::string path, bool binary) : path_(std::move(path)), tmp_(temp_path_for(path_)) {
  require_writable_parent(path_);
  require_output_file_target(path_);
  std::error_code ec;
  fs::remove(tmp_, ec);  // a stale temporary (or a link planted there) is replaced, never followed
  register_temp_path(tmp_);
  out_.open(tmp_, binary ? std::ios::binary | std::ios::trunc : std::ios::trunc);
  if (!out_) {
    const int err = errno;
    unregister_temp_path(tmp_);
    throw Error(path_ + ": cannot open for writing: " + std::strerror(err));
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) {
    out_.close();
    std::remove(tmp_.c_str());
  }
  unregister_temp_path(tmp_);
}

void AtomicFile::commit() {
  out_.flush();
  if (!out_) throw Error(path_ + ": write failed (disk full?)");
  out_.close();
  if (out_.fail()) throw Error(path_ + ": write failed (disk full?)");
  require_output_file_target(path_);
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw Error(path_ + ": cannot rename temporary file: " + std::strerror(errno));
  committed_ = true;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.stream() << contents;
  f.commit();
}

// ---------------------------------------------------------------------------------------------
// AtomicDir

namespace {
std::string parent_of(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "out/" -> "out"
  return p.has_parent_path() ? p.parent_path().string() : std::string(".");
}
std::string strip_slash(std::string d) {
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}
}  // namespace

void require_output_dir_target(const std::string& dir_in, const std::string& flag, AtomicDir::Filter replaceable) {
  const std::string dir = strip_slash(dir_in);
  const std::string where = flag + " " + dir;
  if (dir.empty()) throw Error(flag + ": empty path");
  // Missing parents are created at commit; the nearest existing ancestor must be a writable folder.
  std::string parent = parent_of(dir);
  std::error_code ec;
  fs::file_status pst = fs::status(parent, ec);
  while (pst.type() == fs::file_type::not_found && parent != "." && parent != "/" && !parent.empty()) {
    parent = parent_of(parent);
    pst = fs::status(parent, ec);
  }
  if (pst.type() == fs::file_type::not_found)
    throw Error(where + ": cannot write: directory " + parent + " does not exist");
  if (pst.type() != fs::file_type::directory)
    throw Error(where + ": cannot write: " + parent + " is not a directory");
  if (::access(parent.c_str(), W_OK | X_OK) != 0)
    throw Error(where + ": cannot write: directory " + parent + " is not writable");
  const fs::file_status st = fs::symlink_status(dir, ec);
  if (st.type() == fs::file_type::not_found) return;
  if (st.type() != fs::file_type::directory)
    throw Error(where + ": exists and is " + kind_of(st) + ", not a directory (refusing to replace it)");
  fs::directory_iterator it(dir, ec), end;
  if (ec) throw Error(where + ": cannot list the existing folder (" + ec.message() + ")");
  for (; it != end; it.increment(ec)) {
    if (ec) throw Error(where + ": cannot list the existing folder (" + ec.message() + ")");
    const std::string name = it->path().filename().string();
    std::error_code e2;
    const bool reg = it->symlink_status(e2).type() == fs::file_type::regular;
    if (!replaceable(name, reg))
      throw Error(where + ": exists and holds '" + name +
                  "', which is not part of a report; the folder is replaced as a whole, so use a fresh "
                  "folder or move it away");
  }
}

AtomicDir::AtomicDir(std::string dir, std::string flag, Filter replaceable)
    : dir_(strip_slash(std::move(dir))), flag_(std::move(flag)), replaceable_(replaceable) {
  require_output_dir_target(dir_, flag_, replaceable_);
  staging_ = temp_path_for(dir_);
  std::error_code ec;
  fs::create_directories(parent_of(dir_), ec);
  if (ec) throw Error(flag_ + " " + dir_ + ": cannot create the parent folder (" + ec.message() + ")");
  fs::remove_all(staging_, ec);  // a stale staging folder of a dead process with our pid
  register_temp_path(staging_);
  if (::mkdir(staging_.c_str(), 0777) != 0) {
    const int err = errno;
    unregister_temp_path(staging_);
    throw Error(flag_ + " " + dir_ + ": cannot create " + staging_ + ": " + std::strerror(err));
  }
}

AtomicDir::~AtomicDir() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
  for (const std::string& f : files_) unregister_temp_path((fs::path(staging_) / f).string());
  unregister_temp_path(staging_);
}

void AtomicDir::write(const std::string& name, const std::string& contents) {
  const std::string path = (fs::path(staging_) / name).string();
  files_.push_back(name);
  register_temp_path(path);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(flag_ + " " + dir_ + ": cannot write " + name + ": " + std::strerror(errno));
  out << contents;
  out.flush();
  out.close();
  if (out.fail()) throw Error(flag_ + " " + dir_ + ": cannot write " + name + " (disk full?)");
}

std::vector<std::string> AtomicDir::commit() {
  // One commit at a time per parent folder (two runs on one dir: each swaps a whole folder).
  const std::string parent = parent_of(dir_);
  const int lock = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (lock >= 0) ::flock(lock, LOCK_EX);
  struct Unlock {
    int fd;
    ~Unlock() {
      if (fd >= 0) ::close(fd);  // releases the flock
    }
  } unlock{lock};

  require_output_dir_target(dir_, flag_, replaceable_);  // again: it may have changed meanwhile
  if (::rename(staging_.c_str(), dir_.c_str()) != 0) {
    if (errno != EEXIST && errno != ENOTEMPTY && errno != EISDIR)
      throw Error(flag_ + " " + dir_ + ": cannot move the report into place: " + std::strerror(errno));
    // dir exists (checked replaceable): swap the two folders in one step, then drop the old one.
    if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, dir_.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS)
        throw Error(flag_ + " " + dir_ + ": cannot swap the report into place: " + std::strerror(errno));
      // No RENAME_EXCHANGE on this file system: old folder aside, new one in, old one deleted.
      // (For an instant dir is absent; it never mixes two runs.)
      const std::string old = dir_ + ".old-" + std::to_string(::getpid());
      register_temp_path(old);
      if (::rename(dir_.c_str(), old.c_str()) != 0)
        throw Error(flag_ + " " + dir_ + ": cannot move the old report aside: " + std::strerror(errno));
      if (::rename(staging_.c_str(), dir_.c_str()) != 0) {
        const int err = errno;
        (void)::rename(old.c_str(), dir_.c_str());
        unregister_temp_path(old);
        throw Error(flag_ + " " + dir_ + ": cannot move the report into place: " + std::strerror(err));
      }
      std::error_code ec;
      fs::remove_all(old, ec);
      unregister_temp_path(old);
    } else {
      std::error_code ec;
      fs::remove_all(staging_, ec);  // now the old folder
    }
  }
  committed_ = true;
  std::vector<std::string> out;
  for (const std::string& f : files_) out.push_back((fs::path(dir_) / f).string());
  return out;
}

}  // namespace proxyattn
