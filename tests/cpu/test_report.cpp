// Reports (analysis/report.hpp) and the analysis driver (analysis/analyze.hpp): CSV/Markdown
// rendering, atomic writing, and an end-to-end run on a small store with the properties every
// report must satisfy (oracle recall 1 at its own budget, the fixed-density oracle on top,
// self-similarity 1, the oracle budget matching itself, zero error for full attention), plus
// the validation errors of the CLI contract.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "proxyattn/analysis/analyze.hpp"
#include "proxyattn/analysis/report.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/store.hpp"
#include "test_util.hpp"

namespace proxyattn::analysis {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path temp_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() /
                     ("proxyattn_test_report_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---- rendering ---------------------------------------------------------------------------------

TEST(Report, CsvQuotingNullsAndNumbers) {
  json r = report_skeleton("proxyattn-test", "unit");
  TableWriter t(r, "demo", {"name", "count", "value"});
  t.add({"plain", 3, 0.25});
  t.add({"with,comma", -1, num(std::nan(""))});
  t.add({"say \"hi\"", 0, 1.0 / 3.0});
  EXPECT_THROW(t.add({"short", 1}), Error);
  EXPECT_THROW(TableWriter(r, "demo", {"other", "columns"}), Error);
  EXPECT_EQ(t.column("value"), 2u);
  EXPECT_THROW(t.column("nope"), Error);
  EXPECT_EQ(render_csv(r["tables"]["demo"]),
            "name,count,value\n"
            "plain,3,0.25\n"
            "\"with,comma\",-1,nan\n"
            "\"say \"\"hi\"\"\",0,0.3333333333\n");
  EXPECT_TRUE(num(std::nan("")).is_null());
  EXPECT_TRUE(num(INFINITY).is_null());
  EXPECT_DOUBLE_EQ(num(0.5).get<double>(), 0.5);
}

TEST(Report, SkeletonHasProvenance) {
  const json r = report_skeleton("proxyattn-analyze", "recall");
  EXPECT_EQ(r["schema_version"], kReportSchemaVersion);
  EXPECT_EQ(r["tool"], "proxyattn-analyze");
  EXPECT_EQ(r["command"], "recall");
  for (const char* key : {"created_utc", "version", "git_sha", "library_versions", "device", "config", "stores",
                          "timing", "notes", "tables"})
    EXPECT_TRUE(r.contains(key)) << key;
  EXPECT_FALSE(r["git_sha"].get<std::string>().empty());
}

TEST(Report, MarkdownShowsRecallTableFromJsonOnly) {
  json r = report_skeleton("proxyattn-analyze", "recall");
  TableWriter t(r, "recall_vs_sparsity",
                {"selection", "method", "groups", "budget", "rule", "gamma", "target_sparsity", "stores", "layers",
                 "density", "sparsity", "sparsity_min", "sparsity_max", "element_density", "mass_recall_mean",
                 "mass_recall_p5", "block_recall_mean", "output_error_mean", "output_error_p95"});
  t.add({"proxy/g1/fixed/s0.9", "proxy", 1, "fixed", "scaled_dynamic", nullptr, 0.9, 1, 2, 0.1, 0.9, 0.9, 0.9,
         0.09, 0.875, 0.5, 0.8, nullptr, nullptr});
  t.add({"oracle/fixed/s0.9", "oracle", 0, "fixed", "layer_global", nullptr, 0.9, 1, 2, 0.1, 0.9, 0.9, 0.9, 0.09,
         0.9625, 0.75, 1.0, nullptr, nullptr});
  const std::string md = render_markdown(r);
  EXPECT_NE(md.find("## Recall vs sparsity"), std::string::npos) << md;
  EXPECT_NE(md.find("| proxy (g=1) | 0.875 (0.500) [0.900] |"), std::string::npos) << md;
  EXPECT_NE(md.find("| oracle | 0.963 (0.750) [0.900] |"), std::string::npos) << md;
  // No output error in the data: no error table.
  EXPECT_EQ(md.find("Output error"), std::string::npos);
}

TEST(Report, WriteReportIsCompleteAndRoundTrips) {
  const fs::path dir = temp_dir("write") / "nested" / "out";
  json r = report_skeleton("proxyattn-test", "unit");
  r["config"]["x"] = 1;
  TableWriter a(r, "alpha", {"k", "v"});
  a.add({"one", 1.5});
  a.add({"two", num(std::nan(""))});
  TableWriter b(r, "beta", {"n"});
  const auto files = write_report(r, dir.string());
  EXPECT_EQ(files.size(), 4u);
  for (const char* f : {"report.json", "report.md", "alpha.csv", "beta.csv"}) EXPECT_TRUE(fs::exists(dir / f)) << f;
  // No temporaries left behind.
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  const json back = json::parse(slurp(dir / "report.json"));
  EXPECT_EQ(back["tables"]["alpha"]["rows"][0], json({"one", 1.5}));
  EXPECT_TRUE(back["tables"]["alpha"]["rows"][1][1].is_null());
  EXPECT_EQ(back["tables"]["beta"]["rows"], json::array());
  EXPECT_EQ(back["config"]["x"], 1);
  EXPECT_EQ(back["schema_version"], kReportSchemaVersion);
  EXPECT_EQ(slurp(dir / "alpha.csv"), "k,v\none,1.5\ntwo,nan\n");
  // A path below a regular file cannot be a directory.
  std::ofstream(dir / "afile") << "x";
  EXPECT_THROW(write_report(r, (dir / "afile" / "sub").string()), Error);
  fs::remove_all(dir.parent_path().parent_path());
}

// ---- the driver on a small store -----------------------------------------------------------------

// Hq 6, Hkv 2 (GQA 3), d 64, N 300 (not a multiple of 64), three layers; V in every layer but
// the last one when with_v_everywhere is false.
fs::path small_store(const fs::path& dir, bool with_v_everywhere = true) {
  StoreMeta m;
  m.model = "tiny-test";
  m.source = "test_report.cpp";
  m.num_layers = 3;
  m.num_q_heads = 6;
  m.num_kv_heads = 2;
  m.head_dim = 64;
  m.seq_len = 300;
  m.dtype = DType::f32;
  m.prompt_sha256 = std::string(64, '0');
  m.creator = "test";
  const fs::path path = dir / (with_v_everywhere ? "tiny.h5" : "tiny_nov.h5");
  WriteOptions wo;
  wo.dtype = DType::f32;
  StoreWriter w(path.string(), m, wo);
  for (int l = 0; l < 3; ++l) {
    const Tensor3 q = test::random_tensor(6, 300, 64, 3.0f), k = test::random_tensor(2, 300, 64),
                  v = test::random_tensor(2, 300, 64);
    const ConstView vv = v.view();
    w.write_layer(l, q, k, (with_v_everywhere || l < 2) ? &vv : nullptr);
  }
  std::vector<int32_t> tokens(300);
  for (int t = 0; t < 300; ++t) tokens[static_cast<size_t>(t)] = t;
  w.write_tokens(tokens);
  w.commit();
  return path;
}

std::vector<std::map<std::string, json>> rows(const json& report, const std::string& table) {
  std::vector<std::map<std::string, json>> out;
  const json& t = report.at("tables").at(table);
  for (const auto& r : t.at("rows")) {
    std::map<std::string, json> m;
    for (size_t i = 0; i < t.at("columns").size(); ++i) m[t["columns"][i].get<std::string>()] = r[i];
    out.push_back(std::move(m));
  }
  return out;
}

double d(const json& v) { return v.is_null() ? std::nan("") : v.get<double>(); }

class AnalyzeRun : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(temp_dir("analyze"));
    store_ = new fs::path(small_store(*dir_));
    AnalyzeConfig c;
    c.command = "all";
    c.stores = {store_->string()};
    c.block = 64;
    c.sparsity = {0.0, 0.5, 0.8};
    c.quiet = true;
    report_ = new json(analyze(c));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
    delete store_;
    delete report_;
  }
  static fs::path* dir_;
  static fs::path* store_;
  static json* report_;
};
fs::path* AnalyzeRun::dir_ = nullptr;
fs::path* AnalyzeRun::store_ = nullptr;
json* AnalyzeRun::report_ = nullptr;

