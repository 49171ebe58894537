#pragma once
// The evaluation set of `proxyattn-eval sweep`: the JSON file scripts/prepare_eval.py writes
// (schema "proxyattn-eval-set" version 1, documented there) — NIAH prompts and perplexity
// documents as token ids of one model's tokenizer, with that model's identity.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxyattn/model/model.hpp"

namespace proxyattn::gguf {
class File;
}

namespace proxyattn::eval {

// Who tokenised the set: the GGUF's file name, general.architecture, general.name, vocabulary
// size, "tokenizer.ggml.model/tokenizer.ggml.pre" and FNV-1a 64 of its vocabulary pieces.
struct ModelIdentity {
  std::string file, architecture, name, tokenizer, vocab_fnv1a64;
  int64_t vocab_size = 0, context_length = 0;
  nlohmann::json to_json() const;
};
// The identity of an open GGUF (the same fields prepare_eval.py writes).
ModelIdentity identity_of(const gguf::File& f, const model::ModelConfig& c);

struct NiahCase {
  std::string id;
  int64_t length = 0;
  double depth = 0;
  int64_t needle_position = 0;
  std::string answer;               // the needle's number, as text
  std::vector<int32_t> answer_ids;  // the needle's tokens that spell it
  int max_new = 0;                  // tokens generated for the answer
  std::vector<int32_t> tokens;
};

struct PplDocument {
  std::string id;
  int64_t score_last = 0;  // the last K predicted tokens are scored
  std::vector<int32_t> tokens;
};

struct EvalSet {
  std::string path;
  ModelIdentity model;
  std::vector<int32_t> stop_ids;
  std::vector<NiahCase> niah;
  std::vector<PplDocument> ppl;
};

// Reads and checks the file's structure; Error "--eval-set <path>: <field>: <what>".
EvalSet read_eval_set(const std::string& path);

// Refuses a set made for another model (identity), holding token ids outside [0, vocab), or
// prompts (plus the answer tokens) over the context length unless allow_overlength.
void check_set_against_model(const EvalSet& set, const ModelIdentity& model, bool allow_overlength);

// True when `needle` occurs in `hay` as a contiguous run (the NIAH criterion: the greedy answer
// holds the needle's own tokens for its number).
bool contains_run(const std::vector<int32_t>& hay, const std::vector<int32_t>& needle);

}  // namespace proxyattn::eval
