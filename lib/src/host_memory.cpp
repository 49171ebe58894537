#include "proxyattn/host_memory.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#if defined(__linux__)
#include <unistd.h>
#endif
#if defined(__GLIBC__)
#include <gnu/libc-version.h>
#endif

namespace proxyattn {

namespace {

constexpr const char* kTunable = "glibc.malloc.hugetlb";
constexpr const char* kMarker = "PROXYATTN_HUGEPAGES_REEXEC";  // set in the re-executed process

std::string thp_enabled_text() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The selected mode, the word in brackets ("always [madvise] never" -> "madvise").
std::string thp_mode(const std::string& text) {
  const size_t a = text.find('['), b = text.find(']');
  return a != std::string::npos && b != std::string::npos && b > a ? text.substr(a + 1, b - a - 1) : "";
}

bool glibc_has_hugetlb() {
#if defined(__GLIBC__)
  int major = 0, minor = 0;
  return std::sscanf(gnu_get_libc_version(), "%d.%d", &major, &minor) == 2 && (major > 2 || (major == 2 && minor >= 35));
#else
  return false;
#endif
}

}  // namespace

std::optional<std::string> huge_page_tunables(const char* tunables, const std::string& thp_enabled,
                                              const char* opt_out, bool already) {
  if (already) return std::nullopt;
  if (opt_out && std::strcmp(opt_out, "0") == 0) return std::nullopt;
  if (thp_mode(thp_enabled) != "madvise") return std::nullopt;  // "always": the kernel does it
  const std::string now = tunables ? tunables : "";
  if (now.find(kTunable) != std::string::npos) return std::nullopt;  // the user's own choice
  return (now.empty() ? std::string() : now + ":") + kTunable + "=1";
}

void reexec_with_huge_pages(char** argv) {
#if defined(__linux__)
  if (!argv || !argv[0] || !glibc_has_hugetlb()) return;
  const char* before = std::getenv("GLIBC_TUNABLES");
  const std::string saved = before ? before : "";
  const std::optional<std::string> next =
      huge_page_tunables(before, thp_enabled_text(), std::getenv("PROXYATTN_HUGEPAGES"), std::getenv(kMarker) != nullptr);
  if (!next) return;
  setenv("GLIBC_TUNABLES", next->c_str(), 1);
  setenv(kMarker, "1", 1);
  execv("/proc/self/exe", argv);
  // Not replaced: go on as we are.
  if (before)
    setenv("GLIBC_TUNABLES", saved.c_str(), 1);
  else
    unsetenv("GLIBC_TUNABLES");
  unsetenv(kMarker);
#else
  (void)argv;
#endif
}

std::string host_huge_pages() {
  const std::string mode = thp_mode(thp_enabled_text());
  if (mode.empty()) return "off: no transparent huge pages";
  if (mode == "always") return "THP always";
  if (mode == "never") return "off: THP never";
  const char* t = std::getenv("GLIBC_TUNABLES");
  if (t && std::strstr(t, "glibc.malloc.hugetlb=1")) return "glibc.malloc.hugetlb=1 (THP madvise)";
  if (t && std::strstr(t, "glibc.malloc.hugetlb=2")) return "glibc.malloc.hugetlb=2 (THP madvise)";
  return "off: THP madvise without glibc.malloc.hugetlb";
}

}  // namespace proxyattn
