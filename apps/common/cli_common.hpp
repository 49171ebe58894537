#pragma once
// Shared CLI plumbing for proxyattn-dump/-analyze/-bench (header-only). The contract of every
// tool: bad input gives exactly one line "<prog>: error: <what>" on stderr and a non-zero exit
// (2 for command-line parse errors, 1 for everything else); --help and --version print to stdout
// and exit 0.
//
//   int main(int argc, char** argv) {
//     CLI::App app{"...", "proxyattn-foo"};
//     proxyattn::cli::add_version_flag(app);
//     ... add options / subcommands ...
//     return proxyattn::cli::run_main(app, argc, argv, [&] { ...; return 0; });
//   }
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "proxyattn/error.hpp"
#include "proxyattn/version.hpp"

namespace proxyattn::cli {

inline constexpr int kExitFailure = 1;  // runtime error (bad file, bad data, I/O)
inline constexpr int kExitUsage = 2;    // command-line parse error

// Collapses newlines/tabs so a message is exactly one line.
inline std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

inline void print_error(std::string_view prog, std::string_view what) {
  const std::string line = std::string(prog) + ": error: " + one_line(std::string(what)) + "\n";
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

inline std::string version_string(std::string_view prog) {
  return std::string(prog) + " " + proxyattn::version() + " (git " + proxyattn::git_sha() + ", " +
         (proxyattn::built_with_cuda() ? "CUDA" : "CPU only") + ")";
}

inline void add_version_flag(CLI::App& app) {
  app.set_version_flag("--version", version_string(app.get_name()), "Print the version and exit");
}

// Parses argv. Returns an exit code when the program should stop now (help/version printed: 0;
// parse error printed as one line: 2), std::nullopt when it should go on.
inline std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  // CLI11 reports a mistyped subcommand as "A subcommand is required"; name it instead.
  if (app.get_require_subcommand_min() > 0 && argc > 1 && argv[1][0] != '-') {
    bool known = false;
    std::string names;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known = known || sub->check_name(argv[1]);
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      print_error(app.get_name(), std::string("unknown subcommand '") + argv[1] + "' (expected one of: " + names + ")");
      return kExitUsage;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    print_error(app.get_name(), e.what());
    return kExitUsage;
  }
  return std::nullopt;
}

// Runs fn (returning an exit code) and turns any exception into one stderr line, exit 1.
template <class F>
int guarded(std::string_view prog, F&& fn) {
  try {
    return std::forward<F>(fn)();
  } catch (const proxyattn::Error& e) {
    print_error(prog, e.what());
  } catch (const CLI::ParseError& e) {  // validation done by hand after parsing
    print_error(prog, e.what());
    return kExitUsage;
  } catch (const std::bad_alloc&) {
    // Sizes are checked before allocating (checked.hpp); this is the last line of defence.
    print_error(prog, "out of memory (an allocation failed after the memory check; try PROXYATTN_MEMORY_LIMIT)");
  } catch (const std::filesystem::filesystem_error& e) {
    // "<path>: <reason>", not the library's "filesystem error: ..." text.
    const std::string path = !e.path1().empty() ? e.path1().string() : std::string("file system");
    print_error(prog, path + ": " + e.code().message());
  } catch (const std::exception& e) {
    print_error(prog, e.what());
  } catch (...) {
    print_error(prog, "unknown failure");
  }
  return kExitFailure;
}

// parse() then guarded(fn).
template <class F>
int run_main(CLI::App& app, int argc, char** argv, F&& fn) {
  if (auto code = parse(app, argc, argv)) return *code;
  return guarded(app.get_name(), std::forward<F>(fn));
}

// A usage error discovered after parsing (e.g. two options that do not fit together):
// throw usage_error("--tokens", "...") to exit 2 with "--tokens: ...".
inline CLI::ValidationError usage_error(const std::string& flag, const std::string& what) {
  return CLI::ValidationError(flag, what);
}

namespace detail {
inline int64_t parse_int(std::string_view s, const std::string& flag, std::string_view whole) {
  if (s.empty()) throw proxyattn::Error(flag + ": expected an integer in '" + std::string(whole) + "'");
  size_t i = 0;
  bool neg = false;
  if (s[0] == '-' || s[0] == '+') {
    neg = s[0] == '-';
    i = 1;
  }
  if (i == s.size()) throw proxyattn::Error(flag + ": expected an integer in '" + std::string(whole) + "'");
  int64_t v = 0;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9')
      throw proxyattn::Error(flag + ": '" + std::string(whole) + "' is not a valid integer or range");
    if (v > (std::numeric_limits<int64_t>::max() - 9) / 10)
      throw proxyattn::Error(flag + ": '" + std::string(whole) + "' is out of range");
    v = v * 10 + (s[i] - '0');
  }
  return neg ? -v : v;
}
}  // namespace detail

