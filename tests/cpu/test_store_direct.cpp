// Direct chunk reads (store.cpp, "Direct chunk reads"): the reader decodes chunks itself
// (Fletcher-32, gzip, shuffle; float16, bfloat16 and float32 of either byte order) in parallel,
// and must give exactly what H5Dread gives (PROXYATTN_H5_DIRECT=0), bit for bit, with the same
// errors: our stores, other chunk shapes and filter orders, edge chunks, windows that start and
// end inside chunks, NaN payloads, chunks whose gzip HDF5 skipped, corrupt chunks; and every
// element of a read's (uninitialized) tensor written on both paths.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
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

constexpr int kGzip = 1, kShuffle = 2, kFletcher = 3;  // H5Z_FILTER_DEFLATE, _SHUFFLE, _FLETCHER32

// PROXYATTN_H5_DIRECT=0 while alive: every read through H5Dread.
class H5DreadOnly {
 public:
  H5DreadOnly() {
    if (const char* e = std::getenv("PROXYATTN_H5_DIRECT")) old_ = e;
    ::setenv("PROXYATTN_H5_DIRECT", "0", 1);
  }
  ~H5DreadOnly() {
    if (old_) ::setenv("PROXYATTN_H5_DIRECT", old_->c_str(), 1);
    else ::unsetenv("PROXYATTN_H5_DIRECT");
  }
  H5DreadOnly(const H5DreadOnly&) = delete;
  H5DreadOnly& operator=(const H5DreadOnly&) = delete;

 private:
  std::optional<std::string> old_;
};

StoreMeta make_meta(int hq, int hkv, int d, int64_t n, DType dt) {
  StoreMeta m;
  m.model = "direct-read test";
  m.source = "unit test";
  m.num_layers = 1;
  m.num_q_heads = hq;
  m.num_kv_heads = hkv;
  m.head_dim = d;
  m.seq_len = n;
  m.dtype = dt;
  return m;
}

void expect_same_bits(const Tensor3& a, const Tensor3& b, const std::string& what) {
  ASSERT_EQ(a.heads(), b.heads()) << what;
  ASSERT_EQ(a.tokens(), b.tokens()) << what;
  ASSERT_EQ(a.dim(), b.dim()) << what;
  int64_t bad = 0;
  for (int64_t i = 0; i < a.size(); ++i) bad += std::memcmp(a.data() + i, b.data() + i, sizeof(float)) != 0;
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << a.size() << " values differ";
}

// Layer 0 read whole (read_layer) directly and through H5Dread: the same bits.
void expect_layer_reads_alike(const StoreReader& r) {
  const LayerData fast = r.read_layer(0);
  H5DreadOnly off;
  const LayerData slow = r.read_layer(0);
  expect_same_bits(fast.q, slow.q, "read_layer q");
  expect_same_bits(fast.k, slow.k, "read_layer k");
  expect_same_bits(*fast.v, *slow.v, "read_layer v");
}

// Reads a window both ways; the direct read must have decoded every chunk itself when
// `all_direct`, and have read the window whole through H5Dread otherwise.
Tensor3 read_both_ways(const StoreReader& r, Tensor t, int64_t h0, int64_t h1, int64_t t0, int64_t t1,
                       bool all_direct = true) {
  const std::string what = std::string(tensor_name(t)) + " heads " + std::to_string(h0) + ":" + std::to_string(h1) +
                           " tokens " + std::to_string(t0) + ":" + std::to_string(t1);
  const ReadStats s0 = r.read_stats();
  Tensor3 fast = r.read(0, t, h0, h1, t0, t1);
  const ReadStats s1 = r.read_stats();
  if (all_direct) {
    EXPECT_GT(s1.direct_chunks, s0.direct_chunks) << what;
    EXPECT_EQ(s1.h5dread_chunks, s0.h5dread_chunks) << what;
    EXPECT_EQ(s1.h5dread_windows, s0.h5dread_windows) << what;
  } else {
    EXPECT_TRUE(s1.h5dread_windows == s0.h5dread_windows + 1 || s1.h5dread_chunks > s0.h5dread_chunks) << what;
  }
  H5DreadOnly off;
  const Tensor3 slow = r.read(0, t, h0, h1, t0, t1);
  EXPECT_EQ(r.read_stats().h5dread_windows, s1.h5dread_windows + 1) << what;
  expect_same_bits(fast, slow, what);
  return fast;
}

