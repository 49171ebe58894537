#include <gtest/gtest.h>

#include "proxyattn/block_mask.hpp"
#include "proxyattn/error.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

TEST(BlockMask, CausalCountsAndDensity) {
  const BlockMask m = BlockMask::causal(3, 1000, 128);  // Nb = 8, last block 104 rows
  EXPECT_EQ(m.num_blocks(), 8);
  EXPECT_EQ(m.selected(), 3 * 36);
  EXPECT_DOUBLE_EQ(m.density(), 1.0);
  EXPECT_NEAR(m.element_density(), 1.0, 1e-12);
  EXPECT_TRUE(m.contains(2, 7, 0));
  EXPECT_FALSE(m.contains(2, 3, 4));
}

TEST(BlockMask, HandComputedDensity) {
  // N = 5, B = 2: blocks {0,1},{2,3},{4}; causal blocks 6, causal pairs 15.
  const BlockMask m = BlockMask::from_rows(1, 5, 2, {{0}, {1}, {0, 2}});
  EXPECT_DOUBLE_EQ(m.density(), 4.0 / 6.0);
  // pairs: block(0,0) 3, block(1,1) 3, block(2,0) 1x2 = 2, block(2,2) 1 -> 9 / 15
  EXPECT_DOUBLE_EQ(m.element_density(), 9.0 / 15.0);
}

TEST(BlockMask, BitmapRoundTripAndFromRowsSorts) {
  const BlockMask a = test::random_mask(4, 777, 64, 0.3);
  const BlockMask b = BlockMask::from_bitmap(4, 777, 64, a.bitmap());
  EXPECT_EQ(a, b);
  const BlockMask c = BlockMask::from_rows(1, 300, 128, {{0}, {1, 0, 1}, {2, 0}});
  EXPECT_EQ(std::vector<int32_t>(c.row(0, 1).begin(), c.row(0, 1).end()), (std::vector<int32_t>{0, 1}));
}

TEST(BlockMask, RejectsInvalid) {
  // non-causal
  EXPECT_THROW(BlockMask(1, 256, 128, {0, 1, 2}, {1, 1}), Error);
  // unsorted
  EXPECT_THROW(BlockMask(1, 300, 128, {0, 1, 3, 4}, {0, 1, 0, 2}), Error);
  // duplicate
  EXPECT_THROW(BlockMask(1, 256, 128, {0, 1, 3}, {0, 1, 1}), Error);
  // wrong indptr length
  EXPECT_THROW(BlockMask(2, 256, 128, {0, 1, 2}, {0, 1}), Error);
  // out of range
  EXPECT_THROW(BlockMask(1, 256, 128, {0, 1, 2}, {0, -1}), Error);
  // bad block sizes and lengths
  EXPECT_THROW(BlockMask::causal(1, 256, 0), Error);
  EXPECT_THROW(BlockMask::causal(1, 256, 96), Error);
  EXPECT_THROW(BlockMask::causal(1, 0, 64), Error);
  try {
    BlockMask(1, 300, 128, {0, 1, 3, 4}, {0, 1, 0, 2});
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("query block 1"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace proxyattn
