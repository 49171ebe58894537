#pragma once
// Output files that appear whole or not at all: write to "<path>.tmp-<pid>", rename on commit,
// remove the temporary on destruction without commit, and on SIGINT/SIGTERM/SIGHUP.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace proxyattn {

// Temporary sibling name for an output path (same directory, so rename is atomic).
std::string temp_path_for(const std::string& path);
// Throws Error("<path>: cannot write ...") unless the directory of path exists and is writable.
void require_writable_parent(const std::string& path);
// Throws Error("<path>: exists and is not a regular file ...") when path exists as anything but
// a regular file (a symlink, even to a regular file, a device node, a FIFO, a socket, a
// directory): an output never replaces such a thing.
void require_output_file_target(const std::string& path);

// Temporary paths removed by the signal handler (SIGINT, SIGTERM, SIGHUP) before the process
// dies of the signal: files are unlinked, then directories removed (they must be empty by
// then: register a directory before the files in it). The handler is installed on the first
// registration, for signals whose disposition is still the default.
void register_temp_path(const std::string& path);
void unregister_temp_path(const std::string& path);

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

// An output folder committed as a whole. The files are written into a fresh sibling folder
// "<dir>.tmp-<pid>"; commit() puts it in place with one rename (dir absent) or one atomic
// exchange (renameat2 RENAME_EXCHANGE; dir an earlier output of the same kind), then deletes
// the old one. A reader of dir sees the old set of files or the new one, never a mix; two runs
// on one dir each commit a complete folder (the last one wins). Refused up front: dir a
// symlink or not a directory, or holding entries that `replaceable` rejects (files of the user
// are never deleted). Destroyed without commit: the staging folder is removed.
class AtomicDir {
 public:
  // `flag` names the option in messages (e.g. "--out"); `replaceable(name, is_regular_file)`
  // says whether an entry of an existing dir may be dropped when it is replaced.
  using Filter = bool (*)(const std::string& name, bool regular_file);
  AtomicDir(std::string dir, std::string flag, Filter replaceable);
  ~AtomicDir();
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  // Writes one file into the staging folder (checked; registered for signal cleanup).
  void write(const std::string& name, const std::string& contents);
  const std::string& staging() const { return staging_; }
  // Returns the paths of the files as they are after the commit.
  std::vector<std::string> commit();

 private:
  std::string dir_, flag_, staging_;
  Filter replaceable_;
  std::vector<std::string> files_;
  bool committed_ = false;
};

// Checks, without creating anything, that AtomicDir(dir, flag, replaceable) can commit there:
// the parent exists and is writable, dir is absent or a replaceable directory.
void require_output_dir_target(const std::string& dir, const std::string& flag, AtomicDir::Filter replaceable);

}  // namespace proxyattn
