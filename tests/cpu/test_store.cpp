// HDF5 store: round trips (f16/f32, gzip, views with strides, >99 layers), hyperslab reads, and
// every bad input of issue 2 (each must throw one Error naming the file and the object, and a
// failed write must leave no file behind).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "proxyattn/dtype.hpp"
#include "proxyattn/h5_edit.hpp"
#include "proxyattn/store.hpp"
#include "store_test_util.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

using test::expect_error;
using test::TempDir;

StoreMeta make_meta(int hq, int hkv, int d, int64_t n, int layers = 3) {
  StoreMeta m;
  m.model = "test-model ü";  // non-ASCII on purpose: strings are UTF-8
  m.source = "unit test";
  m.num_layers = layers;
  m.num_q_heads = hq;
  m.num_kv_heads = hkv;
  m.head_dim = d;
  m.seq_len = n;
  m.rope_theta = 500000.0;
  m.rope_applied = false;
  m.prompt_sha256 = "0123456789abcdef";
  m.creator = "test_store";
  m.needle = Needle{n / 2, "the needle"};
  return m;
}

struct Written {
  std::vector<LayerData> layers;  // as written, float32
  std::vector<int32_t> tokens;
};

// Random layers [ids] with q scaled up (non-trivial range) and written to path.
Written write_random(const std::string& path, const StoreMeta& m, WriteOptions wo, const std::vector<int>& ids,
                     bool with_v = true) {
  Written w;
  StoreWriter sw(path, m, wo);
  for (int l : ids) {
    LayerData ld;
    ld.layer = l;
    ld.q = test::random_tensor(m.num_q_heads, m.seq_len, m.head_dim, 3.0f);
    ld.k = test::random_tensor(m.num_kv_heads, m.seq_len, m.head_dim, 1.0f);
    if (with_v) ld.v = test::random_tensor(m.num_kv_heads, m.seq_len, m.head_dim, 1.0f);
    ConstView vv;
    if (ld.v) vv = ld.v->view();
    sw.write_layer(l, ld.q, ld.k, with_v ? &vv : nullptr);
    w.layers.push_back(std::move(ld));
  }
  w.tokens.resize(static_cast<size_t>(m.seq_len));
  for (size_t i = 0; i < w.tokens.size(); ++i) w.tokens[i] = static_cast<int32_t>(test::rng()() % 128000);
  sw.write_tokens(w.tokens);
  sw.commit();
  return w;
}

// Exact equality after rounding the written values through the storage dtype.
void expect_equal_rounded(const Tensor3& got, ConstView want, DType dt, const std::string& what) {
  ASSERT_EQ(got.heads(), want.heads) << what;
  ASSERT_EQ(got.tokens(), want.tokens) << what;
  ASSERT_EQ(got.dim(), want.dim) << what;
  int64_t bad = 0;
  for (int64_t h = 0; h < want.heads; ++h)
    for (int64_t t = 0; t < want.tokens; ++t)
      for (int64_t c = 0; c < want.dim; ++c) {
        const float ref = round_to(dt, want(h, t, c));
        const float x = got(h, t, c);
        if (std::memcmp(&ref, &x, sizeof(float)) != 0) ++bad;
      }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " values differ from the written ones";
}

struct RoundTripCase {
  int hq, hkv, d;
  int64_t n, chunk;
  DType dtype;
  bool gzip;
};

class StoreRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(StoreRoundTrip, ValuesMetaAndTokensSurvive) {
  const auto p = GetParam();
  TempDir dir;
  const std::string path = dir.file("rt.h5");
  const StoreMeta m = make_meta(p.hq, p.hkv, p.d, p.n);
  WriteOptions wo;
  wo.dtype = p.dtype;
  wo.chunk_tokens = p.chunk;
  wo.gzip = p.gzip;
  const Written w = write_random(path, m, wo, {0, 2});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"rt.h5"});  // temp renamed away

  StoreReader r(path);
  const StoreMeta& g = r.meta();
  EXPECT_EQ(g.model, m.model);
  EXPECT_EQ(g.source, m.source);
  EXPECT_EQ(g.num_layers, m.num_layers);
  EXPECT_EQ(g.num_q_heads, p.hq);
  EXPECT_EQ(g.num_kv_heads, p.hkv);
  EXPECT_EQ(g.head_dim, p.d);
  EXPECT_EQ(g.seq_len, p.n);
  EXPECT_EQ(g.rope_theta, m.rope_theta);
  EXPECT_EQ(g.rope_applied, false);
  EXPECT_EQ(g.dtype, p.dtype);
  EXPECT_EQ(g.prompt_sha256, m.prompt_sha256);
  EXPECT_EQ(g.creator, m.creator);
  ASSERT_TRUE(g.needle.has_value());
  EXPECT_EQ(g.needle->position, m.needle->position);
  EXPECT_EQ(g.needle->text, m.needle->text);
  EXPECT_EQ(r.layers(), (std::vector<int>{0, 2}));
  ASSERT_TRUE(r.has_tokens());
  EXPECT_EQ(r.tokens(), w.tokens);

  for (const LayerData& want : w.layers) {
    EXPECT_EQ(r.dataset_dtype(want.layer, Tensor::q), p.dtype);
    EXPECT_TRUE(r.has_v(want.layer));
    const LayerData got = r.read_layer(want.layer);
    const std::string l = "layer " + std::to_string(want.layer);
    expect_equal_rounded(got.q, want.q, p.dtype, l + " q");
    expect_equal_rounded(got.k, want.k, p.dtype, l + " k");
    ASSERT_TRUE(got.v.has_value());
    expect_equal_rounded(*got.v, *want.v, p.dtype, l + " v");
    const LayerData no_v = r.read_layer(want.layer, false);
    EXPECT_FALSE(no_v.v.has_value());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, StoreRoundTrip,
    ::testing::Values(RoundTripCase{4, 4, 64, 131, 32, DType::f16, false},   // GQA 1, partial chunk
                      RoundTripCase{6, 2, 64, 131, 1024, DType::f32, false}, // GQA 3, chunk > N
                      RoundTripCase{8, 2, 128, 97, 40, DType::f16, true},    // GQA 4, d 128, gzip
                      RoundTripCase{9, 3, 64, 211, 64, DType::f32, true}));  // gzip f32

TEST(Store, Float16RoundTripIsBitExactOnEveryFiniteHalf) {
  // Every finite half value (63,488 of them) stored and read back bit for bit.
  std::vector<float> vals;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = half_to_float(static_cast<uint16_t>(b));
    if (std::isfinite(f)) vals.push_back(f);
  }
  const int64_t d = 64, n = static_cast<int64_t>((vals.size() + d - 1) / d);
  Tensor3 q(1, n, d, 1.5f);
  std::copy(vals.begin(), vals.end(), q.data());
  Tensor3 k(1, n, d, 0.25f);
  TempDir dir;
  const std::string path = dir.file("halves.h5");
  StoreMeta m = make_meta(1, 1, static_cast<int>(d), n, 1);
  m.needle.reset();
  {
    StoreWriter w(path, m, {.dtype = DType::f16, .chunk_tokens = 77, .gzip = true});
    w.write_layer(0, q, k);
    w.commit();
  }
  StoreReader r(path);
  const Tensor3 got = r.read(0, Tensor::q, 0, 1, 0, n);
  EXPECT_EQ(std::memcmp(got.data(), q.data(), sizeof(float) * q.size()), 0);
  EXPECT_FALSE(r.has_v(0));
  EXPECT_FALSE(r.has_tokens());
  EXPECT_FALSE(r.meta().needle.has_value());
}