// The windows every layout is read with: whole, starting and ending inside chunks, the last
// (edge) chunk, single tokens on either side of a chunk boundary, one head.
void read_windows(const StoreReader& r, int64_t hq, int64_t hkv, int64_t n, bool all_direct = true) {
  read_both_ways(r, Tensor::q, 0, hq, 0, n, all_direct);
  read_both_ways(r, Tensor::k, 0, hkv, 0, n, all_direct);
  read_both_ways(r, Tensor::q, 1, hq - 1, 37, n - 41, all_direct);
  read_both_ways(r, Tensor::q, hq - 1, hq, n - 5, n, all_direct);
  read_both_ways(r, Tensor::k, hkv - 1, hkv, 63, 64, all_direct);
  read_both_ways(r, Tensor::k, 0, 1, 64, 65, all_direct);
  read_both_ways(r, Tensor::v, 0, hkv, 1, n - 1, all_direct);
  // And whole layers.
  expect_layer_reads_alike(r);
}

TEST(StoreDirectRead, OurStoresReadExactlyAsThroughH5Dread) {
  const int64_t hq = 6, hkv = 2, d = 64, n = 777;  // N not a multiple of the chunk
  for (DType dt : {DType::f16, DType::f32})
    for (bool gzip : {false, true})
      for (int64_t chunk : {int64_t{64}, int64_t{100}}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + (gzip ? " gzip" : "") + " chunk " + std::to_string(chunk));
        TempDir dir;
        const std::string path = dir.file("s.h5");
        const Tensor3 q = test::random_tensor(hq, n, d, 3.0f), k = test::random_tensor(hkv, n, d, 1.0f),
                      v = test::random_tensor(hkv, n, d, 1.0f);
        {
          StoreWriter w(path, make_meta(hq, hkv, d, n, dt), {.dtype = dt, .chunk_tokens = chunk, .gzip = gzip});
          const ConstView vv = v.view();
          w.write_layer(0, q, k, &vv);
          w.commit();
        }
        StoreReader r(path);
        read_windows(r, hq, hkv, n);
        const Tensor3 got = r.read(0, Tensor::q, 0, hq, 0, n);
        for (int64_t i = 0; i < got.size(); ++i)
          ASSERT_EQ(got.data()[i], round_to(dt, q.data()[i])) << "value " << i;
      }
}

struct LayoutCase {
  const char* name;
  h5edit::DatasetSpec spec;
  bool direct;  // read chunk by chunk (otherwise whole through H5Dread)
};

class StoreDirectLayouts : public ::testing::TestWithParam<LayoutCase> {};

// Datasets as other writers (h5py) may store them: every chunk shape, filter order, dtype and
// byte order reads exactly as through H5Dread, and as written.
TEST_P(StoreDirectLayouts, ReadExactlyAsThroughH5Dread) {
  const LayoutCase& c = GetParam();
  const int64_t hq = 6, hkv = 3, d = 64, n = 301;
  TempDir dir;
  const std::string path = dir.file("s.h5");
  const DType base = c.spec.dtype == DType::f32 ? DType::f32 : DType::f16;
  const Tensor3 q = test::random_tensor(hq, n, d, 3.0f), k = test::random_tensor(hkv, n, d, 1.0f);
  {
    StoreWriter w(path, make_meta(hq, hkv, d, n, base), {.dtype = base});
    w.write_layer(0, q, k, nullptr);
    w.commit();
  }
  auto put = [&](const char* name, const Tensor3& x) {
    h5edit::write_float(path, std::string("/layers/00/") + name,
                        {static_cast<uint64_t>(x.heads()), static_cast<uint64_t>(n), static_cast<uint64_t>(d)},
                        x.storage(), c.spec);
  };
  put("q", q);
  put("k", k);
  put("v", k);
  if (c.spec.dtype == DType::bf16) h5edit::set_attr_string(path, "/", "dtype", "bfloat16");
  StoreReader r(path);
  read_windows(r, hq, hkv, n, c.direct);
  const Tensor3 got = r.read(0, Tensor::q, 0, hq, 0, n);
  for (int64_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got.data()[i], round_to(c.spec.dtype, q.data()[i])) << "value " << i;
}

