#pragma once
// proxyattn-bench under mpirun: the cases of a sweep are the units of work, balanced over the
// ranks by an estimated cost (assign_by_cost in distributed.hpp: longest-processing-time first),
// not by count; a 128K case costs ~1000x a 4K one.
//
// Cost of a case, in multiply-adds up to one constant factor shared by all cases:
//   Hq * d * (N^2 * u + N * B)
// with u the work of the method relative to one causal attention (QK^T and PV over the
// causal half) and N * B the block-level work every case does (pooling, budgets, selection):
//   full                  u = 1
//   sparse@D              u = D (a mask file: its block density)
//   estimate:proxy g,s    u = 1 / (2 g s)       one QK^T pass on Hq/g pooled heads, N/s rows
//   estimate:oracle       u = 1                 two QK^T passes (LSE, then block mass)
//   estimate:xattn        u = 1 / (2 S)         antidiagonal scoring, stride S
//   estimate:flexprefill  u = last_q / N        last_q query rows against every key
//   estimate:vslash       u = last_q / N
//   estimate:pooled       u = 0                 block-level work only
//   proxyattn@density=D   u = 1 / (2 g s) + D
//   proxyattn@gamma=G     u = 1 / (2 g s) + 0.25   (density unknown before the run; measured
//                                                  0.1-0.3 at gamma 0.9-0.95)
// A case the device skips (N above cpu_max_len, an estimator without a GPU kernel, too little
// memory) costs 0. Repetitions and warm-up are the same for every case of a sweep and drop out.
#include <cstdint>
#include <ostream>
#include <streambuf>
#include <string>

#include "bench.hpp"

namespace proxyattn::bench {

// One timed case: a method at one length and dtype.
struct Case {
  Method method;
  int64_t n = 0;
  DType dtype = DType::bf16;
};

// The cost above; mask_density is the block density of a mask-file case (ignored otherwise).
double case_cost(const Sweep& sw, const Case& c, double mask_density);
// One line naming the scheme, for the report's context.
const char* cost_model_text();

// An ostream writing to stderr whole lines only, each behind `prefix` ("[rank 1] "), so the
// progress lines of several ranks sharing a terminal never interleave mid-line.
class PrefixedStderr : public std::ostream {
 public:
  explicit PrefixedStderr(std::string prefix);
  ~PrefixedStderr() override;

 private:
  class Buf : public std::streambuf {
   public:
    explicit Buf(std::string prefix) : prefix_(std::move(prefix)) {}
    void flush_line();

   protected:
    int overflow(int c) override;
    std::streamsize xsputn(const char* s, std::streamsize n) override;
    int sync() override { return 0; }  // partial lines wait for their newline

   private:
    std::string prefix_, line_;
  };
  Buf buf_;
};

}  // namespace proxyattn::bench
