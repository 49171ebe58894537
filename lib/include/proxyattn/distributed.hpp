#pragma once
// Work split across MPI ranks (Open MPI), so the tools scale over GPUs and nodes without a
// scheduler of our own. Without MPI in the build, or when the process was not started by
// mpirun/srun, everything runs as one rank and no MPI call is made.
//
//   Distributed dist(argc, argv);                 // MPI_Init only under a launcher
//   auto owner = assign_by_cost(costs, dist.size());
//   for (u : units) if (owner[u] == dist.rank()) results[u] = run(u);
//   auto all = dist.gather_to_root(my_serialised_results);   // rank 0 gets every rank's
//   dist.agree_or_throw(error_message);            // one failing rank fails all of them
#include <cstdint>
#include <string>
#include <vector>

namespace proxyattn {

class Distributed {
 public:
  Distributed(int& argc, char**& argv);
  ~Distributed();  // MPI_Finalize when this object initialised MPI
  Distributed(const Distributed&) = delete;
  Distributed& operator=(const Distributed&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }
  // Rank among the processes of this node: which GPU to use (local_rank % device_count).
  int local_rank() const { return local_rank_; }
  bool active() const { return mpi_; }  // MPI initialised (started under a launcher)
  std::string hostname() const;

  // Rank 0 receives every rank's string (index = rank); the others get an empty vector.
  std::vector<std::string> gather_to_root(const std::string& mine) const;
  // Every rank receives rank 0's string.
  std::string broadcast_from_root(const std::string& root_value) const;
  // Collective: if any rank passes a non-empty error, every rank throws Error with the first
  // failing rank's message ("rank R: ..."); otherwise returns normally.
  void agree_or_throw(const std::string& error) const;
  void barrier() const;
  // A barrier whose early ranks sleep (polling every poll_ms) instead of spinning on a core that
  // ranks still working on the same node may be timing.
  void barrier_sleeping(int poll_ms = 2) const;

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0;
  bool mpi_ = false;
};

// True when built with MPI support.
bool built_with_mpi();

// Longest-processing-time-first: units sorted by descending cost (ties: lower index first),
// each given to the rank with the least total cost so far (ties: lower rank). Deterministic.
// Returns the owning rank of every unit. Balances by cost, not by count (a 128K unit costs
// ~1000x a 4K one).
std::vector<int> assign_by_cost(const std::vector<double>& costs, int ranks);

}  // namespace proxyattn
