#include "proxyattn/io.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "proxyattn/error.hpp"

namespace proxyattn {

namespace fs = std::filesystem;

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

AtomicFile::AtomicFile(std::string path, bool binary) : path_(std::move(path)), tmp_(temp_path_for(path_)) {
  require_writable_parent(path_);
  out_.open(tmp_, binary ? std::ios::binary | std::ios::trunc : std::ios::trunc);
  if (!out_) throw Error(path_ + ": cannot open for writing: " + std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (!committed_) {
    out_.close();
    std::remove(tmp_.c_str());
  }
}

void AtomicFile::commit() {
  out_.flush();
  if (!out_) throw Error(path_ + ": write failed (disk full?)");
  out_.close();
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw Error(path_ + ": cannot rename temporary file: " + std::strerror(errno));
  committed_ = true;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.stream() << contents;
  f.commit();
}

}  // namespace proxyattn
