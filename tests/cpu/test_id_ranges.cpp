#include <gtest/gtest.h>

#include "proxyattn/id_ranges.hpp"

namespace proxyattn {
namespace {

TEST(IdRanges, CompactsRuns) {
  EXPECT_EQ(format_id_ranges({}), "");
  EXPECT_EQ(format_id_ranges({5}), "5");
  EXPECT_EQ(format_id_ranges({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(format_id_ranges({2, 4, 6}), "2,4,6");
}

}  // namespace
}  // namespace proxyattn
