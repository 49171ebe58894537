#pragma once
// Helpers for the method units' device estimates: kernels.h operands from a DeviceEstimate and
// Status -> Error.
#include <string>

#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/methods.hpp"

namespace proxyattn::methods {

inline kernels::PeerInput peer_input(const DeviceEstimate& d) {
  kernels::PeerInput in;
  in.q = d.q;
  in.k = d.k;
  in.in_type = static_cast<kernels::ElemType>(d.elem);
  in.q_heads = d.q_heads;
  in.kv_heads = d.kv_heads;
  in.head_dim = d.head_dim;
  in.seq_len = d.seq_len;
  return in;
}

inline void check_launch(kernels::Status st, const char* what) { throw_on_failure(st, std::string("cuda: ") + what); }

}  // namespace proxyattn::methods
