#pragma once
// Output files that appear whole or not at all: write to "<path>.tmp-<pid>", rename on commit,
// remove the temporary on destruction without commit.
#include <filesystem>
#include <fstream>
#include <string>

namespace proxyattn {

// Temporary sibling name for an output path (same directory, so rename is atomic).
std::string temp_path_for(const std::string& path);
// Throws Error("<path>: cannot write ...") unless the directory of path exists and is writable.
void require_writable_parent(const std::string& path);

class AtomicFile {
 public:
  explicit AtomicFile(std::string path, bool binary = false);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  std::ofstream& stream() { return out_; }
  const std::string& path() const { return path_; }
  // Flush, check the stream, rename over path. Throws Error on any failure.
  void commit();

 private:
  std::string path_, tmp_;
  std::ofstream out_;
  bool committed_ = false;
};

// Write a whole text file atomically.
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace proxyattn