// "a:b", "a:", ":b" or ":" -> [a, b) with defaults 0 and `end`; checked 0 <= a <= b <= end.
inline std::pair<int64_t, int64_t> parse_range(std::string_view s, int64_t end, const std::string& flag) {
  const size_t colon = s.find(':');
  if (colon == std::string_view::npos || s.find(':', colon + 1) != std::string_view::npos)
    throw proxyattn::Error(flag + ": expected a range a:b, got '" + std::string(s) + "'");
  const std::string_view as = s.substr(0, colon), bs = s.substr(colon + 1);
  const int64_t a = as.empty() ? 0 : detail::parse_int(as, flag, s);
  const int64_t b = bs.empty() ? end : detail::parse_int(bs, flag, s);
  if (a < 0 || b < a || b > end)
    throw proxyattn::Error(flag + ": range " + std::string(s) + " outside [0, " + std::to_string(end) + "]");
  return {a, b};
}

// "3", "0,4,8", "0-3,7" -> sorted unique ids, each checked in [0, limit).
inline std::vector<int> parse_int_list(std::string_view s, int limit, const std::string& flag) {
  std::vector<int> out;
  size_t pos = 0;
  if (s.empty()) throw proxyattn::Error(flag + ": empty list");
  while (pos <= s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    const std::string_view item = s.substr(pos, comma - pos);
    const size_t dash = item.find('-', 1);
    int64_t a = 0, b = 0;
    if (dash == std::string_view::npos) {
      a = b = detail::parse_int(item, flag, s);
    } else {
      a = detail::parse_int(item.substr(0, dash), flag, s);
      b = detail::parse_int(item.substr(dash + 1), flag, s);
    }
    if (a < 0 || b < a || b >= limit)
      throw proxyattn::Error(flag + ": '" + std::string(item) + "' outside [0, " + std::to_string(limit) + ")");
    for (int64_t v = a; v <= b; ++v) out.push_back(static_cast<int>(v));
    pos = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// "a, b,c" -> {"a", "b", "c"} (items trimmed); an empty item is an Error naming the flag.
inline std::vector<std::string> split_list(const std::string& s, const std::string& flag) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    std::string item = s.substr(pos, comma - pos);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    if (item.empty()) throw proxyattn::Error(flag + ": empty item in '" + s + "'");
    out.push_back(item);
    pos = comma + 1;
  }
  return out;
}

// "0.5,0.9" -> {0.5, 0.9}; an item that is not a whole number is an Error naming the flag.
inline std::vector<double> number_list(const std::string& s, const std::string& flag) {
  std::vector<double> out;
  for (const std::string& item : split_list(s, flag)) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size()) throw proxyattn::Error(flag + ": '" + item + "' is not a number");
    out.push_back(v);
  }
  return out;
}

inline std::vector<int> int_list(const std::string& s, const std::string& flag) {
  std::vector<int> out;
  for (double v : number_list(s, flag)) {
    if (v != std::floor(v) || std::abs(v) > 1e9) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%g", v);
      throw proxyattn::Error(flag + ": '" + buf + "' is not an integer");
    }
    out.push_back(static_cast<int>(v));
  }
  return out;
}

}  // namespace proxyattn::cli
