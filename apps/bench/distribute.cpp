// Case costs for the MPI split and the line-prefixed progress stream of the ranks.
#include "distribute.hpp"

#include <algorithm>
#include <cstdio>

#include "proxyattn/estimator.hpp"

namespace proxyattn::bench {

namespace {

// Work of an estimator relative to one causal attention (see distribute.hpp).
double estimator_units(const std::string& name, int groups, int stride, int64_t n) {
  const EstimatorConfig defaults;  // the bench runs the estimators with their defaults
  const double len = static_cast<double>(n);
  if (name == "proxy") return 1.0 / (2.0 * std::max(1, groups) * std::max(1, stride));
  if (name == "oracle") return 1.0;
  if (name == "xattn") return 1.0 / (2.0 * std::max(1, defaults.xattn.stride));
  if (name == "flexprefill") return std::min(1.0, defaults.flexprefill.last_q / len);
  if (name == "vslash") return std::min(1.0, defaults.vslash.last_q / len);
  return 0.0;  // pooled: block-level work only
}

}  // namespace

double case_cost(const Sweep& sw, const Case& c, double mask_density) {
  const Method& m = c.method;
  double u = 0;
  switch (m.family) {
    case Family::full: u = 1.0; break;
    case Family::sparse: u = m.mask_file.empty() ? m.density : mask_density; break;
    case Family::estimate: u = estimator_units(m.estimator, m.groups, m.query_stride, c.n); break;
    case Family::proxyattn:
      u = estimator_units("proxy", m.groups, m.query_stride, c.n) + (m.target_density ? m.density : 0.25);
      break;
  }
  const double n = static_cast<double>(c.n);
  return static_cast<double>(sw.model.num_q_heads) * sw.model.head_dim * (n * n * u + n * sw.block);
}

const char* cost_model_text() {
  return "longest-processing-time first over the cases by estimated cost Hq*d*(N^2*u + N*B), u = 1 (full), D "
         "(sparse@D), 1/(2gs) (estimate:proxy), 1 (oracle), 1/(2S) (xattn), last_q/N (flexprefill, vslash), 0 "
         "(pooled), 1/(2gs) + D (proxyattn@density=D), 1/(2gs) + 0.25 (proxyattn@gamma); skipped cases 0";
}

PrefixedStderr::PrefixedStderr(std::string prefix) : std::ostream(nullptr), buf_(std::move(prefix)) { rdbuf(&buf_); }

PrefixedStderr::~PrefixedStderr() { buf_.flush_line(); }

void PrefixedStderr::Buf::flush_line() {
  if (line_.empty()) return;
  if (line_.back() != '\n') line_ += '\n';
  const std::string out = prefix_ + line_;
  std::fwrite(out.data(), 1, out.size(), stderr);
  std::fflush(stderr);
  line_.clear();
}

int PrefixedStderr::Buf::overflow(int c) {
  if (c == traits_type::eof()) return traits_type::not_eof(c);
  line_ += static_cast<char>(c);
  if (c == '\n') flush_line();
  return c;
}

std::streamsize PrefixedStderr::Buf::xsputn(const char* s, std::streamsize n) {
  for (std::streamsize i = 0; i < n; ++i) overflow(static_cast<unsigned char>(s[i]));
  return n;
}

}  // namespace proxyattn::bench
