#pragma once
// PROXYATTN_TRACE=1: one stderr line per traced step with its wall milliseconds, for profiling
// the analysis's host and device parts on a machine without a profiler. Off (the default) it
// costs one branch per scope.
#include <chrono>
#include <string>

namespace proxyattn {

bool trace_enabled();

class TraceScope {
 public:
  // `sync`: wait for the device's queued work before reading the clock at the end, so a
  // kernel's time is charged to the step that launched it (only when tracing).
  explicit TraceScope(std::string what, bool sync = false);
  ~TraceScope();
  TraceScope(const TraceScope&) = delete;
  TraceScope& operator=(const TraceScope&) = delete;

 private:
  std::string what_;
  bool sync_ = false, on_ = false;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace proxyattn
