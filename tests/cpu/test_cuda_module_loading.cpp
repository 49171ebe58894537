#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn {
namespace {

// Restores CUDA_MODULE_LOADING as the test found it.
class ModuleLoadingEnv : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const char* v = std::getenv("CUDA_MODULE_LOADING")) saved_ = v;
  }
  void TearDown() override {
    if (saved_)
      setenv("CUDA_MODULE_LOADING", saved_->c_str(), 1);
    else
      unsetenv("CUDA_MODULE_LOADING");
  }
  std::optional<std::string> saved_;
};

TEST_F(ModuleLoadingEnv, EagerWhenTheUserSetNothing) {
  unsetenv("CUDA_MODULE_LOADING");
  EXPECT_EQ(cuda_module_loading(), "default");
  load_cuda_kernels_eagerly();
  EXPECT_STREQ(std::getenv("CUDA_MODULE_LOADING"), "EAGER");
  EXPECT_EQ(cuda_module_loading(), "EAGER");
}

TEST_F(ModuleLoadingEnv, TheUsersChoiceStands) {
  setenv("CUDA_MODULE_LOADING", "LAZY", 1);
  load_cuda_kernels_eagerly();
  EXPECT_STREQ(std::getenv("CUDA_MODULE_LOADING"), "LAZY");
  EXPECT_EQ(cuda_module_loading(), "LAZY");
}

}  // namespace
}  // namespace proxyattn
