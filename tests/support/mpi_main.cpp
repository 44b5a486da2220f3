// gtest main for mpi_tests (ctest runs it under mpirun -np 2 and -np 4).
//
// MPI comes up through bootstrap_process, as in the real program. Rank 0 prints gtest's normal
// output; the other ranks print only their failures, prefixed with their rank. The verdict is
// combined over all ranks, so every rank exits non-zero when any rank had a failure.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

#include "src/comm/bootstrap.h"
#include "src/core/mpi_check.h"
#include "tests/support/comm_test_support.h"

namespace {

class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  return switchyard::run_guarded([&] {
    const switchyard::ProcessContext& context = switchyard::bootstrap_process(switchyard::DeviceKind::cpu);
    ::testing::InitGoogleTest(&argc, argv);
    switchyard::comm_test::shared_seed();  // a collective: every rank draws it here, before any test
    if (context.world_rank != 0) {
      ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new FailurePrinter(context.world_rank));
    }
    const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
    switchyard::comm_test::release_groups();

    std::vector<int> failed(size_t(context.world_size), 0);
    MPI_CHECK(MPI_Allgather(&local_failed, 1, MPI_INT, failed.data(), 1, MPI_INT, MPI_COMM_WORLD));
    std::string failing_ranks;
    for (int rank = 0; rank < context.world_size; ++rank)
      if (failed[size_t(rank)]) failing_ranks += (failing_ranks.empty() ? "" : ", ") + std::to_string(rank);
    if (context.world_rank == 0) {
      if (failing_ranks.empty())
        std::printf("mpi_tests: all %d ranks passed (seed %llu)\n", context.world_size,
                    static_cast<unsigned long long>(switchyard::comm_test::shared_seed()));
      else
        std::printf("mpi_tests: FAILED on rank(s) %s of %d (seed %llu)\n", failing_ranks.c_str(),
                    context.world_size, static_cast<unsigned long long>(switchyard::comm_test::shared_seed()));
      std::fflush(stdout);
    }
    return failing_ranks.empty() ? 0 : 1;
  });
}
