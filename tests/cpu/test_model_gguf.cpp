// GGUF reader: metadata of every value type, tensor table, dequantisation bit-exact with the
// `gguf` Python package (fixture quant.gguf), and hostile files (every truncation, corrupt
// counts, sizes and offsets, random byte flips): an Error naming the file, never a crash.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "model_test_util.hpp"
#include "proxyattn/dtype.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"
#include "test_util.hpp"

namespace proxyattn::test {
namespace {

using gguf::File;
using gguf::TensorType;

// A small valid file: two metadata entries, two F32 tensors ([3] and [4, 2]).
GgufBytes small_file() {
  GgufBytes g;
  g.header(2, 2).kv_str("general.architecture", "test").kv_u32("general.alignment", 32);
  g.tensor_info("a", {3}, 0, 0).tensor_info("b", {4, 2}, 0, 32);
  g.align().floats({1, 2, 3}).align().floats({1, 2, 3, 4, 5, 6, 7, 8});
  return g;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelGguf, ReadsSmallFile) {
  const std::string path = write_temp(small_file().b, "small.gguf");
  File f(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.get_string("general.architecture", ""), "test");
  ASSERT_EQ(f.tensors().size(), 2u);
  const auto& b = f.tensor("b");
  EXPECT_EQ(b.cols(), 4);
  EXPECT_EQ(b.rows(), 2);
  EXPECT_EQ(b.offset % 32, 0u);
  const auto v = f.dequantize(b);
  EXPECT_EQ(v, (std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}));
  std::vector<float> row(4);
  f.dequantize_rows(b, 1, 1, row.data());
  EXPECT_EQ(row, (std::vector<float>{5, 6, 7, 8}));
  EXPECT_NE(error_of([&] { f.dequantize_rows(b, 1, 2, row.data()); }).find("rows 1+2 outside"), std::string::npos);
  EXPECT_NE(error_of([&] { f.tensor("zzz"); }).find("tensor 'zzz' is missing"), std::string::npos);
  EXPECT_NE(error_of([&] { f.get_int("general.architecture"); }).find("expected an integer"), std::string::npos);
}

// Every prefix of a valid file is refused with an Error that names the file.
TEST(ModelGguf, EveryTruncationIsAnError) {
  const auto full = small_file().b;
  for (size_t n = 0; n < full.size(); ++n) {
    const std::vector<uint8_t> part(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
    const std::string path = write_temp(part, "trunc.gguf");
    const std::string e = error_of([&] { File f(path); });
    ASSERT_FALSE(e.empty()) << "prefix of " << n << " bytes was accepted";
    EXPECT_NE(e.find("gguf " + path + ": "), std::string::npos) << e;
  }
}

TEST(ModelGguf, CorruptFieldsAreErrors) {
  struct Case {
    const char* what;
    GgufBytes bytes;
    const char* expect;
  };
  std::vector<Case> cases;
  {
    GgufBytes g;
    g.put<uint32_t>(0x12345678).put<uint32_t>(3).put<uint64_t>(0).put<uint64_t>(0);
    cases.push_back({"magic", g, "not a GGUF file"});
  }
  {
    GgufBytes g;
    g.header(0, 0, 1);
    cases.push_back({"version 1", g, "version 1 is not supported"});
  }
  {
    GgufBytes g;
    g.header(0, 0, 0x03000000);
    cases.push_back({"big endian", g, "big-endian"});
  }
  {
    GgufBytes g;
    g.header(0, uint64_t{1} << 60);
    cases.push_back({"kv count", g, "cannot fit"});
  }
  {
    GgufBytes g;
    g.header(uint64_t{1} << 60, 0);
    cases.push_back({"tensor count", g, "cannot fit"});
  }
  {
    GgufBytes g;
    g.header(0, 1).put<uint64_t>(~uint64_t{0}).put<uint64_t>(0).put<uint64_t>(0);
    cases.push_back({"key length", g, "truncated"});
  }
  {
    GgufBytes g;
    g.header(0, 1).str("k").put<uint32_t>(99).put<uint32_t>(0);
    cases.push_back({"value type", g, "not a GGUF value type"});
  }
  {
    GgufBytes g;
    g.header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(4).put<uint64_t>(uint64_t{1} << 61);
    cases.push_back({"array length", g, "does not fit"});
  }
  {
    GgufBytes g;
    g.header(0, 1).str("k").put<uint32_t>(7).put<uint8_t>(2);
    cases.push_back({"bool", g, "not 0 or 1"});
  }
  {
    GgufBytes g;
    g.header(0, 2).kv_u32("k", 1).kv_u32("k", 2);
    cases.push_back({"duplicate key", g, "key appears twice"});
  }
  {
    GgufBytes g;
    g.header(0, 1).kv_u32("general.alignment", 24);
    cases.push_back({"alignment", g, "not a power of two"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {1, 1, 1, 1, 1}, 0, 0).align().floats({1});
    cases.push_back({"dims", g, "5 dimensions"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {0}, 0, 0).align().floats({1});
    cases.push_back({"zero dim", g, "has size 0"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0).align().floats({1});
    cases.push_back({"element overflow", g, "overflows"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {uint64_t{1} << 62}, 0, 0).align().floats({1});
    cases.push_back({"byte overflow", g, "overflows"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {2}, 77, 0).align().floats({1, 2});
    cases.push_back({"type", g, "unknown tensor type id 77"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {16}, static_cast<uint32_t>(TensorType::Q4_0), 0).align().floats({1, 2, 3, 4, 5});
    cases.push_back({"block", g, "not a multiple of the Q4_0 block"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {2}, 0, 4).align().floats({1, 2, 3});
    cases.push_back({"misaligned", g, "not a multiple of the alignment"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {2}, 0, 64).align().floats({1, 2});
    cases.push_back({"data past end", g, "past the end of the file"});
  }
  {
    GgufBytes g;
    g.header(1, 0).tensor_info("t", {2}, 0, ~uint64_t{0} - 31).align().floats({1, 2});
    cases.push_back({"offset overflow", g, "past the end of the file"});
  }
  {
    GgufBytes g;
    g.header(2, 0).tensor_info("t", {2}, 0, 0).tensor_info("t", {2}, 0, 32).align().floats({1, 2});
    cases.push_back({"duplicate tensor", g, "name appears twice"});
  }
  for (auto& c : cases) {
    const std::string path = write_temp(c.bytes.b, std::string("corrupt.gguf"));
    const std::string e = error_of([&] { File f(path); });
    EXPECT_NE(e.find(c.expect), std::string::npos) << c.what << ": got '" << e << "'";
    EXPECT_EQ(e.rfind("gguf " + path + ": ", 0), 0u) << c.what << ": " << e;
  }
  EXPECT_NE(error_of([] { File f("/nonexistent/x.gguf"); }).find("cannot open"), std::string::npos);
}

// Random byte flips of a valid file: opening either fails with an Error or succeeds, and then
// every tensor dequantises inside the mapping (ASan builds check the bounds).
TEST(ModelGguf, RandomCorruptionNeverCrashes) {
  const auto full = small_file().b;
  std::mt19937_64 g(rng()());
  int opened = 0;
  for (int it = 0; it < 400; ++it) {
    auto b = full;
    const int flips = 1 + static_cast<int>(g() % 4);
    for (int k = 0; k < flips; ++k) b[g() % b.size()] = static_cast<uint8_t>(g());
    const std::string path = write_temp(b, "fuzz.gguf");
    try {
      File f(path);
      for (const auto& t : f.tensors())
        if (gguf::type_traits(static_cast<uint32_t>(t.type))->dequantizable && t.elements < (1 << 20))
          (void)f.dequantize(t);
      ++opened;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(opened, 0);
}

// Same over the metadata (every value type, arrays, nested arrays) and tensor table of the
// fixture file.
TEST(ModelGguf, RandomCorruptionOfMetadataNeverCrashes) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  std::ifstream in(model_fixture("quant.gguf"), std::ios::binary);
  const std::vector<uint8_t> full((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const uint64_t header = File(model_fixture("quant.gguf")).data_offset();
  ASSERT_GT(header, 64u);
  std::mt19937_64 g(rng()());
  int opened = 0;
  for (int it = 0; it < 300; ++it) {
    auto b = full;
    const int flips = 1 + static_cast<int>(g() % 3);
    for (int k = 0; k < flips; ++k) b[g() % header] = static_cast<uint8_t>(g());
    const std::string path = write_temp(b, "fuzz_meta.gguf");
    try {
      File f(path);
      for (const auto& t : f.tensors())
        if (gguf::type_traits(static_cast<uint32_t>(t.type))->dequantizable && t.elements < (1 << 20))
          (void)f.dequantize(t);
      ++opened;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(opened, 0);
}

TEST(ModelGguf, TypeTable) {
  EXPECT_EQ(gguf::type_name(3), "Q4_1");
  EXPECT_EQ(gguf::type_name(4), "type 4");
  EXPECT_EQ(gguf::type_traits(14)->block_bytes, 210);
  EXPECT_EQ(gguf::type_traits(30)->block_elems, 1);
  EXPECT_FALSE(gguf::type_traits(10)->dequantizable);
  std::vector<float> out(256);
  std::vector<uint8_t> raw(84);
  EXPECT_NE(error_of([&] { gguf::dequantize_row(TensorType::Q2_K, raw.data(), out.data(), 256); }).find("cannot dequantise Q2_K"),
            std::string::npos);
}

// Hand-computed blocks.
TEST(ModelGguf, DequantHandBlocks) {
  std::vector<uint8_t> b(20);
  const uint16_t d = float_to_half(0.5f), m = float_to_half(-1.0f);
  std::memcpy(b.data(), &d, 2);
  std::memcpy(b.data() + 2, &m, 2);
  for (int j = 0; j < 16; ++j) b[4 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  std::vector<float> y(32);
  gguf::dequantize_row(TensorType::Q4_1, b.data(), y.data(), 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * j - 1.0f);
    EXPECT_EQ(y[j + 16], 0.5f * (15 - j) - 1.0f);
  }
  std::vector<uint8_t> q8(34);
  std::memcpy(q8.data(), &d, 2);
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16));
  gguf::dequantize_row(TensorType::Q8_0, q8.data(), y.data(), 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], 0.5f * (j - 16));
}

TEST(ModelGguf, MetadataOfEveryType) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  File f(model_fixture("quant.gguf"));
  EXPECT_EQ(f.get_int("test.u8"), 200);
  EXPECT_EQ(f.get_int("test.i8"), -100);
  EXPECT_EQ(f.get_int("test.u16"), 60000);
  EXPECT_EQ(f.get_int("test.i16"), -30000);
  EXPECT_EQ(f.get_int("test.u32"), 4000000000LL);
  EXPECT_EQ(f.get_int("test.i32"), -2000000000LL);
  EXPECT_EQ(f.get_double("test.f32", 0), 1.5);
  EXPECT_EQ(f.get("test.u64").u, (uint64_t{1} << 63) + 5);
  EXPECT_NE(error_of([&] { f.get_int("test.u64"); }).find("too large"), std::string::npos);
  EXPECT_EQ(f.get_int("test.i64"), -(int64_t{1} << 62));
  EXPECT_EQ(f.get_double("test.f64", 0), -2.25);
  EXPECT_TRUE(f.get("test.bool").as_bool("b"));
  EXPECT_EQ(f.get_string("test.string", ""), "h\xc3\xa9llo");
  const auto& ints = f.get("test.ints");
  ASSERT_TRUE(ints.is_array());
  ASSERT_EQ(ints.array.size(), 3u);
  EXPECT_EQ(ints.array[1].as_int("x"), -2);
  const auto& strs = f.get("test.strings");
  ASSERT_EQ(strs.array.size(), 3u);
  EXPECT_EQ(strs.array[1].s, "");
  EXPECT_EQ(strs.array[2].s, "xyz");
  const auto& nested = f.get("test.nested");
  ASSERT_TRUE(nested.is_array());
  ASSERT_EQ(nested.elem_type, gguf::ValueType::array);
  ASSERT_EQ(nested.array.size(), 2u);
  EXPECT_EQ(nested.array[0].array.size(), 2u);
  EXPECT_EQ(nested.array[1].array[0].as_int("x"), 3);
}

// Every dequantiser equals the gguf package's on random blocks, bit for bit.
TEST(ModelGguf, DequantMatchesGgufPackage) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  File f(model_fixture("quant.gguf"));
  int checked = 0;
  for (const auto& t : f.tensors()) {
    if (t.name.rfind("x.", 0) != 0) continue;
    const std::string type = t.name.substr(2);
    EXPECT_EQ(gguf::type_name(static_cast<uint32_t>(t.type)), type);
    const auto got = f.dequantize(t);
    const auto want = f.dequantize(f.tensor("ref." + type));
    ASSERT_EQ(got.size(), want.size()) << type;
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i)
      if (!(got[i] == want[i])) ++bad;
    EXPECT_EQ(bad, 0) << type << ": " << bad << " of " << got.size() << " values differ";
    ++checked;
  }
  EXPECT_EQ(checked, 11);
}

}  // namespace
}  // namespace proxyattn::test
