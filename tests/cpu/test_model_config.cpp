// Model configs: the shipped ones load with the published shapes; every bad config names the
// file and the field.
#include <gtest/gtest.h>

#include <string>

#include "proxyattn/model_config.hpp"
#include "store_test_util.hpp"

namespace proxyattn {
namespace {

using test::expect_error;

std::string config_path(const std::string& name) {
  return std::string(PROXYATTN_SOURCE_DIR) + "/configs/models/" + name + ".json";
}

TEST(ModelConfig, ShippedConfigs) {
  struct Want {
    const char* name;
    int layers, hq, hkv, d;
    double theta;
    int64_t ctx;
  };
  for (const Want& w : {Want{"llama-3.1-8b", 32, 32, 8, 128, 500000.0, 131072},
                        Want{"qwen2.5-7b", 28, 28, 4, 128, 1000000.0, 131072},
                        Want{"smollm2-135m", 30, 9, 3, 64, 100000.0, 8192}}) {
    const ModelConfig c = load_model_config(config_path(w.name));
    EXPECT_EQ(c.name, w.name);
    EXPECT_EQ(c.num_layers, w.layers) << w.name;
    EXPECT_EQ(c.num_q_heads, w.hq) << w.name;
    EXPECT_EQ(c.num_kv_heads, w.hkv) << w.name;
    EXPECT_EQ(c.head_dim, w.d) << w.name;
    EXPECT_EQ(c.rope_theta, w.theta) << w.name;
    EXPECT_EQ(c.max_context, w.ctx) << w.name;
    EXPECT_TRUE(c.has_full_shape()) << w.name;  // the prefill benchmark's shapes
  }
}

const char* kGood = R"({"name": "m", "num_layers": 4, "num_q_heads": 12, "num_kv_heads": 4,
                        "head_dim": 64, "rope_theta": 10000, "max_context": 4096})";

std::string with(const std::string& field, const std::string& value) {
  // Replace the value of one field in kGood (or drop it when value is empty).
  std::string s = kGood;
  const size_t k = s.find("\"" + field + "\"");
  const size_t colon = s.find(':', k), end = s.find_first_of(",}", colon);
  if (value.empty()) {
    const size_t comma = s.find(',', colon);
    return s.erase(k, (comma == std::string::npos ? end : comma + 1) - k);
  }
  return s.replace(colon + 1, end - colon - 1, " " + value);
}

TEST(ModelConfig, GoodJsonLoads) {
  test::TempDir dir;
  const std::string p = dir.file("m.json");
  test::write_bytes(p, kGood);
  const ModelConfig c = load_model_config(p);
  EXPECT_EQ(c.num_q_heads, 12);
  EXPECT_EQ(c.rope_theta, 10000.0);  // an integer is accepted as a number
}

TEST(ModelConfig, WholeModelFieldsAreOptionalButComplete) {
  test::TempDir dir;
  const std::string p = dir.file("m.json");
  test::write_bytes(p, kGood);
  EXPECT_FALSE(load_model_config(p).has_full_shape());
  std::string full = kGood;
  full.replace(full.rfind('}'), 1, R"(, "hidden_size": 768, "intermediate_size": 2048, "vocab_size": 32000,
                                     "rms_norm_eps": 1e-6, "qkv_bias": true})");
  test::write_bytes(p, full);
  const ModelConfig c = load_model_config(p);
  EXPECT_TRUE(c.has_full_shape());
  EXPECT_EQ(c.hidden_size, 768);
  EXPECT_EQ(c.intermediate_size, 2048);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_TRUE(c.qkv_bias);
  // One of the three without the others, a wrong type, a bad epsilon: the file and the field.
  std::string partial = kGood;
  partial.replace(partial.rfind('}'), 1, R"(, "hidden_size": 768})");
  test::write_bytes(p, partial);
  expect_error([&] { load_model_config(p); }, {p, "'intermediate_size'"});
  std::string bias = full;
  bias.replace(bias.find("true"), 4, "1");
  test::write_bytes(p, bias);
  expect_error([&] { load_model_config(p); }, {p, "'qkv_bias'"});
  std::string eps = full;
  eps.replace(eps.find("1e-6"), 4, "-1");
  test::write_bytes(p, eps);
  expect_error([&] { load_model_config(p); }, {p, "'rms_norm_eps'"});
}

TEST(ModelConfig, BadConfigsNameFileAndField) {
  test::TempDir dir;
  const std::string p = dir.file("bad.json");
  struct Case {
    std::string text, field;
  };
  for (const Case& c : {Case{with("num_layers", ""), "num_layers"},
                        Case{with("head_dim", "\"64\""), "head_dim"},
                        Case{with("num_q_heads", "12.5"), "num_q_heads"},
                        Case{with("num_q_heads", "10"), "num_q_heads"},  // not a multiple of 4
                        Case{with("num_kv_heads", "0"), "num_kv_heads"},
                        Case{with("head_dim", "63"), "head_dim"},          // odd: RoPE pairs
                        Case{with("rope_theta", "-1"), "rope_theta"},
                        Case{with("max_context", "-5"), "max_context"},
                        Case{with("name", "3"), "name"},
                        Case{with("num_layers", "99999999999"), "num_layers"}}) {
    test::write_bytes(p, c.text);
    expect_error([&] { load_model_config(p); }, {p, "'" + c.field + "'"});
  }
  test::write_bytes(p, "{\"name\": \"m\", ");
  expect_error([&] { load_model_config(p); }, {p, "invalid JSON"});
  test::write_bytes(p, "[1, 2]");
  expect_error([&] { load_model_config(p); }, {p, "object"});
  expect_error([&] { load_model_config(dir.file("missing.json")); }, {dir.file("missing.json"), "no such file"});
  const std::string y = dir.file("m.yaml");
  test::write_bytes(y, "name: m");
  expect_error([&] { load_model_config(y); }, {y, ".yaml"});
}

TEST(ModelConfig, TomlWhenAvailable) {
  test::TempDir dir;
  const std::string p = dir.file("m.toml");
  test::write_bytes(p,
                    "name = \"t\"\nnum_layers = 2\nnum_q_heads = 8\nnum_kv_heads = 2\nhead_dim = 128\n"
                    "rope_theta = 500000.0\nmax_context = 65536\n");
  if (!model_config_supports_toml()) {
    expect_error([&] { load_model_config(p); }, {p, "toml++"});
    return;
  }
  const ModelConfig c = load_model_config(p);
  EXPECT_EQ(c.name, "t");
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.max_context, 65536);
  test::write_bytes(p, "name = \"t\"\nnum_layers = \"two\"\n");
  expect_error([&] { load_model_config(p); }, {p, "'num_layers'"});
  test::write_bytes(p, "name = \"t\nbroken");
  expect_error([&] { load_model_config(p); }, {p, "invalid TOML"});
}

}  // namespace
}  // namespace proxyattn
