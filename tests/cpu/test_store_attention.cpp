// Per-layer attention attributes of the store (/layers/NN: attention = "global" | "sliding",
// window = W): default global when absent, round trip through StoreWriter::set_attention,
// h5py-style values, and one Error naming the file, the layer and the problem for bad values.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "proxyattn/h5_edit.hpp"
#include "proxyattn/store.hpp"
#include "store_test_util.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

using test::expect_error;
using test::TempDir;

// A small store (2 q / 1 kv heads, d = 16, N = 37) with layers `ids`; `att` (if given) is set
// on every written layer whose id is a key of it.
void write_store(const std::string& path, const std::vector<int>& ids,
                 const std::vector<std::pair<int, LayerAttention>>& att = {}) {
  StoreMeta m;
  m.model = "attention-test";
  m.source = "unit test";
  m.num_layers = 6;
  m.num_q_heads = 2;
  m.num_kv_heads = 1;
  m.head_dim = 16;
  m.seq_len = 37;
  m.creator = "test_store_attention";
  StoreWriter w(path, m, {.dtype = DType::f32});
  for (int l : ids) {
    const Tensor3 q = test::random_tensor(2, 37, 16, 1.0f);
    const Tensor3 k = test::random_tensor(1, 37, 16, 1.0f);
    w.write_layer(l, q, k);
  }
  for (const auto& [l, a] : att) w.set_attention(l, a);
  w.commit();
}

TEST(StoreAttention, AbsentAttributeMeansGlobal) {
  TempDir dir;
  const std::string path = dir.file("plain.h5");
  write_store(path, {0, 3});
  StoreReader r(path);
  for (int l : {0, 3}) {
    EXPECT_EQ(r.attention(l).kind, AttentionKind::global);
    EXPECT_EQ(r.attention(l).window, 0);
    EXPECT_FALSE(r.attention(l).sliding());
  }
  expect_error([&] { (void)r.attention(1); }, {path, "layer 1 not in store"});
}

TEST(StoreAttention, RoundTripOfGlobalAndSlidingLayers) {
  TempDir dir;
  const std::string path = dir.file("gemma-like.h5");
  const LayerAttention sliding{AttentionKind::sliding, 512};
  const LayerAttention global{};
  write_store(path, {0, 1, 5}, {{0, sliding}, {1, {AttentionKind::sliding, 7}}, {5, global}});
  {
    StoreReader r(path);
    EXPECT_EQ(r.attention(0), sliding);
    EXPECT_EQ(r.attention(1), (LayerAttention{AttentionKind::sliding, 7}));
    EXPECT_EQ(r.attention(5), global);
    EXPECT_EQ(attention_kind_name(r.attention(0).kind), "sliding");
    EXPECT_EQ(attention_kind_name(r.attention(5).kind), "global");
  }  // closed before the file is edited
  // A window past seq_len is legal (the layer then sees every earlier token).
  h5edit::set_attr_int(path, "/layers/01", "window", 100000);
  EXPECT_EQ(StoreReader(path).attention(1).window, 100000);
}

TEST(StoreAttention, H5pyStyleValuesAreRead) {
  // What capture_qk.py writes: variable-length UTF-8 (or fixed-length ASCII) strings, int64.
  TempDir dir;
  const std::string path = dir.file("h5py.h5");
  write_store(path, {0, 1, 2});
  h5edit::set_attr_string(path, "/layers/00", "attention", "sliding");
  h5edit::set_attr_int(path, "/layers/00", "window", 512);
  h5edit::set_attr_string(path, "/layers/01", "attention", "global", true);
  h5edit::set_attr_string(path, "/layers/02", "attention", "global");
  h5edit::set_attr_int(path, "/layers/02", "window", 0);  // a zero window on a global layer is fine
  StoreReader r(path);
  EXPECT_EQ(r.attention(0), (LayerAttention{AttentionKind::sliding, 512}));
  EXPECT_EQ(r.attention(1), LayerAttention{});
  EXPECT_EQ(r.attention(2), LayerAttention{});
}

class BadAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    path = dir.file("bad.h5");
    write_store(path, {0, 2});
  }
  TempDir dir;
  std::string path;
};

TEST_F(BadAttention, UnknownKind) {
  h5edit::set_attr_string(path, "/layers/02", "attention", "local");
  expect_error([&] { StoreReader r(path); },
               {path, "/layers/02", "attribute attention", "expected \"global\" or \"sliding\"", "\"local\""});
}

TEST_F(BadAttention, KindOfTheWrongType) {
  h5edit::set_attr_int(path, "/layers/00", "attention", 1);
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00", "attribute attention", "expected a string"});
}

TEST_F(BadAttention, SlidingWithoutWindow) {
  h5edit::set_attr_string(path, "/layers/00", "attention", "sliding");
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00", "attribute window", "missing"});
}

TEST_F(BadAttention, NonPositiveWindow) {
  h5edit::set_attr_string(path, "/layers/00", "attention", "sliding");
  for (int64_t w : {0, -4}) {
    h5edit::set_attr_int(path, "/layers/00", "window", w);
    expect_error([&] { StoreReader r(path); },
                 {path, "/layers/00", "attribute window", "positive", std::to_string(w)});
  }
}

TEST_F(BadAttention, WindowOfTheWrongType) {
  h5edit::set_attr_string(path, "/layers/00", "attention", "sliding");
  h5edit::set_attr_string(path, "/layers/00", "window", "512");
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00", "attribute window", "expected an integer"});
}

TEST_F(BadAttention, WindowOnAGlobalLayer) {
  h5edit::set_attr_string(path, "/layers/02", "attention", "global");
  h5edit::set_attr_int(path, "/layers/02", "window", 512);
  expect_error([&] { StoreReader r(path); }, {path, "/layers/02", "attribute window", "global layer"});
}

TEST_F(BadAttention, WindowWithoutKind) {
  h5edit::set_attr_int(path, "/layers/00", "window", 512);
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00", "window", "without attribute attention"});
}

TEST(StoreAttentionWrite, BadValuesAndUnwrittenLayersAreRejected) {
  TempDir dir;
  const std::string path = dir.file("w.h5");
  StoreMeta m;
  m.model = "m";
  m.num_layers = 2;
  m.num_q_heads = 1;
  m.num_kv_heads = 1;
  m.head_dim = 8;
  m.seq_len = 5;
  StoreWriter w(path, m, {.dtype = DType::f32});
  const Tensor3 q = test::random_tensor(1, 5, 8, 1.0f);
  w.write_layer(0, q, q);
  expect_error([&] { w.set_attention(1, {AttentionKind::sliding, 4}); }, {path, "layer 1", "not been written"});
  expect_error([&] { w.set_attention(0, {AttentionKind::sliding, 0}); }, {path, "/layers/0", "window >= 1"});
  expect_error([&] { w.set_attention(0, {AttentionKind::global, 3}); }, {path, "/layers/0", "no window"});
  w.set_attention(0, {AttentionKind::sliding, 2});
  w.set_attention(0, {AttentionKind::sliding, 3});  // set twice: the last one wins
  w.commit();
  EXPECT_EQ(StoreReader(path).attention(0), (LayerAttention{AttentionKind::sliding, 3}));
}

}  // namespace
}  // namespace proxyattn