TEST(Store, HyperslabReadMatchesTheWindow) {
  TempDir dir;
  const std::string path = dir.file("slab.h5");
  const StoreMeta m = make_meta(6, 2, 64, 257);
  for (DType dt : {DType::f16, DType::f32}) {
    const Written w = write_random(path, m, {.dtype = dt, .chunk_tokens = 50, .gzip = dt == DType::f16}, {1});
    StoreReader r(path);
    const Tensor3& q = w.layers[0].q;
    const Tensor3 win = r.read(1, Tensor::q, 2, 5, 37, 201);
    ASSERT_EQ(win.heads(), 3);
    for (int64_t h = 0; h < 3; ++h)
      for (int64_t t = 0; t < win.tokens(); ++t)
        for (int64_t c = 0; c < 64; ++c)
          ASSERT_EQ(win(h, t, c), round_to(dt, q(2 + h, 37 + t, c))) << h << "," << t << "," << c;
    const Tensor3 kv = r.read(1, Tensor::v, 1, 2, 256, 257);  // last token only
    EXPECT_EQ(kv(0, 0, 5), round_to(dt, (*w.layers[0].v)(1, 256, 5)));
    const Tensor3 empty = r.read(1, Tensor::k, 0, 2, 10, 10);
    EXPECT_EQ(empty.size(), 0);
    // Never past a dataset's extent.
    expect_error([&] { r.read(1, Tensor::q, 0, 7, 0, 10); }, {path, "/layers/01/q", "heads"});
    expect_error([&] { r.read(1, Tensor::k, 0, 2, 0, 258); }, {path, "/layers/01/k", "tokens"});
    expect_error([&] { r.read(1, Tensor::k, 0, 2, 20, 10); }, {path, "tokens"});
    expect_error([&] { r.read(0, Tensor::k, 0, 2, 0, 10); }, {path, "layer 0 not in store"});
  }
}

TEST(Store, StridedViewsAreWrittenCorrectly) {
  // A view whose token stride is larger than d (a window of a wider buffer).
  const int64_t H = 2, N = 53, d = 64, pad = 16;
  std::vector<float> buf(static_cast<size_t>(H * N * (d + pad)));
  for (auto& x : buf) x = std::normal_distribution<float>(0.0f, 2.0f)(test::rng());
  ConstView q{buf.data(), H, N, d, N * (d + pad), d + pad};
  const Tensor3 k = test::random_tensor(1, N, d);
  TempDir dir;
  const std::string path = dir.file("strided.h5");
  StoreMeta m = make_meta(2, 1, 64, N, 1);
  {
    StoreWriter w(path, m, {.dtype = DType::f32});
    w.write_layer(0, q, k);
    w.commit();
  }
  StoreReader r(path);
  const Tensor3 got = r.read(0, Tensor::q, 0, 2, 0, N);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t c = 0; c < d; ++c) ASSERT_EQ(got(h, t, c), q(h, t, c));
}

TEST(Store, ManyLayersUseWiderGroupNames) {
  TempDir dir;
  const std::string path = dir.file("wide.h5");
  const StoreMeta m = make_meta(2, 1, 64, 19, 120);
  const Written w = write_random(path, m, {.dtype = DType::f32}, {105, 7});
  StoreReader r(path);
  EXPECT_EQ(r.layers(), (std::vector<int>{7, 105}));
  expect_equal_rounded(r.read_layer(105).k, w.layers[0].k, DType::f32, "layer 105 k");
  expect_error([&] { r.read_layer(8); }, {path, "layer 8", "7,105"});
}

TEST(Store, ReadsH5pyStyleAttributes) {
  // Fixed-length ASCII strings, integer rope_applied and integer rope_theta are accepted too.
  TempDir dir;
  const std::string path = dir.file("styles.h5");
  write_random(path, make_meta(3, 3, 64, 29, 1), {.dtype = DType::f32}, {0});
  h5edit::set_attr_string(path, "/", "model", "fixed-ascii", true);
  h5edit::set_attr_int(path, "/", "rope_applied", 1);
  h5edit::set_attr_int(path, "/", "rope_theta", 10000);
  StoreReader r(path);
  EXPECT_EQ(r.meta().model, "fixed-ascii");
  EXPECT_TRUE(r.meta().rope_applied);
  EXPECT_EQ(r.meta().rope_theta, 10000.0);
}

