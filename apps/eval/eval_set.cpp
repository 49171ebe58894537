// Reading and checking the evaluation set (schema: scripts/prepare_eval.py).
#include "eval_set.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"

namespace proxyattn::eval {

namespace {

using nlohmann::json;

constexpr const char* kSchema = "proxyattn-eval-set";
constexpr int kSchemaVersion = 1;

// Typed access to the document; every failure names the file and the field.
class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}
  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw Error("--eval-set " + path_ + ": " + where + ": " + what);
  }
  const json& at(const json& obj, const std::string& key, const std::string& where) const {
    if (!obj.is_object()) fail(where, "not an object");
    const auto it = obj.find(key);
    if (it == obj.end()) fail(where.empty() ? key : where + "." + key, "missing");
    return *it;
  }
  std::string str(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_string()) fail(join(where, key), "not a string");
    return v.get<std::string>();
  }
  int64_t integer(const json& obj, const std::string& key, const std::string& where, int64_t lo, int64_t hi) const {
    const json& v = at(obj, key, where);
    if (!v.is_number_integer()) fail(join(where, key), "not an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) fail(join(where, key), "out of range");
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi)
      fail(join(where, key), std::to_string(x) + " outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return x;
  }
  double number(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_number()) fail(join(where, key), "not a number");
    return v.get<double>();
  }
  const json& array(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_array()) fail(join(where, key), "not an array");
    return v;
  }
  // Token ids: integers that fit int32 (the vocabulary range is checked against the model).
  std::vector<int32_t> ids(const json& obj, const std::string& key, const std::string& where, bool nonempty) const {
    const json& a = array(obj, key, where);
    if (nonempty && a.empty()) fail(join(where, key), "empty");
    std::vector<int32_t> out;
    out.reserve(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      const json& v = a[i];
      const std::string w = join(where, key) + "[" + std::to_string(i) + "]";
      if (!v.is_number_integer()) fail(w, "not an integer token id");
      if (v.is_number_unsigned() ? v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())
                                 : (v.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
                                    v.get<int64_t>() > std::numeric_limits<int32_t>::max()))
        fail(w, "token id out of range");
      out.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    return out;
  }
  static std::string join(const std::string& where, const std::string& key) {
    return where.empty() ? key : where + "." + key;
  }

 private:
  std::string path_;
};

std::string fnv1a64(const std::vector<std::string>& pieces) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (i) h = (h ^ static_cast<uint8_t>('\n')) * 0x100000001B3ull;
    for (unsigned char c : pieces[i]) h = (h ^ c) * 0x100000001B3ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace

json ModelIdentity::to_json() const {
  return {{"file", file},          {"architecture", architecture},     {"name", name},
          {"vocab_size", vocab_size}, {"context_length", context_length}, {"tokenizer", tokenizer},
          {"vocab_fnv1a64", vocab_fnv1a64}};
}

ModelIdentity identity_of(const gguf::File& f, const model::ModelConfig& c) {
  ModelIdentity m;
  m.file = std::filesystem::path(f.path()).filename().string();
  m.architecture = c.arch;
  m.name = f.get_string("general.name", "");
  m.vocab_size = c.vocab_size;
  m.context_length = c.n_ctx;
  // The fallbacks prepare_eval.py uses for a file without them.
  m.tokenizer = f.get_string("tokenizer.ggml.model", "") + "/" + f.get_string("tokenizer.ggml.pre", "default");
  std::vector<std::string> pieces;
  if (const gguf::Value* t = f.find("tokenizer.ggml.tokens"); t && t->is_array())
    for (const gguf::Value& v : t->array) pieces.push_back(v.as_string(f.where("metadata 'tokenizer.ggml.tokens'")));
  m.vocab_fnv1a64 = fnv1a64(pieces);
  return m;
}

