#pragma once
// Build provenance for reports.
#include <string>

namespace proxyattn {

std::string version();      // project version, e.g. "0.1.0"
std::string git_sha();      // short SHA at configure time, or "unknown"
bool built_with_cuda();
std::string library_versions();  // "hdf5 1.10.8, eigen 3.4.0, ..."

}  // namespace proxyattn
