#include "proxyattn/trace.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "proxyattn/kernels.h"

namespace proxyattn {

namespace {
const std::chrono::steady_clock::time_point kLoaded = std::chrono::steady_clock::now();
}

bool trace_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("PROXYATTN_TRACE");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  return on;
}

TraceScope::TraceScope(std::string what, bool sync) : sync_(sync), on_(trace_enabled()) {
  if (!on_) return;
  what_ = std::move(what);
  t0_ = std::chrono::steady_clock::now();
}

TraceScope::~TraceScope() {
  if (!on_) return;
  if (sync_) (void)kernels::synchronize();  // a no-op error status without CUDA
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  // The step's start, in ms since the library was loaded: the timeline of overlapping threads.
  const double at = std::chrono::duration<double, std::milli>(t0_ - kLoaded).count();
  static std::mutex mu;  // whole lines from concurrent threads
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "trace: %-48s %10.1f ms  (at %.1f ms)\n", what_.c_str(), ms, at);
}

}  // namespace proxyattn