h5edit::DatasetSpec spec(DType dt, bool be, std::vector<uint64_t> chunk, std::vector<int> filters) {
  return {dt, be, std::move(chunk), std::move(filters)};
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, StoreDirectLayouts,
    ::testing::Values(
        LayoutCase{"bf16_shuffle_gzip_fletcher", spec(DType::bf16, false, {1, 64, 64}, {kShuffle, kGzip, kFletcher}), true},
        LayoutCase{"bf16_be_fletcher_first_split_dim", spec(DType::bf16, true, {2, 50, 32}, {kFletcher, kShuffle, kGzip}), true},
        LayoutCase{"f16_be_fletcher_3heads", spec(DType::f16, true, {3, 33, 64}, {kFletcher}), true},
        LayoutCase{"f16_no_filters", spec(DType::f16, false, {1, 128, 64}, {}), true},
        LayoutCase{"f16_gzip_only", spec(DType::f16, false, {2, 77, 48}, {kGzip}), true},
        LayoutCase{"f16_shuffle_fletcher", spec(DType::f16, false, {1, 300, 64}, {kShuffle, kFletcher}), true},
        LayoutCase{"f32_be_shuffle_gzip_fletcher", spec(DType::f32, true, {2, 40, 64}, {kShuffle, kGzip, kFletcher}), true},
        LayoutCase{"f32_gzip_fletcher_whole_heads", spec(DType::f32, false, {3, 301, 64}, {kGzip, kFletcher}), true},
        LayoutCase{"f16_contiguous", spec(DType::f16, false, {}, {}), false},
        LayoutCase{"f32_be_contiguous", spec(DType::f32, true, {}, {}), false}),
    [](const auto& info) { return std::string(info.param.name); });

// Random 16-bit patterns: NaNs keep their payloads on both paths, the counts of NaN and Inf (and
// so the error) are the same, and chunks whose gzip output is larger than the chunk (random bits
// do not compress; HDF5 1.10 keeps the larger output) are decoded too.
TEST(StoreDirectRead, NanPayloadsAndIncompressibleChunks) {
  const int64_t hq = 4, hkv = 2, d = 64, n = 200;
  for (DType dt : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    TempDir dir;
    const std::string path = dir.file("s.h5");
    {
      StoreWriter w(path, make_meta(hq, hkv, d, n, DType::f16), {.dtype = DType::f16});
      const Tensor3 q = test::random_tensor(hq, n, d), k = test::random_tensor(hkv, n, d);
      w.write_layer(0, q, k, nullptr);
      w.commit();
    }
    std::uniform_int_distribution<int> bits(0, 65535);
    auto random_bits = [&](int64_t heads) {
      std::vector<float> x(static_cast<size_t>(heads * n * d));
      for (auto& v : x) {
        const auto b = static_cast<uint16_t>(bits(test::rng()));
        v = dt == DType::f16 ? half_to_float(b) : bf16_to_float(b);
      }
      return x;
    };
    const auto s = spec(dt, false, {1, 64, 64}, {kShuffle, kGzip, kFletcher});
    auto dims = [&](int64_t heads) {
      return std::vector<uint64_t>{static_cast<uint64_t>(heads), static_cast<uint64_t>(n), static_cast<uint64_t>(d)};
    };
    h5edit::write_float(path, "/layers/00/q", dims(hq), random_bits(hq), s);
    h5edit::write_float(path, "/layers/00/k", dims(hkv), random_bits(hkv), s);
    if (dt == DType::bf16) h5edit::set_attr_string(path, "/", "dtype", "bfloat16");
    ASSERT_GT(h5edit::chunk_location(path, "/layers/00/q", 0).size, 64u * 64u * 2u + 4u) << "random bits compressed";

    StoreReader lax(path, {.allow_nonfinite = true});
    const Tensor3 got = read_both_ways(lax, Tensor::q, 0, hq, 0, n);
    EXPECT_GT(count_nonfinite(got).nan, 0);
    read_both_ways(lax, Tensor::k, 1, 2, 10, 150);

    StoreReader strict(path);
    std::string fast_error, slow_error;
    try {
      strict.read_layer(0);
    } catch (const Error& e) {
      fast_error = e.what();
    }
    {
      H5DreadOnly off;
      try {
        strict.read_layer(0);
      } catch (const Error& e) {
        slow_error = e.what();
      }
    }
    EXPECT_NE(fast_error.find("NaN"), std::string::npos) << fast_error;
    EXPECT_EQ(fast_error, slow_error);
  }
}

