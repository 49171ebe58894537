#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "proxyattn/distributed.hpp"
#include "proxyattn/error.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

TEST(Distributed, AssignByCostHandComputed) {
  // LPT: 10 -> r0 [10, 0]; 7 -> r1 [10, 7]; 5 -> r1 [10, 12]; 3 -> r0 [13, 12]; 2 -> r1 [13, 14]
  const std::vector<double> costs{3, 10, 2, 7, 5};
  const std::vector<int> owner = assign_by_cost(costs, 2);
  EXPECT_EQ(owner, (std::vector<int>{0, 0, 1, 1, 1}));
  EXPECT_EQ(assign_by_cost(costs, 1), std::vector<int>(5, 0));
  EXPECT_THROW(assign_by_cost(costs, 0), Error);
}

TEST(Distributed, BalancesByCostNotCount) {
  // One 128K unit costs ~1000x a 4K one: it gets a rank to itself.
  std::vector<double> costs(40, 1.0);
  costs.push_back(1024.0);
  const std::vector<int> owner = assign_by_cost(costs, 2);
  const int big = owner.back();
  for (size_t u = 0; u + 1 < costs.size(); ++u) EXPECT_NE(owner[u], big);
  // Random costs: the makespan is within the LPT bound (4/3 of the optimum's lower bound + max).
  std::uniform_real_distribution<double> d(0.1, 100.0);
  std::vector<double> c(97);
  for (double& x : c) x = d(test::rng());
  for (int ranks : {2, 3, 5}) {
    const auto o = assign_by_cost(c, ranks);
    std::vector<double> load(ranks, 0.0);
    for (size_t u = 0; u < c.size(); ++u) load[o[u]] += c[u];
    const double total = std::accumulate(c.begin(), c.end(), 0.0);
    const double lower = std::max(total / ranks, *std::max_element(c.begin(), c.end()));
    EXPECT_LE(*std::max_element(load.begin(), load.end()), 4.0 / 3.0 * lower + 1e-9) << ranks;
  }
}

TEST(Distributed, SingleProcessWithoutLauncher) {
  int argc = 1;
  char name[] = "test";
  char* args[] = {name, nullptr};
  char** argv = args;
  Distributed d(argc, argv);
  EXPECT_EQ(d.size(), 1);
  EXPECT_EQ(d.rank(), 0);
  EXPECT_EQ(d.gather_to_root("x"), std::vector<std::string>{"x"});
  EXPECT_NO_THROW(d.agree_or_throw(""));
  EXPECT_THROW(d.agree_or_throw("bad store"), Error);
}

}  // namespace
}  // namespace proxyattn
