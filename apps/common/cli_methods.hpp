#pragma once
// The method registry's options as command-line flags: one --<flag> per MethodOption
// (lib/include/proxyattn/methods.hpp), so a method's knobs have one name in JSON and on the
// command line, and a new method's flags appear without touching the tools.
#include <map>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "proxyattn/error.hpp"
#include "proxyattn/methods.hpp"

namespace proxyattn::cli {

// Registers the flags on `sub`; their text lands in values[flag].
inline void add_method_options(CLI::App& sub, std::map<std::string, std::string>& values) {
  const EstimatorConfig defaults;
  for (const MethodInfo* m : all_methods())
    for (const MethodOption& o : m->options) {
      if (o.flag.empty()) continue;
      const nlohmann::json d = o.get(defaults);
      sub.add_option("--" + o.flag, values[o.flag], o.help)->default_str(d.is_string() ? d.get<std::string>() : d.dump());
    }
}

// Applies the flags given on `sub` to c. A value is read as JSON (numbers, true/false) and
// otherwise as a string ("mean"); a bad one is "--<flag>: <what>".
inline void apply_method_options(const CLI::App& sub, const std::map<std::string, std::string>& values,
                                 EstimatorConfig& c) {
  for (const MethodInfo* m : all_methods())
    for (const MethodOption& o : m->options) {
      if (o.flag.empty() || sub.count("--" + o.flag) == 0) continue;
      const std::string& text = values.at(o.flag);
      nlohmann::json v = nlohmann::json::parse(text, nullptr, false);
      if (v.is_discarded() || v.is_object() || v.is_array()) v = text;
      try {
        o.set(c, v);
      } catch (const Error& e) {
        std::string what = e.what();
        const std::string prefix = "estimator config: ";
        if (what.rfind(prefix, 0) == 0) what = what.substr(prefix.size());
        throw Error("--" + o.flag + ": " + what);
      }
    }
}

}  // namespace proxyattn::cli