TEST_F(AnalyzeRun, HasEveryTableAndTheStoreAttributes) {
  const json& r = *report_;
  for (const char* t : {"similarity_pairs", "similarity_layers", "head_budget", "head_budget_layers", "proxy_fidelity",
                        "selections", "selection_summary", "budget_accuracy", "recall_vs_sparsity", "budget_summary",
                        "budget_heads", "fidelity_summary"})
    EXPECT_TRUE(r["tables"].contains(t)) << t;
  ASSERT_EQ(r["stores"].size(), 1u);
  EXPECT_EQ(r["stores"][0]["model"], "tiny-test");
  EXPECT_EQ(r["stores"][0]["seq_len"], 300);
  EXPECT_EQ(r["stores"][0]["proxy_groups"], json({1, 2, 3, 6}));
  EXPECT_EQ(r["config"]["block"], 64);
  // 3 layers x 36 head pairs.
  EXPECT_EQ(rows(r, "similarity_pairs").size(), 3u * 36u);
}

TEST_F(AnalyzeRun, SelfSimilarityIsOne) {
  for (const auto& p : rows(*report_, "similarity_pairs"))
    if (p.at("head_a") == p.at("head_b")) {
      EXPECT_DOUBLE_EQ(d(p.at("topk_overlap_1pct")), 1.0);
      EXPECT_DOUBLE_EQ(d(p.at("topk_overlap_5pct")), 1.0);
      EXPECT_NEAR(d(p.at("cosine")), 1.0, 1e-12);
      EXPECT_NEAR(d(p.at("spearman")), 1.0, 1e-12);
    }
}

