#include <gtest/gtest.h>

#include "proxyattn/host_memory.hpp"

namespace proxyattn {
namespace {

const std::string kMadvise = "always [madvise] never\n";

TEST(HostHugePages, AddsTheTunableOnlyWhereTheKernelWaitsForMadvise) {
  EXPECT_EQ(huge_page_tunables(nullptr, kMadvise, nullptr, false), "glibc.malloc.hugetlb=1");
  EXPECT_EQ(huge_page_tunables("", kMadvise, nullptr, false), "glibc.malloc.hugetlb=1");
  // Other tunables are kept, the new one appended.
  EXPECT_EQ(huge_page_tunables("glibc.malloc.arena_max=2", kMadvise, nullptr, false),
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1");
  EXPECT_EQ(huge_page_tunables(nullptr, kMadvise, "1", false), "glibc.malloc.hugetlb=1");
}

TEST(HostHugePages, LeavesTheProcessAsItIsOtherwise) {
  EXPECT_FALSE(huge_page_tunables(nullptr, "[always] madvise never\n", nullptr, false));  // the kernel does it
  EXPECT_FALSE(huge_page_tunables(nullptr, "always madvise [never]\n", nullptr, false));  // not possible
  EXPECT_FALSE(huge_page_tunables(nullptr, "", nullptr, false));                          // no THP
  EXPECT_FALSE(huge_page_tunables(nullptr, kMadvise, "0", false));                        // opted out
  EXPECT_FALSE(huge_page_tunables(nullptr, kMadvise, nullptr, true));                     // already re-executed
  EXPECT_FALSE(huge_page_tunables("glibc.malloc.hugetlb=0", kMadvise, nullptr, false));   // the user's choice
  EXPECT_FALSE(huge_page_tunables("glibc.malloc.hugetlb=2", kMadvise, nullptr, false));
}

}  // namespace
}  // namespace proxyattn
