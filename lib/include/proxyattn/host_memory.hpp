#pragma once
// Transparent huge pages for the host's large arrays. At 128K one analysed layer allocates and
// frees several GB of [H, Nb, Nb] scores, rankings and masks; with 4 KiB pages every first touch
// is a page fault and every free an unmap, about a quarter of a 128K layer's wall time on an
// H200 host (measured: 7.2-7.7 s -> 6.0 s, the layer's teardown 0.37 -> 0.04 s). glibc (2.35+)
// backs its allocations with huge pages when the tunable glibc.malloc.hugetlb=1 is set, which
// it reads only at process start: a tool that wants it re-executes itself once with the
// tunable added. Where the kernel's THP mode is "always" (nothing to gain) or "never" (nothing
// possible), or PROXYATTN_HUGEPAGES=0, the process goes on as it is.
#include <optional>
#include <string>

namespace proxyattn {

// The GLIBC_TUNABLES value to re-execute with, or nothing: `tunables` is the present value
// (null when unset), `thp_enabled` the text of /sys/kernel/mm/transparent_hugepage/enabled,
// `opt_out` PROXYATTN_HUGEPAGES, `already` whether this process is the re-executed one.
std::optional<std::string> huge_page_tunables(const char* tunables, const std::string& thp_enabled,
                                              const char* opt_out, bool already);

// Call first in main(), before any thread, MPI or CUDA call: re-executes /proc/self/exe with
// the same arguments when huge_page_tunables says so (Linux, glibc >= 2.35); returns when it
// does not (or the exec fails, leaving the environment as it was).
void reexec_with_huge_pages(char** argv);

// For reports: "glibc.malloc.hugetlb=1 (THP madvise)", "THP always", "off: <why>".
std::string host_huge_pages();

}  // namespace proxyattn