TEST_F(AnalyzeRun, OracleRecallAtItsOwnBudgetIsOneAndFullAttentionHasNoError) {
  int native = 0, full = 0;
  for (const auto& s : rows(*report_, "selections")) {
    if (s.at("method") == "oracle" && s.at("budget") == "native") {
      EXPECT_DOUBLE_EQ(d(s.at("block_recall")), 1.0);
      EXPECT_GE(d(s.at("mass_recall")), d(s.at("gamma")) - 1e-6);
      ++native;
    }
    if (s.at("budget") == "fixed" && d(s.at("target_sparsity")) == 0.0) {
      EXPECT_DOUBLE_EQ(d(s.at("density")), 1.0);
      EXPECT_NEAR(d(s.at("mass_recall")), 1.0, 1e-5);
      EXPECT_LT(d(s.at("output_error")), 1e-5) << s.at("selection");
      ++full;
    }
  }
  EXPECT_EQ(native, 3 * 2 * 6);  // layers x gammas x heads
  EXPECT_GT(full, 0);
}

TEST_F(AnalyzeRun, FixedDensityOracleIsOnTop) {
  std::map<double, std::pair<double, double>> oracle;  // target -> (density, recall)
  const auto agg = rows(*report_, "recall_vs_sparsity");
  for (const auto& r : agg)
    if (r.at("method") == "oracle" && r.at("budget") == "fixed")
      oracle[d(r.at("target_sparsity"))] = {d(r.at("density")), d(r.at("mass_recall_mean"))};
  ASSERT_EQ(oracle.size(), 3u);
  int compared = 0;
  for (const auto& r : agg) {
    if (r.at("budget") != "fixed" || r.at("method") == "oracle") continue;
    const auto [od, orec] = oracle.at(d(r.at("target_sparsity")));
    // Only where the method kept no more blocks than the oracle (forced blocks may exceed it).
    if (d(r.at("density")) <= od + 1e-9) {
      EXPECT_GE(orec, d(r.at("mass_recall_mean")) - 1e-6) << r.at("selection");
      ++compared;
    }
  }
  EXPECT_GT(compared, 0);
}