TEST(Store, NonFiniteValuesAreAnErrorUnlessAllowed) {
  TempDir dir;
  const std::string path = dir.file("nan.h5");
  const int64_t N = 31, d = 64;
  const StoreMeta m = make_meta(2, 1, d, N, 1);
  write_random(path, m, {.dtype = DType::f32}, {0});
  std::vector<float> q(static_cast<size_t>(2 * N * d));
  for (auto& x : q) x = std::normal_distribution<float>(0.0f, 1.0f)(test::rng());
  q[5] = std::numeric_limits<float>::quiet_NaN();
  q[700] = std::numeric_limits<float>::infinity();
  q[701] = -std::numeric_limits<float>::infinity();
  h5edit::write_f32(path, "/layers/00/q", {2, static_cast<uint64_t>(N), static_cast<uint64_t>(d)}, q);
  StoreReader strict(path);  // opening is fine: values are only checked when read
  expect_error([&] { strict.read_layer(0); }, {path, "/layers/00/q", "1 NaN", "2 Inf"});
  expect_error([&] { strict.read(0, Tensor::q, 0, 1, 0, 1); }, {path, "1 NaN", "0 Inf"});
  // A window without the bad values reads fine.
  EXPECT_EQ(strict.read(0, Tensor::q, 1, 2, 20, 31).tokens(), 11);
  StoreReader lax(path, {.allow_nonfinite = true});
  const Tensor3 got = lax.read(0, Tensor::q, 0, 2, 0, N);
  EXPECT_TRUE(std::isnan(got.data()[5]));
  EXPECT_EQ(got.data()[700], std::numeric_limits<float>::infinity());
  EXPECT_EQ(got.data()[701], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(got.data()[6], q[6]);
  const FiniteCount fc = count_nonfinite(got);
  EXPECT_EQ(fc.nan, 1);
  EXPECT_EQ(fc.inf, 2);
}

// ----- bad input on read ------------------------------------------------------------------------

class BadStore : public ::testing::Test {
 protected:
  void SetUp() override {
    path = dir.file("bad.h5");
    write_random(path, make_meta(6, 2, 64, 41, 2), {.dtype = DType::f32}, {0, 1});
  }
  std::vector<float> values(size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = std::normal_distribution<float>(0.0f, 1.0f)(test::rng());
    return v;
  }
  TempDir dir;
  std::string path;
};

TEST_F(BadStore, MissingFile) {
  const std::string p = dir.file("nope.h5");
  expect_error([&] { StoreReader r(p); }, {p, "no such file"});
}

TEST_F(BadStore, NotAnHdf5File) {
  const std::string p = dir.file("text.h5");
  test::write_bytes(p, "this is not HDF5 at all\n");
  expect_error([&] { StoreReader r(p); }, {p, "not an HDF5 file"});
  const std::string e = dir.file("empty.h5");
  test::write_bytes(e, "");
  expect_error([&] { StoreReader r(e); }, {e, "empty"});
  expect_error([&] { StoreReader r(dir.path().string()); }, {dir.path().string(), "not a regular file"});
}

TEST_F(BadStore, TruncatedFile) {
  const std::string bytes = test::read_bytes(path);
  ASSERT_GT(bytes.size(), 4096u);
  for (size_t keep : {bytes.size() / 2, bytes.size() - 1, size_t{2048}}) {
    const std::string p = dir.file("trunc.h5");
    test::write_bytes(p, bytes.substr(0, keep));
    expect_error([&] { StoreReader r(p); }, {p});
  }
}

TEST_F(BadStore, MissingDataset) {
  h5edit::remove_object(path, "/layers/01/k");
  expect_error([&] { StoreReader r(path); }, {path, "/layers/01/k", "missing dataset"});
}

TEST_F(BadStore, MissingLayersGroup) {
  h5edit::remove_object(path, "/layers");
  expect_error([&] { StoreReader r(path); }, {path, "/layers", "missing"});
}

TEST_F(BadStore, MissingAttribute) {
  for (const char* a : {"num_kv_heads", "seq_len", "rope_applied", "dtype", "model", "creator"}) {
    write_random(path, make_meta(6, 2, 64, 41, 2), {.dtype = DType::f32}, {0});
    h5edit::remove_attr(path, "/", a);
    expect_error([&] { StoreReader r(path); }, {path, std::string("attribute ") + a, "missing"});
  }
}

TEST_F(BadStore, AttributeOfTheWrongType) {
  h5edit::set_attr_string(path, "/", "num_q_heads", "six");
  expect_error([&] { StoreReader r(path); }, {path, "num_q_heads", "expected an integer", "string"});
}

TEST_F(BadStore, WrongRank) {
  h5edit::write_f32(path, "/layers/00/q", {6, 41 * 64}, values(6 * 41 * 64));
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00/q", "rank 3", "rank 2"});
}

TEST_F(BadStore, HeadCountsDisagreeWithAttributes) {
  h5edit::set_attr_int(path, "/", "num_q_heads", 8);
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00/q", "num_q_heads=8", "[6, 41, 64]"});
  h5edit::set_attr_int(path, "/", "num_q_heads", 6);
  h5edit::write_f32(path, "/layers/01/v", {3, 41, 64}, values(3 * 41 * 64));
  expect_error([&] { StoreReader r(path); }, {path, "/layers/01/v", "num_kv_heads=2"});
}

TEST_F(BadStore, QHeadsNotAMultipleOfKvHeads) {
  h5edit::set_attr_int(path, "/", "num_kv_heads", 4);
  expect_error([&] { StoreReader r(path); }, {path, "num_q_heads=6", "not a multiple of num_kv_heads=4"});
}

TEST_F(BadStore, HeadDimOfKDiffersFromQ) {
  h5edit::write_f32(path, "/layers/00/k", {2, 41, 32}, values(2 * 41 * 32));
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00/k", "dim 32", "head_dim=64"});
}

TEST_F(BadStore, SeqLenDisagrees) {
  h5edit::set_attr_int(path, "/", "seq_len", 40);
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00/q", "seq_len=40"});
}

TEST_F(BadStore, ZeroLength) {
  h5edit::set_attr_int(path, "/", "seq_len", 0);
  expect_error([&] { StoreReader r(path); }, {path, "seq_len", "N = 0"});
}

TEST_F(BadStore, LayerIdBeyondNumLayers) {
  h5edit::set_attr_int(path, "/", "num_layers", 1);
  expect_error([&] { StoreReader r(path); }, {path, "/layers/01", "num_layers=1"});
}

TEST_F(BadStore, NonNumericLayerGroup) {
  h5edit::write_f32(path, "/layers/extra/q", {6, 41, 64}, values(6 * 41 * 64));
  expect_error([&] { StoreReader r(path); }, {path, "/layers/extra"});
}

TEST_F(BadStore, DtypeAttributeDisagreesWithData) {
  h5edit::set_attr_string(path, "/", "dtype", "float16");
  expect_error([&] { StoreReader r(path); }, {path, "/layers/00/q", "float32", "float16"});
  h5edit::set_attr_string(path, "/", "dtype", "int8");
  expect_error([&] { StoreReader r(path); }, {path, "attribute dtype", "int8"});
}

TEST_F(BadStore, TokensOfTheWrongLength) {
  h5edit::remove_object(path, "/tokens");
  h5edit::write_f32(path, "/tokens", {40}, values(40));
  expect_error([&] { StoreReader r(path); }, {path, "/tokens", "40", "seq_len=41"});
}

// ----- bad input on write -----------------------------------------------------------------------

TEST(StoreWrite, UnwritableOutputPath) {
  TempDir dir;
  const StoreMeta m = make_meta(2, 1, 64, 17, 1);
  const std::string p1 = dir.file("no/such/dir/out.h5");
  expect_error([&] { StoreWriter w(p1, m); }, {p1, "cannot write"});
  test::write_bytes(dir.file("plainfile"), "x");
  const std::string p2 = dir.file("plainfile/out.h5");
  expect_error([&] { StoreWriter w(p2, m); }, {p2});
  expect_error([&] { StoreWriter w(dir.path().string(), m); }, {dir.path().string(), "directory"});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"plainfile"});
}

