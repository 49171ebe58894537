#include "proxyattn/version.hpp"

#include <H5public.h>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <Eigen/Core>

namespace proxyattn {

std::string version() { return PROXYATTN_VERSION; }
std::string git_sha() { return PROXYATTN_GIT_SHA; }

bool built_with_cuda() {
#ifdef PROXYATTN_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

std::string library_versions() {
  return fmt::format("hdf5 {}.{}.{}, eigen {}.{}.{}, nlohmann_json {}.{}.{}, fmt {}, cuda {}",
                     H5_VERS_MAJOR, H5_VERS_MINOR, H5_VERS_RELEASE, EIGEN_WORLD_VERSION,
                     EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION, NLOHMANN_JSON_VERSION_MAJOR,
                     NLOHMANN_JSON_VERSION_MINOR, NLOHMANN_JSON_VERSION_PATCH, FMT_VERSION,
                     built_with_cuda() ? "yes" : "no");
}

}  // namespace proxyattn