TEST_F(AnalyzeRun, OracleBudgetMatchesTheOracleAndRecallIsMonotoneInGamma) {
  for (const auto& b : rows(*report_, "budget_accuracy")) {
    if (b.at("budget") == "oracle") {
      EXPECT_NEAR(d(b.at("rel_error")), 0.0, 1e-9);
      EXPECT_DOUBLE_EQ(d(b.at("rows_below_gamma")), 0.0);
      EXPECT_GE(d(b.at("mass_reached")), d(b.at("gamma")) - 1e-6);
    }
    EXPECT_GE(d(b.at("k_effective")), 1.0);
  }
  // The dynamic budget at the larger gamma keeps at least as much as at the smaller one.
  std::map<std::tuple<int, int, double>, double> dyn;
  for (const auto& s : rows(*report_, "selections"))
    if (s.at("selection").get<std::string>().rfind("proxy/g1/dynamic/gamma", 0) == 0)
      dyn[{s.at("layer").get<int>(), s.at("head").get<int>(), d(s.at("gamma"))}] = d(s.at("mass_recall"));
  for (const auto& [key, v] : dyn)
    if (std::get<2>(key) == 0.9) EXPECT_GE((dyn.at({std::get<0>(key), std::get<1>(key), 0.95})), v - 1e-12);
}

TEST(AnalyzeValidation, BadConfigGivesOneClearError) {
  AnalyzeConfig base;
  base.stores = {"whatever.h5"};
  auto expect_error = [&](auto mutate, const std::string& needle) {
    AnalyzeConfig c = base;
    mutate(c);
    try {
      validate_config(c);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
  };
  EXPECT_NO_THROW(validate_config(base));
  expect_error([](AnalyzeConfig& c) { c.methods = {"proxy", "magic"}; }, "--methods: unknown method 'magic'");
  expect_error([](AnalyzeConfig& c) { c.gamma = {0.9, 1.5}; }, "--gamma: 1.5 outside (0, 1]");
  expect_error([](AnalyzeConfig& c) { c.gamma = {0.0}; }, "--gamma: 0 outside (0, 1]");
  expect_error([](AnalyzeConfig& c) { c.sparsity = {1.0}; }, "--sparsity: 1 outside [0, 1)");
  expect_error([](AnalyzeConfig& c) { c.sparsity = {-0.1}; }, "--sparsity: -0.1 outside [0, 1)");
  expect_error([](AnalyzeConfig& c) { c.block = 100; }, "--block: 100");
  expect_error([](AnalyzeConfig& c) { c.density_rule = "best"; }, "--density-rule: unknown rule 'best'");
  expect_error([](AnalyzeConfig& c) { c.device = "cuda"; }, "--device cuda");
  expect_error([](AnalyzeConfig& c) { c.command = "speed"; }, "unknown subcommand 'speed'");
  expect_error([](AnalyzeConfig& c) { c.stores.clear(); }, "STORE");
}

TEST(AnalyzeValidation, StoreDependentErrorsBeforeAnyWork) {
  const fs::path dir = temp_dir("validation");
  const fs::path store = small_store(dir, false);
  auto expect_error = [&](AnalyzeConfig c, const std::string& needle) {
    c.quiet = true;
    try {
      analyze(c);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  AnalyzeConfig c;
  c.stores = {store.string()};
  c.block = 64;
  c.command = "recall";
  AnalyzeConfig g = c;
  g.groups = {1, 4};
  expect_error(g, "--groups: 4 does not divide the 6 query heads");
  AnalyzeConfig l = c;
  l.layers = {0, 5};
  expect_error(l, "--layers: layer 5 is not in");
  AnalyzeConfig m = c;
  m.stores = {(dir / "missing.h5").string()};
  expect_error(m, "missing.h5: no such store file");
  AnalyzeConfig bad = c;
  std::ofstream(dir / "garbage.h5") << "not an hdf5 file";
  bad.stores = {(dir / "garbage.h5").string()};
  expect_error(bad, "garbage.h5");
  AnalyzeConfig e = c;
  e.command = "error";
  expect_error(e, "the output error needs V");
  // `all` on the same store goes on without the error topic and says so.
  AnalyzeConfig a = c;
  a.command = "all";
  a.layers = {0, 2};
  a.methods = {"oracle"};
  a.quiet = true;
  const json r = analyze(a);
  bool noted = false;
  for (const auto& n : r["notes"]) noted |= n.get<std::string>().find("output error skipped") != std::string::npos;
  EXPECT_TRUE(noted);
  for (const auto& s : rows(r, "selections")) EXPECT_TRUE(s.at("output_error").is_null());
  fs::remove_all(dir);
}

}  // namespace
}  // namespace proxyattn::analysis
