#include "proxyattn/checked.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

#include "proxyattn/error.hpp"

namespace proxyattn {

namespace {
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

void require_nonneg(int64_t v, const std::string& what) {
  if (v < 0) throw Error(what + ": negative size " + std::to_string(v));
}

// "123", "64M", "2G" -> bytes; -1 when unparsable.
int64_t parse_bytes(const std::string& s) {
  if (s.empty()) return -1;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || !(v >= 0)) return -1;
  double mult = 1;
  const std::string suf(end);
  if (suf == "K" || suf == "k") mult = 1024.0;
  else if (suf == "M" || suf == "m") mult = 1024.0 * 1024;
  else if (suf == "G" || suf == "g") mult = 1024.0 * 1024 * 1024;
  else if (!suf.empty()) return -1;
  const double b = v * mult;
  return b >= 9.0e18 ? kMax : static_cast<int64_t>(b);
}

// "max" or a number from a one-line file; -1 when absent/unlimited.
int64_t read_limit_file(const char* path) {
  std::ifstream f(path);
  std::string s;
  if (!(f >> s) || s == "max") return -1;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (end == s.c_str() || v >= static_cast<unsigned long long>(kMax) / 2) return -1;  // v1 "unlimited" is huge
  return static_cast<int64_t>(v);
}

int64_t meminfo_available() {
  std::ifstream f("/proc/meminfo");
  std::string line;
  int64_t avail = -1, swap = 0;
  while (std::getline(f, line)) {
    std::istringstream is(line);
    std::string key;
    int64_t kb = 0;
    is >> key >> kb;
    if (key == "MemAvailable:") avail = kb * 1024;
    else if (key == "SwapFree:") swap = kb * 1024;
  }
  return avail < 0 ? -1 : avail + swap;
}
}  // namespace

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  require_nonneg(a, what);
  require_nonneg(b, what);
  if (a != 0 && b > kMax / a)
    throw Error(what + ": size overflows (" + std::to_string(a) + " x " + std::to_string(b) + ")");
  return a * b;
}

int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what) {
  int64_t p = 1;
  for (int64_t f : factors) {
    require_nonneg(f, what);
    if (f == 0) return 0;
  }
  std::string expr;
  for (int64_t f : factors) {
    expr += (expr.empty() ? "" : " x ") + std::to_string(f);
    if (p > kMax / f) throw Error(what + ": size overflows (" + expr + " x ...)");
    p *= f;
  }
  return p;
}

int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  require_nonneg(a, what);
  require_nonneg(b, what);
  if (a > kMax - b) throw Error(what + ": size overflows (" + std::to_string(a) + " + " + std::to_string(b) + ")");
  return a + b;
}

int64_t available_memory_bytes() {
  int64_t avail = kMax;
  auto lower = [&](int64_t v) {
    if (v >= 0) avail = std::min(avail, v);
  };
  lower(meminfo_available());
  // cgroup v2, then v1.
  const int64_t max2 = read_limit_file("/sys/fs/cgroup/memory.max");
  if (max2 >= 0) {
    const int64_t cur = std::max<int64_t>(read_limit_file("/sys/fs/cgroup/memory.current"), 0);
    lower(std::max<int64_t>(max2 - cur, 0));
  } else {
    const int64_t max1 = read_limit_file("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    if (max1 >= 0) {
      const int64_t cur = std::max<int64_t>(read_limit_file("/sys/fs/cgroup/memory/memory.usage_in_bytes"), 0);
      lower(std::max<int64_t>(max1 - cur, 0));
    }
  }
  for (int res : {RLIMIT_AS, RLIMIT_DATA}) {
    struct rlimit rl {};
    if (getrlimit(res, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < static_cast<rlim_t>(kMax))
      lower(static_cast<int64_t>(rl.rlim_cur));  // an upper bound; the process already uses some
  }
  if (const char* env = std::getenv("PROXYATTN_MEMORY_LIMIT")) lower(parse_bytes(env));
  return avail;
}

void require_fits(int64_t bytes, const std::string& what) {
  require_nonneg(bytes, what);
  const int64_t avail = available_memory_bytes();
  if (bytes > avail)
    throw Error(what + ": needs " + format_bytes(bytes) + " of memory, only " + format_bytes(avail) + " available");
}

std::string format_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

}  // namespace proxyattn
