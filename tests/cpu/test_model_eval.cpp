// proxyattn-eval's accuracy sweep (apps/eval/eval_set.cpp, sweep.cpp): evaluation sets and the
// model identity, the points the registry gives, each point's masks (fixed sparsity reached, no
// empty row), and a whole sweep on the tiny random GGUF with a tokenizer (fixtures:
// tests/python/model_fixtures.py writes tiny_tok.gguf and tiny_eval.json with prepare_eval.py).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval_set.hpp"
#include "model_test_util.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/model/model.hpp"
#include "sweep.hpp"
#include "test_util.hpp"

namespace proxyattn::test {
namespace {

using nlohmann::json;

eval::ModelIdentity identity(const std::string& path) {
  const gguf::File f(path);
  return eval::identity_of(f, model::read_llama_config(f));
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

std::string write_json(const json& j, const std::string& name) {
  const std::string s = j.dump();
  return write_temp(std::vector<uint8_t>(s.begin(), s.end()), name);
}

// The message of the Error fn throws (a failure when it throws none).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

// A table of a report as rows of {column: cell}.
std::vector<std::map<std::string, json>> rows_of(const json& report, const std::string& table) {
  std::vector<std::map<std::string, json>> out;
  const json& t = report.at("tables").at(table);
  for (const json& r : t.at("rows")) {
    std::map<std::string, json> m;
    for (size_t i = 0; i < r.size(); ++i) m[t.at("columns")[i].get<std::string>()] = r[i];
    out.push_back(std::move(m));
  }
  return out;
}

TEST(EvalSet, PreparedSetMatchesItsModelOnly) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  const eval::EvalSet set = eval::read_eval_set(model_fixture("tiny_eval.json"));
  ASSERT_EQ(set.niah.size(), 2u);
  ASSERT_EQ(set.ppl.size(), 1u);
  EXPECT_EQ(set.niah[0].tokens.size(), 384u);
  EXPECT_EQ(set.ppl[0].score_last, 48);
  EXPECT_EQ(set.stop_ids, std::vector<int32_t>{300});
  const eval::ModelIdentity own = identity(model_fixture("tiny_tok.gguf"));
  EXPECT_EQ(own.vocab_size, 301);
  EXPECT_EQ(own.tokenizer, "gpt2/smollm");
  EXPECT_NO_THROW(eval::check_set_against_model(set, own, false));
  // The same weights without a tokenizer: another file, another tokenizer.
  EXPECT_NE(error_of([&] { eval::check_set_against_model(set, identity(model_fixture("tiny.gguf")), false); })
                .find("made for another model"),
            std::string::npos);
  eval::ModelIdentity other = own;
  other.vocab_fnv1a64 = "0000000000000000";  // same size, other pieces
  EXPECT_NE(error_of([&] { eval::check_set_against_model(set, other, false); }).find("vocab_fnv1a64"), std::string::npos);
  // A context too short for the prompt plus its answer tokens.
  other = own;
  other.context_length = 390;
  EXPECT_NE(error_of([&] { eval::check_set_against_model(set, other, false); }).find("exceed the context length 390"),
            std::string::npos);
  EXPECT_NO_THROW(eval::check_set_against_model(set, other, true));
}

TEST(EvalSet, RefusesMalformedFilesNamingTheField) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  const json good = read_json(model_fixture("tiny_eval.json"));
  struct Case {
    const char* what;
    std::function<void(json&)> edit;
  };
  const std::vector<Case> cases = {
      {"schema_version", [](json& j) { j["schema_version"] = 2; }},
      {"niah.cases[0].tokens", [](json& j) { j["niah"]["cases"][0]["tokens"].erase(0); }},
      {"niah.cases[1].tokens[3]: not an integer", [](json& j) { j["niah"]["cases"][1]["tokens"][3] = 1.5; }},
      {"niah.cases[0].tokens[0]: token id out of range", [](json& j) { j["niah"]["cases"][0]["tokens"][0] = 1LL << 40; }},
      {"niah.cases[0].max_new", [](json& j) { j["niah"]["cases"][0]["max_new"] = 1; }},
      {"niah.cases[0].answer_ids: empty", [](json& j) { j["niah"]["cases"][0]["answer_ids"] = json::array(); }},
      {"ppl.documents[0].score_last", [](json& j) { j["ppl"]["documents"][0]["score_last"] = 400; }},
      {"model.vocab_size: missing", [](json& j) { j["model"].erase("vocab_size"); }},
      {"repeated", [](json& j) { j["niah"]["cases"][1]["id"] = j["niah"]["cases"][0]["id"]; }},
      {"nothing to evaluate", [](json& j) {
         j["niah"]["cases"] = json::array();
         j["ppl"]["documents"] = json::array();
       }},
  };
  for (const Case& c : cases) {
    json j = good;
    c.edit(j);
    const std::string path = write_json(j, "bad_set.json");
    const std::string msg = error_of([&] { eval::read_eval_set(path); });
    EXPECT_NE(msg.find(c.what), std::string::npos) << c.what << " vs " << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  }
  const std::string garbage = write_temp({'{', 'x'}, "garbage.json");
  EXPECT_NE(error_of([&] { eval::read_eval_set(garbage); }).find("not a JSON document"), std::string::npos);
}

TEST(EvalSet, ContainsRun) {
  EXPECT_TRUE(eval::contains_run({5, 1, 2, 3, 9}, {1, 2, 3}));
  EXPECT_TRUE(eval::contains_run({1, 2, 3}, {1, 2, 3}));
  EXPECT_FALSE(eval::contains_run({1, 2, 9, 3}, {1, 2, 3}));  // not contiguous
  EXPECT_FALSE(eval::contains_run({1, 2}, {1, 2, 3}));
  EXPECT_FALSE(eval::contains_run({1, 2, 3}, {}));
}

eval::SweepConfig config_all(std::vector<double> sparsities, std::vector<int> groups) {
  eval::SweepConfig c;
  for (const MethodInfo* m : all_methods()) c.methods.push_back(m->name);
  c.sparsities = std::move(sparsities);
  c.gammas = {0.9, 0.95};
  c.groups = std::move(groups);
  c.estimator.block = 16;
  return c;
}

TEST(EvalSweep, PointsFromTheRegistry) {
  const eval::SweepConfig c = config_all({0.5, 0.9}, {1, 3});
  const std::vector<eval::Point> pts = eval::expand_points(c, 6);
  ASSERT_FALSE(pts.empty());
  EXPECT_TRUE(pts[0].full());
  EXPECT_EQ(pts[0].id, "full");
  std::set<std::string> ids;
  for (const auto& p : pts) EXPECT_TRUE(ids.insert(p.id).second) << "repeated " << p.id;
  for (const MethodInfo* m : all_methods()) {
    int fixed = 0, native = 0;
    for (const auto& p : pts) {
      if (p.method != m) continue;
      if (p.budget == "fixed") {
        ++fixed;
        EXPECT_EQ(p.rule, std::string(auto_density_name(m->auto_density)));
        EXPECT_TRUE(p.id.ends_with("/s0.5") || p.id.ends_with("/s0.9")) << p.id;
      } else {
        ++native;
        EXPECT_EQ(p.budget, m->exact_mass ? "native" : default_budget(*m)) << p.id;
      }
      EXPECT_EQ(p.id.find("/g3/") != std::string::npos, m->grouped() && p.groups == 3) << p.id;
    }
    const int g = m->grouped() ? 2 : 1;
    EXPECT_EQ(fixed, 2 * g) << m->name;
    EXPECT_GE(native, g) << m->name;
  }
  eval::SweepConfig nn = c;
  nn.native = false;
  size_t fixed_points = 0;
  for (const MethodInfo* m : all_methods()) fixed_points += 2 * (m->grouped() ? 2 : 1);
  EXPECT_EQ(eval::expand_points(nn, 6).size(), 1 + fixed_points);
  // What the registry refuses, before any work.
  nn = c;
  nn.groups = {4};
  EXPECT_NE(error_of([&] { eval::expand_points(nn, 6); }).find("--groups 4"), std::string::npos);
  nn = c;
  nn.methods = {"nope"};
  EXPECT_NE(error_of([&] { eval::expand_points(nn, 6); }).find("--methods"), std::string::npos);
  nn = c;
  nn.sparsities = {1.0};
  EXPECT_NE(error_of([&] { eval::expand_points(nn, 6); }).find("--sparsity"), std::string::npos);
  nn = c;
  nn.gammas = {0.0};
  EXPECT_NE(error_of([&] { eval::expand_points(nn, 6); }).find("--gamma"), std::string::npos);
  nn = c;
  nn.estimator.xattn.stride = 3;
  EXPECT_NE(error_of([&] { eval::expand_points(nn, 6); }).find("stride"), std::string::npos);
}

// Every method at a fixed sparsity reaches density 1 - s where its forced blocks allow, keeps
// every causal block at s = 0, and leaves no row without a key (the model must attend to one).
TEST(EvalSweep, PointMasksReachTheDensityAndAttendEverywhere) {
  const int H = 6, Hkv = 2, d = 32;
  const int64_t n = 517;  // 33 blocks of 16, the last one partial
  const Tensor3 q = random_tensor(H, n, d, 2.0f), k = random_tensor(Hkv, n, d), v = random_tensor(Hkv, n, d);
  const eval::SweepConfig c = config_all({0.0, 0.5, 0.95}, {1, 3});
  for (const eval::Point& p : eval::expand_points(c, H)) {
    int64_t filled = 0;
    const std::optional<BlockMask> m = eval::point_mask(p, c, q.view(), k.view(), &filled);
    if (p.full()) {
      EXPECT_FALSE(m.has_value());
      continue;
    }
    ASSERT_TRUE(m.has_value()) << p.id;
    ASSERT_EQ(m->heads(), H);
    ASSERT_EQ(m->seq_len(), n);
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < m->num_blocks(); ++i) EXPECT_FALSE(m->row(h, i).empty()) << p.id << " head " << h << " row " << i;
    EXPECT_NO_THROW(sparse_attention_cpu(q.view(), k.view(), v.view(), *m)) << p.id;
    if (p.budget != "fixed") continue;
    if (p.target_sparsity == 0.0) EXPECT_EQ(*m, BlockMask::causal(H, n, 16)) << p.id;
    if (p.target_sparsity == 0.0) EXPECT_EQ(filled, 0) << p.id;
    if (p.target_sparsity == 0.5) EXPECT_NEAR(m->density(), 0.5, 0.03) << p.id;
    if (p.target_sparsity == 0.95) {
      // 33 blocks: the forced sink and diagonal alone are 65 / 561 = 0.116; the oracle forces
      // none, but the rows it leaves empty keep their best block
      EXPECT_LT(m->density(), 0.12) << p.id;
      if (!p.method->forced_blocks) EXPECT_GT(filled, 0) << p.id;
    }
  }
}

