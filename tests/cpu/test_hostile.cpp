// Issue #17 (hostile input): overflow-safe sizes, the memory check before allocating, output
// targets that are never replaced, and report folders committed as a whole.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

#include "proxyattn/checked.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/tensor.hpp"
#include "store_test_util.hpp"

namespace proxyattn {
namespace {

namespace fs = std::filesystem;
using test::expect_error;
using test::TempDir;

// Sets PROXYATTN_MEMORY_LIMIT for one scope.
struct MemoryLimit {
  explicit MemoryLimit(const char* v) { ::setenv("PROXYATTN_MEMORY_LIMIT", v, 1); }
  ~MemoryLimit() { ::unsetenv("PROXYATTN_MEMORY_LIMIT"); }
};

TEST(Checked, MultiplicationOverflowIsAnError) {
  EXPECT_EQ(checked_mul(1 << 20, 1 << 20, "x"), int64_t{1} << 40);
  EXPECT_EQ(checked_mul(0, std::numeric_limits<int64_t>::max(), "x"), 0);
  expect_error([] { checked_mul(int64_t{1} << 32, int64_t{1} << 32, "layer 3"); }, {"layer 3", "overflows"});
  expect_error([] { checked_mul(-1, 4, "w"); }, {"w", "negative"});
  EXPECT_EQ(checked_product({4, 1 << 23, 32, 4}, "x"), int64_t{1} << 32);
  expect_error([] { checked_product({int64_t{1} << 30, int64_t{1} << 30, int64_t{1} << 30}, "q"); }, {"q", "overflows"});
  EXPECT_EQ(checked_product({int64_t{1} << 62, 0, int64_t{1} << 62}, "x"), 0);
  expect_error([] { checked_add(std::numeric_limits<int64_t>::max(), 1, "a"); }, {"a", "overflows"});
}

TEST(Checked, MemoryCheckSaysHowMuchIsNeeded) {
  EXPECT_GT(available_memory_bytes(), 0);
  MemoryLimit lim("64M");
  EXPECT_EQ(available_memory_bytes(), int64_t{64} << 20);
  EXPECT_NO_THROW(require_fits(int64_t{1} << 20, "small"));
  expect_error([] { require_fits(int64_t{4} << 30, "/layers/00/q"); },
               {"/layers/00/q", "needs 4.0 GiB", "64.0 MiB available"});
  EXPECT_EQ(format_bytes(12), "12 B");
  EXPECT_EQ(format_bytes(1536), "1.5 KiB");
}

TEST(Checked, TensorShapesAreChecked) {
  // Overflowing products and shapes beyond memory are Errors, not segfaults or bad_alloc.
  expect_error([] { Tensor3 t(int64_t{1} << 30, int64_t{1} << 40, int64_t{1} << 30); }, {"tensor", "overflows"});
  MemoryLimit lim("256M");
  expect_error([] { Tensor3 t(4, int64_t{1} << 23, 32); }, {"tensor [4, 8388608, 32]", "needs 4.0 GiB"});
  Tensor3 ok(3, 5, 7, 1.0f);
  EXPECT_EQ(ok.size(), 105);
}

TEST(OutputTargets, NeverReplacedUnlessRegularFiles) {
  TempDir dir;
  const std::string real = dir.file("real.txt"), link = dir.file("link.txt");
  std::ofstream(real) << "keep";
  fs::create_symlink(real, link);
  expect_error([&] { AtomicFile f(link); }, {link, "symbolic link", "refusing"});
  expect_error([&] { write_file_atomic("/dev/null", "x"); }, {"/dev/null", "character device"});
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_error([&] { write_file_atomic(fifo, "x"); }, {fifo, "FIFO"});
  EXPECT_EQ(test::read_bytes(real), "keep");
  EXPECT_TRUE(fs::is_symlink(link));
  write_file_atomic(real, "new");  // a regular file is replaced
  EXPECT_EQ(test::read_bytes(real), "new");
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"fifo", "link.txt", "real.txt"}));
}

bool report_like(const std::string& name, bool regular) {
  return regular && (name == "a.csv" || name == "report.json");
}

TEST(AtomicDir, CommitsWholeFoldersAndReplacesOnlyReports) {
  TempDir dir;
  const std::string out = dir.file("sub/out");
  {
    AtomicDir d(out, "--out", report_like);
    d.write("report.json", "1");
    d.write("a.csv", "x");
    EXPECT_FALSE(fs::exists(out));  // nothing visible before the commit
    const auto files = d.commit();
    EXPECT_EQ(files.size(), 2u);
  }
  EXPECT_EQ(test::read_bytes(out + "/report.json"), "1");
  {
    AtomicDir d(out, "--out", report_like);
    d.write("report.json", "2");
    d.commit();
  }
  // The second run replaced the whole folder: no a.csv of the first run is left to mix in.
  EXPECT_EQ(test::read_bytes(out + "/report.json"), "2");
  EXPECT_FALSE(fs::exists(out + "/a.csv"));
  {
    AtomicDir d(out, "--out", report_like);
    d.write("report.json", "3");
  }  // not committed: the old report stays, the staging folder is gone
  EXPECT_EQ(test::read_bytes(out + "/report.json"), "2");
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir.file("sub"))) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, (std::vector<std::string>{"out"}));
  // A folder holding something else is refused, not deleted.
  std::ofstream(out + "/notes.txt") << "mine";
  expect_error([&] { AtomicDir d(out, "--out", report_like); }, {"--out", "notes.txt", "not part of a report"});
  EXPECT_TRUE(fs::exists(out + "/notes.txt"));
  // A symlink or a file as the target is refused.
  fs::create_directory_symlink(out, dir.file("ln"));
  expect_error([&] { AtomicDir d(dir.file("ln"), "--out", report_like); }, {"symbolic link"});
  std::ofstream(dir.file("plain")) << "x";
  expect_error([&] { AtomicDir d(dir.file("plain"), "--out", report_like); }, {"plain", "regular file", "not a directory"});
  expect_error([&] { require_output_dir_target(dir.file("plain/sub"), "--out", report_like); }, {"not a directory"});
}

}  // namespace
}  // namespace proxyattn