TEST(StoreWrite, BadMetaIsRejected) {
  TempDir dir;
  const std::string p = dir.file("out.h5");
  StoreMeta m = make_meta(6, 4, 64, 17, 1);
  expect_error([&] { StoreWriter w(p, m); }, {p, "num_q_heads=6", "num_kv_heads=4"});
  m = make_meta(6, 2, 64, 0, 1);
  expect_error([&] { StoreWriter w(p, m); }, {p, "seq_len"});
  m = make_meta(6, 2, 64, 17, 1);
  expect_error([&] { StoreWriter w(p, m, {.dtype = DType::bf16}); }, {p, "bfloat16"});
  EXPECT_TRUE(dir.entries().empty());
}

TEST(StoreWrite, FailedWritesLeaveNothingBehind) {
  TempDir dir;
  const std::string p = dir.file("out.h5");
  const StoreMeta m = make_meta(6, 2, 64, 17, 2);
  const Tensor3 q = test::random_tensor(6, 17, 64), k = test::random_tensor(2, 17, 64);
  const Tensor3 k_bad = test::random_tensor(2, 17, 32), q_bad = test::random_tensor(4, 17, 64);
  {
    StoreWriter w(p, m);
    w.write_layer(0, q, k);
    expect_error([&] { w.write_layer(1, q, k_bad); }, {p, "/layers/01/k", "[2, 17, 32]"});
    expect_error([&] { w.write_layer(1, q_bad, k); }, {p, "/layers/01/q"});
    expect_error([&] { w.write_layer(0, q, k); }, {p, "layer 0 written twice"});
    expect_error([&] { w.write_layer(2, q, k); }, {p, "layer 2 outside"});
    expect_error([&] { w.write_tokens(std::vector<int32_t>(16, 1)); }, {p, "/tokens", "seq_len=17"});
    EXPECT_EQ(dir.entries().size(), 1u);  // only the temporary, never the final name
    EXPECT_NE(dir.entries()[0], "out.h5");
  }  // destroyed without commit
  EXPECT_TRUE(dir.entries().empty());
  {
    StoreWriter w(p, m);
    expect_error([&] { w.commit(); }, {p, "no layers written"});
  }
  EXPECT_TRUE(dir.entries().empty());
}

TEST(StoreWrite, CommitReplacesAnExistingFileAtomically) {
  TempDir dir;
  const std::string p = dir.file("out.h5");
  test::write_bytes(p, "old contents");
  const StoreMeta m = make_meta(2, 2, 64, 23, 1);
  {
    StoreWriter w(p, m);
    w.write_layer(0, test::random_tensor(2, 23, 64), test::random_tensor(2, 23, 64));
    EXPECT_EQ(test::read_bytes(p), "old contents");  // untouched until commit
    w.commit();
  }
  EXPECT_EQ(StoreReader(p).meta().seq_len, 23);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"out.h5"});
}

TEST(Store, TensorNames) {
  for (Tensor t : {Tensor::q, Tensor::k, Tensor::v}) EXPECT_EQ(parse_tensor(tensor_name(t)), t);
  expect_error([] { parse_tensor("x"); }, {"'x'"});
}

}  // namespace
}  // namespace proxyattn
