#pragma once
// Progress on stderr for long work: a redrawn bar when stderr is a terminal, a line every few
// seconds otherwise, nothing when quiet. Thread-safe tick().
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace proxyattn {

class Progress {
 public:
  Progress(std::string label, int64_t total, bool quiet = false);
  ~Progress();  // finishes the line
  void tick(int64_t n = 1);
  void set_label(std::string label);
  void done();

 private:
  void draw(bool final);
  std::string label_;
  int64_t total_;
  std::atomic<int64_t> count_{0};
  bool quiet_, tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
  std::mutex mu_;
};

}  // namespace proxyattn