EvalSet read_eval_set(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) throw Error("--eval-set " + path + ": no such file");
  if (st.type() != std::filesystem::file_type::regular) throw Error("--eval-set " + path + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("--eval-set " + path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  const json doc = json::parse(ss.str(), nullptr, false);
  if (doc.is_discarded()) throw Error("--eval-set " + path + ": not a JSON document (write it with scripts/prepare_eval.py)");
  const Reader r(path);
  if (!doc.is_object()) r.fail("top level", "not an object");
  if (r.str(doc, "schema", "") != kSchema) r.fail("schema", "not '" + std::string(kSchema) + "'");
  if (r.integer(doc, "schema_version", "", 0, 1 << 20) != kSchemaVersion)
    r.fail("schema_version", "this tool reads version " + std::to_string(kSchemaVersion));

  EvalSet s;
  s.path = path;
  const json& m = r.at(doc, "model", "");
  s.model.file = r.str(m, "file", "model");
  s.model.architecture = r.str(m, "architecture", "model");
  s.model.name = r.str(m, "name", "model");
  s.model.tokenizer = r.str(m, "tokenizer", "model");
  s.model.vocab_fnv1a64 = r.str(m, "vocab_fnv1a64", "model");
  s.model.vocab_size = r.integer(m, "vocab_size", "model", 1, std::numeric_limits<int32_t>::max());
  s.model.context_length = r.integer(m, "context_length", "model", 1, std::numeric_limits<int64_t>::max());
  s.stop_ids = r.ids(doc, "stop_ids", "", false);

  const json& cases = r.array(r.at(doc, "niah", ""), "cases", "niah");
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string w = "niah.cases[" + std::to_string(i) + "]";
    const json& c = cases[i];
    NiahCase n;
    n.id = r.str(c, "id", w);
    n.length = r.integer(c, "length", w, 1, std::numeric_limits<int32_t>::max());
    n.depth = r.number(c, "depth", w);
    n.needle_position = r.integer(c, "needle_position", w, 0, n.length - 1);
    n.answer = r.str(c, "answer", w);
    n.answer_ids = r.ids(c, "answer_ids", w, true);
    n.max_new = static_cast<int>(r.integer(c, "max_new", w, 1, 4096));
    n.tokens = r.ids(c, "tokens", w, true);
    if (static_cast<int64_t>(n.tokens.size()) != n.length)
      r.fail(w + ".tokens", std::to_string(n.tokens.size()) + " ids, length says " + std::to_string(n.length));
    if (n.max_new < static_cast<int>(n.answer_ids.size()))
      r.fail(w + ".max_new", "fewer than the answer's " + std::to_string(n.answer_ids.size()) + " tokens");
    s.niah.push_back(std::move(n));
  }
  const json& docs = r.array(r.at(doc, "ppl", ""), "documents", "ppl");
  for (size_t i = 0; i < docs.size(); ++i) {
    const std::string w = "ppl.documents[" + std::to_string(i) + "]";
    PplDocument d;
    d.id = r.str(docs[i], "id", w);
    d.tokens = r.ids(docs[i], "tokens", w, true);
    d.score_last = r.integer(docs[i], "score_last", w, 1, std::numeric_limits<int64_t>::max());
    if (d.score_last > static_cast<int64_t>(d.tokens.size()) - 1)
      r.fail(w + ".score_last", std::to_string(d.score_last) + " but only " + std::to_string(d.tokens.size() - 1) +
                                    " tokens are predicted");
    s.ppl.push_back(std::move(d));
  }
  if (s.niah.empty() && s.ppl.empty()) r.fail("niah.cases, ppl.documents", "both empty: nothing to evaluate");
  std::vector<std::string> ids;
  for (const auto& c : s.niah) ids.push_back(c.id);
  for (const auto& d : s.ppl) ids.push_back(d.id);
  std::sort(ids.begin(), ids.end());
  if (const auto dup = std::adjacent_find(ids.begin(), ids.end()); dup != ids.end()) r.fail("id '" + *dup + "'", "repeated");
  return s;
}

void check_set_against_model(const EvalSet& set, const ModelIdentity& model, bool allow_overlength) {
  const std::string where = "--eval-set " + set.path + ": ";
  const auto differs = [&](const std::string& field, const std::string& want, const std::string& have) {
    if (want != have)
      throw Error(where + "made for another model: " + field + " '" + want + "', the model's is '" + have +
                  "' (prepare the set with this model: scripts/prepare_eval.py --gguf)");
  };
  differs("file", set.model.file, model.file);
  differs("architecture", set.model.architecture, model.architecture);
  differs("name", set.model.name, model.name);
  differs("vocab_size", std::to_string(set.model.vocab_size), std::to_string(model.vocab_size));
  differs("tokenizer", set.model.tokenizer, model.tokenizer);
  differs("vocab_fnv1a64", set.model.vocab_fnv1a64, model.vocab_fnv1a64);
  const auto in_vocab = [&](const std::vector<int32_t>& ids, const std::string& what) {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= model.vocab_size)
        throw Error(where + what + "[" + std::to_string(i) + "]: token id " + std::to_string(ids[i]) +
                    " outside the vocabulary [0, " + std::to_string(model.vocab_size) + ")");
  };
  in_vocab(set.stop_ids, "stop_ids");
  for (const auto& c : set.niah) {
    in_vocab(c.tokens, c.id + ".tokens");
    in_vocab(c.answer_ids, c.id + ".answer_ids");
    if (!allow_overlength && c.length + c.max_new > model.context_length)
      throw Error(where + c.id + ": " + std::to_string(c.length) + " tokens + " + std::to_string(c.max_new) +
                  " answer tokens exceed the context length " + std::to_string(model.context_length) +
                  " (--allow-overlength to run it anyway)");
  }
  for (const auto& d : set.ppl) {
    in_vocab(d.tokens, d.id + ".tokens");
    if (!allow_overlength && static_cast<int64_t>(d.tokens.size()) > model.context_length)
      throw Error(where + d.id + ": " + std::to_string(d.tokens.size()) + " tokens exceed the context length " +
                  std::to_string(model.context_length) + " (--allow-overlength to run it anyway)");
  }
}

bool contains_run(const std::vector<int32_t>& hay, const std::vector<int32_t>& needle) {
  return !needle.empty() && std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

}  // namespace proxyattn::eval