TEST(EvalSweep, WholeSweepOnTheTinyModel) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  const eval::EvalSet set = eval::read_eval_set(model_fixture("tiny_eval.json"));
  auto m = model::load_model(model_fixture("tiny_tok.gguf"));
  eval::SweepConfig c;
  c.methods = {"oracle", "xattn", "proxy"};
  c.sparsities = {0.0, 0.5};
  c.gammas = {0.9};
  c.groups = {1};
  c.estimator.block = 16;
  c.dense_layers = 1;
  const auto points = eval::expand_points(c, m->config().n_head);
  eval::SweepOptions o;
  o.quiet = true;
  const json report = eval::run_sweep(*m, set, c, points, o);

  // The baseline by hand: perplexity of the document's last 48 tokens, the greedy answers.
  const auto& doc = set.ppl[0];
  model::ForwardOptions fo;
  fo.nll_begin = static_cast<int64_t>(doc.tokens.size()) - 1 - doc.score_last;
  const auto r = m->forward(doc.tokens, fo);
  double s = 0;
  for (double x : r.nll) s += x;
  const double want_ppl = std::exp(s / static_cast<double>(r.nll.size()));

  std::map<std::string, std::map<std::string, json>> pts;
  for (auto& row : rows_of(report, "points")) pts[row["point"].get<std::string>()] = row;
  ASSERT_EQ(pts.size(), points.size());
  const auto& full = pts.at("full");
  EXPECT_EQ(full.at("block_density").get<double>(), 1.0);
  EXPECT_EQ(full.at("element_density").get<double>(), 1.0);
  EXPECT_EQ(full.at("delta_ppl").get<double>(), 0.0);
  EXPECT_NEAR(full.at("ppl").get<double>(), want_ppl, 1e-9 * want_ppl);
  // Every causal block: the dense model to float rounding.
  EXPECT_NEAR(pts.at("oracle/fixed/s0").at("ppl").get<double>(), want_ppl, 1e-4 * want_ppl);
  EXPECT_EQ(pts.at("oracle/fixed/s0").at("block_density").get<double>(), 1.0);
  // A fixed sparsity in the sparse layers (layer 0 dense, its density 1 not counted).
  EXPECT_NEAR(pts.at("xattn/fixed/s0.5").at("block_density").get<double>(), 0.5, 0.03);
  EXPECT_NE(pts.at("xattn/fixed/s0.5").at("delta_ppl").get<double>(), 0.0);
  for (const auto& row : rows_of(report, "layers")) {
    EXPECT_EQ(row.at("dense").get<int>(), row.at("layer").get<int>() < 1 ? 1 : 0);
    if (row.at("layer").get<int>() == 0) EXPECT_EQ(row.at("block_density_mean").get<double>(), 1.0);
  }
  EXPECT_EQ(rows_of(report, "layers").size(), points.size() * 3);
  // The answers of the dense model, generated once more by hand.
  std::map<std::string, std::string> gen;
  for (const auto& row : rows_of(report, "niah"))
    if (row.at("point") == "full" || row.at("point") == "oracle/fixed/s0")
      gen[row.at("point").get<std::string>() + " " + row.at("case").get<std::string>()] = row.at("generated");
  for (const auto& cs : set.niah) {
    std::string want;
    for (int32_t t : m->generate(cs.tokens, cs.max_new, set.stop_ids)) {
      if (!want.empty()) want += ' ';
      want += std::to_string(t);
    }
    EXPECT_EQ(gen.at("full " + cs.id), want);
    EXPECT_EQ(gen.at("oracle/fixed/s0 " + cs.id), want);
  }
  const std::string md = eval::render_sweep_markdown(report);
  EXPECT_NE(md.find("| full | 0.000 | 1.000 |"), std::string::npos) << md;
}

}  // namespace
}  // namespace proxyattn::test