// H5_checksum_fletcher32 as H5checksum.c writes it, word by word: the reference for the test
// below (the reader computes it another way).
uint32_t reference_fletcher32(const unsigned char* p, size_t bytes) {
  uint32_t sum1 = 0, sum2 = 0;
  size_t len = bytes / 2;
  while (len) {
    size_t block = len > 360 ? 360 : len;
    len -= block;
    do {
      sum1 += (static_cast<uint32_t>(p[0]) << 8) | p[1];
      p += 2;
      sum2 += sum1;
    } while (--block);
    sum1 = (sum1 & 0xffff) + (sum1 >> 16);
    sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  }
  if (bytes % 2) {
    sum1 += static_cast<uint32_t>(*p) << 8;
    sum2 += sum1;
    sum1 = (sum1 & 0xffff) + (sum1 >> 16);
    sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  }
  sum1 = (sum1 & 0xffff) + (sum1 >> 16);
  sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  return (sum2 << 16) | sum1;
}

void put_le32(std::string& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// The checksum HDF5 stored is the reference's; one with the bytes of each 16-bit half swapped
// (HDF5 <= 1.6.2) is accepted as HDF5 accepts it; any other is an error.
TEST(StoreDirectRead, Fletcher32AsHdf5DefinesIt) {
  const int64_t hq = 2, hkv = 1, d = 64, n = 150;
  for (bool gzip : {false, true}) {
    SCOPED_TRACE(gzip ? "gzip" : "plain");
    TempDir dir;
    const std::string path = dir.file("s.h5");
    {
      StoreWriter w(path, make_meta(hq, hkv, d, n, DType::f16), {.dtype = DType::f16, .chunk_tokens = 64, .gzip = gzip});
      const Tensor3 q = test::random_tensor(hq, n, d), k = test::random_tensor(hkv, n, d);
      w.write_layer(0, q, k, nullptr);
      w.commit();
    }
    std::string bytes = test::read_bytes(path);
    for (uint64_t i = 0; i < 6; ++i) {  // every chunk of q (odd compressed sizes among them)
      const auto loc = h5edit::chunk_location(path, "/layers/00/q", i);
      const auto* p = reinterpret_cast<const unsigned char*>(bytes.data() + loc.offset);
      uint32_t stored = 0;
      for (int b = 0; b < 4; ++b) stored |= static_cast<uint32_t>(p[loc.size - 4 + static_cast<size_t>(b)]) << (8 * b);
      ASSERT_EQ(reference_fletcher32(p, loc.size - 4), stored) << "chunk " << i;
    }
    const auto loc = h5edit::chunk_location(path, "/layers/00/q", 1);
    const uint32_t f = reference_fletcher32(reinterpret_cast<const unsigned char*>(bytes.data() + loc.offset), loc.size - 4);
    put_le32(bytes, loc.offset + loc.size - 4, ((f & 0x00ff00ffu) << 8) | ((f >> 8) & 0x00ff00ffu));
    test::write_bytes(path, bytes);
    {
      StoreReader r(path);
      read_both_ways(r, Tensor::q, 0, hq, 0, n);
    }
    put_le32(bytes, loc.offset + loc.size - 4, f ^ 0x00010000u);
    test::write_bytes(path, bytes);
    StoreReader r(path);
    expect_error([&] { r.read(0, Tensor::q, 0, hq, 0, n); }, {path, "/layers/00/q", "read failed", "Fletcher32"});
  }
}

// Chunks with filters skipped (the filter mask HDF5 keeps per chunk: bit i, filter i): a skipped
// gzip (what an optional filter that fails leaves) is decoded directly; a skipped Fletcher-32
// goes through H5Dread; both read as H5Dread reads them.
TEST(StoreDirectRead, FiltersSkippedInTheChunkMask) {
  const int64_t hq = 2, hkv = 1, d = 64, n = 100;
  TempDir dir;
  const std::string path = dir.file("s.h5");
  const Tensor3 q = test::random_tensor(hq, n, d), k = test::random_tensor(hkv, n, d);
  {
    StoreWriter w(path, make_meta(hq, hkv, d, n, DType::f16), {.dtype = DType::f16, .chunk_tokens = 64, .gzip = true});
    w.write_layer(0, q, k, nullptr);
    w.commit();
  }
  // q's filters are shuffle, gzip, Fletcher-32. Chunk (0, 0) stored shuffled and checksummed but
  // not compressed (mask 0x2); chunk (1, 64), the edge chunk of head 1, shuffled only (0x6).
  auto shuffled = [&](int64_t h, int64_t t0) {
    const size_t m = 64 * 64;
    std::string b(2 * m, '\0');
    for (size_t i = 0; i < m; ++i) {
      const int64_t t = t0 + static_cast<int64_t>(i) / 64, c = static_cast<int64_t>(i) % 64;
      const uint16_t bits = t < n ? float_to_half(q(h, t, c)) : 0;  // edge chunk: stored whole
      b[i] = static_cast<char>(bits & 0xff);
      b[m + i] = static_cast<char>(bits >> 8);
    }
    return b;
  };
  std::string c0 = shuffled(0, 0);
  const uint32_t f = reference_fletcher32(reinterpret_cast<const unsigned char*>(c0.data()), c0.size());
  c0.resize(c0.size() + 4);
  put_le32(c0, c0.size() - 4, f);
  h5edit::write_chunk_raw(path, "/layers/00/q", {0, 0, 0}, 0x2, c0);
  h5edit::write_chunk_raw(path, "/layers/00/q", {1, 64, 0}, 0x6, shuffled(1, 64));
  EXPECT_EQ(h5edit::chunk_location(path, "/layers/00/q", 0).filter_mask, 0x2u);
  StoreReader r(path);
  read_both_ways(r, Tensor::q, 0, 1, 0, n);  // the gzip-less chunk: direct
  const ReadStats s0 = r.read_stats();
  const Tensor3 got = read_both_ways(r, Tensor::q, 0, hq, 0, n, false);
  EXPECT_EQ(r.read_stats().h5dread_chunks, s0.h5dread_chunks + 1);  // the checksum-less one
  for (int64_t i = 0; i < got.size(); ++i) ASSERT_EQ(got.data()[i], round_to(DType::f16, q.data()[i])) << i;
}

// A flipped byte in a chunk: one error line naming the dataset, the one H5Dread gives; the
// chunks and datasets around it still read.
TEST(StoreDirectRead, CorruptChunkIsTheErrorH5DreadGives) {
  const int64_t hq = 4, hkv = 2, d = 64, n = 333;
  for (bool gzip : {false, true})
    for (double where : {0.0, 0.5, 0.999}) {
      SCOPED_TRACE(std::string(gzip ? "gzip" : "plain") + " at " + std::to_string(where));
      TempDir dir;
      const std::string path = dir.file("s.h5");
      {
        StoreWriter w(path, make_meta(hq, hkv, d, n, DType::f16), {.dtype = DType::f16, .chunk_tokens = 64, .gzip = gzip});
        const Tensor3 q = test::random_tensor(hq, n, d), k = test::random_tensor(hkv, n, d);
        const ConstView vv = k.view();
        w.write_layer(0, q, k, &vv);
        w.commit();
      }
      // Chunk 7 of k (6 chunks a head): head 1, tokens 64..127.
      const auto loc = h5edit::chunk_location(path, "/layers/00/k", 7);
      std::string bytes = test::read_bytes(path);
      bytes[loc.offset + static_cast<uint64_t>(where * static_cast<double>(loc.size - 1))] ^= 0x10;
      test::write_bytes(path, bytes);

      StoreReader r(path);
      std::string fast_error, slow_error;
      expect_error([&] { r.read_layer(0); }, {path, "/layers/00/k", "read failed"});
      try {
        r.read(0, Tensor::k, 0, hkv, 0, n);
      } catch (const Error& e) {
        fast_error = e.what();
      }
      EXPECT_GE(r.read_stats().h5dread_chunks, 1);
      {
        H5DreadOnly off;
        try {
          r.read(0, Tensor::k, 0, hkv, 0, n);
        } catch (const Error& e) {
          slow_error = e.what();
        }
      }
      EXPECT_EQ(fast_error, slow_error);
      read_both_ways(r, Tensor::q, 0, hq, 0, n);
      read_both_ways(r, Tensor::k, 0, 1, 0, n);
      read_both_ways(r, Tensor::k, 1, 2, 0, 64);
      read_both_ways(r, Tensor::k, 1, 2, 128, n);
    }
}

// Reads allocate their tensor without zero-filling it (Tensor3::uninitialized): every element
// must then be written, on the direct path (parallel chunk decode, edge chunks, chunks that split
// the head dim) and on the H5Dread path. Values are nonzero, so an element left unwritten fails
// the comparison whether its memory came back as fresh zero pages or as an old block; freed
// NaN-filled blocks of the same size make the latter likelier (best effort only).
void poison_heap(int64_t n) {
  float* p = new float[static_cast<size_t>(n)];
  std::fill(p, p + n, std::numeric_limits<float>::quiet_NaN());
  asm volatile("" : : "r"(p) : "memory");  // keep the stores and the allocation
  delete[] p;
}

struct UninitCase {
  const char* name;
  std::optional<h5edit::DatasetSpec> spec;  // none: our writer's layout
  bool direct;
};

TEST(StoreDirectRead, UninitializedReadsWriteEveryElement) {
  const int64_t hq = 6, hkv = 3, d = 40, n = 301;  // d and N not multiples of any chunk
  const std::vector<UninitCase> cases = {
      {"ours_f16_chunk64", std::nullopt, true},
      {"f16_split_dim_shuffle_fletcher", spec(DType::f16, false, {2, 37, 16}, {kShuffle, kFletcher}), true},
      {"bf16_be_whole_rows_fletcher", spec(DType::bf16, true, {1, 64, 40}, {kFletcher}), true},
      {"f32_be_split_dim_shuffle", spec(DType::f32, true, {3, 50, 24}, {kShuffle}), true},
      {"f16_contiguous", spec(DType::f16, false, {}, {}), false},
  };
  // Nonzero, finite values of either sign (nonzero after rounding to 16 bits too).
  auto nonzero = [](int64_t h) {
    Tensor3 t(h, n, d);
    std::uniform_real_distribution<float> u(0.25f, 4.0f);
    for (int64_t i = 0; i < t.size(); ++i) t.data()[i] = (i % 3 == 0 ? -1.0f : 1.0f) * u(test::rng());
    return t;
  };
  for (const UninitCase& c : cases) {
    SCOPED_TRACE(c.name);
    const DType dt = c.spec ? c.spec->dtype : DType::f16;
    const Tensor3 src[3] = {nonzero(hq), nonzero(hkv), nonzero(hkv)};  // q, k, v
    TempDir dir;
    const std::string path = dir.file("s.h5");
    {
      const DType base = dt == DType::f32 ? DType::f32 : DType::f16;
      StoreWriter w(path, make_meta(hq, hkv, d, n, base), {.dtype = base, .chunk_tokens = 64});
      const ConstView vv = src[2].view();
      w.write_layer(0, src[0], src[1], &vv);
      w.commit();
    }
    if (c.spec) {
      for (int i = 0; i < 3; ++i)
        h5edit::write_float(path, std::string("/layers/00/") + "qkv"[i],
                            {static_cast<uint64_t>(src[i].heads()), static_cast<uint64_t>(n), static_cast<uint64_t>(d)},
                            src[i].storage(), *c.spec);
      if (dt == DType::bf16) h5edit::set_attr_string(path, "/", "dtype", "bfloat16");
    }
    StoreReader r(path);
    struct Win {
      Tensor t;
      int64_t h0, h1, t0, t1;
    };
    const Win wins[] = {{Tensor::q, 0, hq, 0, n},       {Tensor::k, 0, hkv, 0, n},         {Tensor::v, 0, hkv, 0, n},
                        {Tensor::q, 1, hq - 1, 13, n - 17}, {Tensor::q, hq - 1, hq, n - 1, n}, {Tensor::v, 2, 3, 36, 75}};
    for (const Win& w : wins) {
      const std::string what = std::string(tensor_name(w.t)) + " heads " + std::to_string(w.h0) + ":" +
                               std::to_string(w.h1) + " tokens " + std::to_string(w.t0) + ":" + std::to_string(w.t1);
      // The reference: a zero-initialized tensor holding the values as stored.
      const Tensor3& x = src[static_cast<int>(w.t)];
      Tensor3 want(w.h1 - w.h0, w.t1 - w.t0, d);
      for (int64_t h = 0; h < want.heads(); ++h)
        for (int64_t t = 0; t < want.tokens(); ++t)
          for (int64_t e = 0; e < d; ++e) want(h, t, e) = round_to(dt, x(w.h0 + h, w.t0 + t, e));
      const int64_t size = want.size();

      const ReadStats s0 = r.read_stats();
      poison_heap(size);
      const Tensor3 fast = r.read(0, w.t, w.h0, w.h1, w.t0, w.t1);
      const ReadStats s1 = r.read_stats();
      if (c.direct) {  // the path under test really decoded the chunks itself
        EXPECT_GT(s1.direct_chunks, s0.direct_chunks) << what;
        EXPECT_EQ(s1.h5dread_chunks + s1.h5dread_windows, s0.h5dread_chunks + s0.h5dread_windows) << what;
      } else {
        EXPECT_EQ(s1.h5dread_windows, s0.h5dread_windows + 1) << what;
      }
      Tensor3 slow;
      {
        H5DreadOnly off;
        poison_heap(size);
        slow = r.read(0, w.t, w.h0, w.h1, w.t0, w.t1);
      }
      EXPECT_EQ(r.read_stats().h5dread_windows, s1.h5dread_windows + 1) << what;
      EXPECT_EQ(count_nonfinite(fast).nan, 0) << what;
      EXPECT_EQ(count_nonfinite(slow).nan, 0) << what;
      expect_same_bits(fast, want, what + " (direct vs reference)");
      expect_same_bits(slow, want, what + " (H5Dread vs reference)");
      expect_same_bits(fast, slow, what + " (direct vs H5Dread)");
    }
    // Whole layers too (read_layer: the same reads, one after another).
    expect_layer_reads_alike(r);
  }
}

// The fill constructor keeps its values whatever memory it is given; uninitialized() has the
// shape asked for; to_tensor (uninitialized, then copied) equals its source view.
TEST(Tensor3Storage, FillConstructorAndUninitializedShape) {
  for (int64_t n : {int64_t{7}, int64_t{1} << 12, int64_t{5} << 20}) {  // small, heap, mmap sizes
    poison_heap(n);
    const Tensor3 z(1, n, 1);
    EXPECT_EQ(std::count(z.storage().begin(), z.storage().end(), 0.0f), n);
    poison_heap(n);
    const Tensor3 f(1, 1, n, -2.5f);
    EXPECT_EQ(std::count(f.storage().begin(), f.storage().end(), -2.5f), n);
  }
  const Tensor3 u = Tensor3::uninitialized(3, 5, 7);
  EXPECT_EQ(u.heads(), 3);
  EXPECT_EQ(u.tokens(), 5);
  EXPECT_EQ(u.dim(), 7);
  EXPECT_EQ(u.size(), 105);
  EXPECT_EQ(static_cast<int64_t>(u.storage().size()), 105);
  EXPECT_EQ(Tensor3::uninitialized(0, 5, 7).size(), 0);
  EXPECT_THROW(Tensor3::uninitialized(-1, 5, 7), Error);

  const Tensor3 src = test::random_tensor(4, 33, 24);
  const Tensor3 t = to_tensor(src.view().slice_tokens(3, 30));  // strided: not the whole buffer
  ASSERT_EQ(t.tokens(), 27);
  for (int64_t h = 0; h < 4; ++h)
    for (int64_t r = 0; r < 27; ++r)
      for (int64_t e = 0; e < 24; ++e) ASSERT_EQ(t(h, r, e), src(h, r + 3, e));
}

}  // namespace
}  // namespace proxyattn
