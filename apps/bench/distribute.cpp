// Case costs for the MPI split and the line-prefixed progress stream of the ranks.
#include "distribute.hpp"

#include <algorithm>
#include <cstdio>

#include "proxyattn/methods.hpp"

namespace proxyattn::bench {

namespace {

// Work of an estimator relative to one causal attention: the registry's cost model, with the
// estimators' defaults (what the bench runs) and the case's groups / query stride.
double estimator_units(const Sweep& sw, const MethodInfo& method, int groups, int stride, int64_t n) {
  EstimatorConfig c;
  c.block = sw.block;
  if (method.set_groups) method.set_groups(c, std::max(1, groups));
  c.proxy.query_stride = std::max(1, stride);
  AttentionShape s;
  s.q_heads = sw.model.num_q_heads;
  s.kv_heads = sw.model.num_kv_heads;
  s.head_dim = sw.model.head_dim;
  s.seq_len = n;
  return method.cost(s, c);
}

}  // namespace

double case_cost(const Sweep& sw, const Case& c, double mask_density) {
  const Method& m = c.method;
  double u = 0;
  switch (m.family) {
    case Family::full: u = 1.0; break;
    case Family::sparse: u = m.mask_file.empty() ? m.density : mask_density; break;
    case Family::estimate: u = estimator_units(sw, find_method(m.estimator), m.groups, m.query_stride, c.n); break;
    case Family::proxyattn:
      u = estimator_units(sw, proxyattn_method(), m.groups, m.query_stride, c.n) + (m.target_density ? m.density : 0.25);
      break;
  }
  const double n = static_cast<double>(c.n);
  return static_cast<double>(sw.model.num_q_heads) * sw.model.head_dim * (n * n * u + n * sw.block);
}

const char* cost_model_text() {
  return "longest-processing-time first over the cases by estimated cost Hq*d*(N^2*u + N*B), u = 1 (full), D "
         "(sparse@D), the method registry's cost for estimate:<method> (proxy g/(2 Hq s) + 1/N, oracle 1, xattn "
         "1/(2S), flexprefill and vslash last_q/N, pooled 1/N + 1/B^2), that cost + D (proxyattn@density=D) or "
         "+ 0.25 (proxyattn@gamma); skipped cases 0";
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
