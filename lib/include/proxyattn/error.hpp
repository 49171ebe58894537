#pragma once
// One exception type for every library failure. The message always names the thing that is
// wrong (file, dataset, flag, field) so the apps can print it as a single line and exit non-zero.
#include <stdexcept>
#include <string>

namespace proxyattn {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace proxyattn
