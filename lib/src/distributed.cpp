#include "proxyattn/distributed.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <numeric>
#include <thread>

#include "proxyattn/error.hpp"

#ifdef PROXYATTN_HAVE_MPI
#include <mpi.h>
#endif

namespace proxyattn {

namespace {

// Started by a launcher (Open MPI's mpirun, PMIx, Slurm's srun)?
bool under_launcher() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"})
    if (std::getenv(v)) return true;
  return false;
}

#ifdef PROXYATTN_HAVE_MPI
void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw Error(std::string("MPI ") + what + " failed: " + std::string(msg, static_cast<size_t>(len)));
  }
}
#endif

}  // namespace

bool built_with_mpi() {
#ifdef PROXYATTN_HAVE_MPI
  return true;
#else
  return false;
#endif
}

Distributed::Distributed(int& argc, char**& argv) {
#ifdef PROXYATTN_HAVE_MPI
  if (!under_launcher()) return;
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    check(MPI_Init(&argc, &argv), "init");
    mpi_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  MPI_Comm node;
  check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "split");
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_free(&node);
#else
  (void)argc;
  (void)argv;
  if (under_launcher() && std::getenv("OMPI_COMM_WORLD_SIZE") && std::atoi(std::getenv("OMPI_COMM_WORLD_SIZE")) > 1)
    throw Error("started under mpirun with several ranks, but this build has no MPI support "
                "(install libopenmpi-dev and rebuild)");
#endif
}

Distributed::~Distributed() {
#ifdef PROXYATTN_HAVE_MPI
  if (mpi_) MPI_Finalize();
#endif
}

std::string Distributed::hostname() const {
  char buf[256] = {0};
  ::gethostname(buf, sizeof(buf) - 1);
  return buf;
}

std::vector<std::string> Distributed::gather_to_root(const std::string& mine) const {
  if (size_ == 1) return {mine};
#ifdef PROXYATTN_HAVE_MPI
  // Sizes first, then every rank's bytes point to point in chunks below 2^30: no part or total
  // is limited by MPI's int counts, and rank 0 throws nothing between the two (a root that
  // threw while the others wait in a collective would hang the job).
  constexpr long long kChunk = 1LL << 30;
  constexpr int kTag = 7301;
  long long len = static_cast<long long>(mine.size());
  std::vector<long long> lens(rank_ == 0 ? size_ : 0);
  check(MPI_Gather(&len, 1, MPI_LONG_LONG, lens.data(), 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD), "gather");
  std::vector<std::string> out;
  if (rank_ != 0) {
    for (long long off = 0; off < len; off += kChunk)
      check(MPI_Send(mine.data() + off, static_cast<int>(std::min(kChunk, len - off)), MPI_CHAR, 0, kTag,
                     MPI_COMM_WORLD),
            "send");
    return out;
  }
  out.resize(static_cast<size_t>(size_));
  out[0] = mine;
  for (int r = 1; r < size_; ++r) {
    out[static_cast<size_t>(r)].resize(static_cast<size_t>(lens[static_cast<size_t>(r)]));
    for (long long off = 0; off < lens[static_cast<size_t>(r)]; off += kChunk)
      check(MPI_Recv(out[static_cast<size_t>(r)].data() + off,
                     static_cast<int>(std::min(kChunk, lens[static_cast<size_t>(r)] - off)), MPI_CHAR, r, kTag,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE),
            "recv");
  }
  return out;
#else
  return {mine};
#endif
}

std::string Distributed::broadcast_from_root(const std::string& root_value) const {
  if (size_ == 1) return root_value;
#ifdef PROXYATTN_HAVE_MPI
  long long len = rank_ == 0 ? static_cast<long long>(root_value.size()) : 0;
  check(MPI_Bcast(&len, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD), "bcast");
  std::string s = rank_ == 0 ? root_value : std::string(static_cast<size_t>(len), '\0');
  check(MPI_Bcast(s.data(), static_cast<int>(len), MPI_CHAR, 0, MPI_COMM_WORLD), "bcast");
  return s;
#else
  return root_value;
#endif
}

void Distributed::agree_or_throw(const std::string& error) const {
  if (size_ == 1) {
    if (!error.empty()) throw Error(error);
    return;
  }
  const std::vector<std::string> all = gather_to_root(error);
  std::string first;
  if (rank_ == 0)
    for (size_t r = 0; r < all.size(); ++r)
      if (!all[r].empty()) {
        first = "rank " + std::to_string(r) + ": " + all[r];
        break;
      }
  first = broadcast_from_root(first);
  if (!first.empty()) throw Error(first);
}

void Distributed::barrier() const {
#ifdef PROXYATTN_HAVE_MPI
  if (size_ > 1) MPI_Barrier(MPI_COMM_WORLD);
#endif
}

void Distributed::barrier_sleeping(int poll_ms) const {
#ifdef PROXYATTN_HAVE_MPI
  if (size_ == 1) return;
  MPI_Request req;
  check(MPI_Ibarrier(MPI_COMM_WORLD, &req), "ibarrier");
  for (int done = 0;;) {
    check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "test");
    if (done) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(std::max(1, poll_ms)));
  }
#else
  (void)poll_ms;
#endif
}

std::vector<int> assign_by_cost(const std::vector<double>& costs, int ranks) {
  if (ranks < 1) throw Error("assign_by_cost: ranks must be >= 1");
  std::vector<size_t> order(costs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return costs[a] > costs[b]; });
  std::vector<double> load(static_cast<size_t>(ranks), 0.0);
  std::vector<int> owner(costs.size(), 0);
  for (size_t u : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[u] = r;
    load[static_cast<size_t>(r)] += std::max(0.0, costs[u]);
  }
  return owner;
}

}  // namespace proxyattn
