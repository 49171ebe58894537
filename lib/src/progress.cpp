#include "proxyattn/progress.hpp"

#include <unistd.h>

#include <cstdio>
#include <exception>

namespace proxyattn {

namespace {
constexpr auto kLinePeriod = std::chrono::seconds(5);       // non-terminal: a line every 5 s
constexpr auto kBarPeriod = std::chrono::milliseconds(100);  // terminal: redraw at most 10 Hz
}  // namespace

Progress::Progress(std::string label, int64_t total, bool quiet)
    : label_(std::move(label)), total_(total), quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

// While an exception unwinds the error line is the only thing the user should see.
Progress::~Progress() {
  if (std::uncaught_exceptions() > 0) {
    std::lock_guard lock(mu_);
    if (!finished_ && tty_ && !quiet_) std::fputc('\n', stderr);
    finished_ = true;
    return;
  }
  done();
}

void Progress::set_label(std::string label) {
  std::lock_guard lock(mu_);
  label_ = std::move(label);
}

void Progress::tick(int64_t n) {
  count_ += n;
  if (quiet_) return;
  const auto now = std::chrono::steady_clock::now();
  std::unique_lock lock(mu_, std::try_to_lock);
  if (!lock.owns_lock() || finished_) return;
  if (now - last_draw_ < (tty_ ? std::chrono::duration_cast<std::chrono::steady_clock::duration>(kBarPeriod)
                               : std::chrono::duration_cast<std::chrono::steady_clock::duration>(kLinePeriod)))
    return;
  last_draw_ = now;
  draw(false);
}

void Progress::done() {
  std::lock_guard lock(mu_);
  if (finished_) return;
  finished_ = true;
  if (!quiet_) draw(true);
}

void Progress::draw(bool final) {
  const int64_t c = count_.load();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ > 0 ? static_cast<double>(c) / static_cast<double>(total_) : 1.0;
  if (tty_) {
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth + 0.5);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::fprintf(stderr, "\r%s [%s] %lld/%lld %.1fs%s", label_.c_str(), bar.c_str(),
                 static_cast<long long>(c), static_cast<long long>(total_), secs, final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s: %lld/%lld (%.0f%%) %.1fs%s\n", label_.c_str(), static_cast<long long>(c),
                 static_cast<long long>(total_), 100.0 * frac, secs, final ? " done" : "");
  }
  std::fflush(stderr);
}

}  // namespace proxyattn
