#pragma once
// Overflow-safe size arithmetic for every size that comes from a file or a flag, and a memory
// check before allocating: a hostile store or flag gets one clear Error, never an overflowed
// size, a segfault or std::bad_alloc.
#include <cstdint>
#include <initializer_list>
#include <string>

namespace proxyattn {

// a * b (a, b >= 0); throws Error("<what>: size overflows ...") when it does not fit int64.
int64_t checked_mul(int64_t a, int64_t b, const std::string& what);
// Product of all factors (each >= 0), checked.
int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what);
// a + b (a, b >= 0), checked.
int64_t checked_add(int64_t a, int64_t b, const std::string& what);

// Bytes of memory this process can still get: the smallest of MemAvailable (+ free swap), the
// cgroup limit left (v2 memory.max or v1 limit_in_bytes) and RLIMIT_AS/RLIMIT_DATA left.
// PROXYATTN_MEMORY_LIMIT (bytes; suffixes K, M, G) lowers it (tests, shared machines).
int64_t available_memory_bytes();

// Throws Error("<what>: needs X of memory, only Y available") when bytes > available.
void require_fits(int64_t bytes, const std::string& what);

// Bytes as "1.5 GiB" / "640 KiB" / "12 B".
std::string format_bytes(int64_t bytes);

}  // namespace proxyattn
