// pick_gpu (src/comm/gpu_pick.h): which GPU each rank of a node uses, for the launch shapes users
// meet -- srun --gpus-per-task=1 (every rank sees one GPU), mpirun on an 8-GPU node (every rank
// sees all of them), too many ranks for the GPUs, no GPU -- without a GPU in the machine.
#include <gtest/gtest.h>

#include <string>
#include <tuple>

#include "src/comm/gpu_pick.h"
#include "src/core/error.h"

using namespace switchyard;

namespace {

TEST(GpuPick, EachRankSeeingOneGpuUsesItWhateverItsLocalRank) {
  // srun --ntasks=8 --gpus-per-task=1: 8 ranks on the node, each with its own single visible GPU.
  for (int local_rank = 0; local_rank < 8; ++local_rank) {
    SCOPED_TRACE("local rank " + std::to_string(local_rank));
    const GpuPick pick = pick_gpu(local_rank, 8, 1);
    EXPECT_EQ(pick.device, 0);
    EXPECT_EQ(pick.problem, "");
  }
  EXPECT_EQ(pick_gpu(0, 1, 1).device, 0);  // a single process on a one-GPU machine
}

TEST(GpuPick, RanksSeeingEveryGpuOfTheNodeTakeTheirLocalRank) {
  for (int local_rank = 0; local_rank < 8; ++local_rank) {
    SCOPED_TRACE("local rank " + std::to_string(local_rank));
    EXPECT_EQ(pick_gpu(local_rank, 8, 8).device, local_rank);
  }
  // Fewer ranks than GPUs: the first ones.
  EXPECT_EQ(pick_gpu(0, 2, 8).device, 0);
  EXPECT_EQ(pick_gpu(1, 2, 8).device, 1);
  EXPECT_EQ(pick_gpu(0, 1, 4).device, 0);
}

TEST(GpuPick, MoreLocalRanksThanVisibleGpusIsRefused) {
  for (int local_rank = 0; local_rank < 4; ++local_rank) {
    SCOPED_TRACE("local rank " + std::to_string(local_rank));
    const GpuPick pick = pick_gpu(local_rank, 4, 2);
    EXPECT_EQ(pick.device, -1);
    EXPECT_NE(pick.problem.find("4 ranks run on this node but each sees 2 GPUs"), std::string::npos) << pick.problem;
    EXPECT_NE(pick.problem.find("start at most 2 ranks per node"), std::string::npos) << pick.problem;
    EXPECT_NE(pick.problem.find("--gpus-per-task=1"), std::string::npos) << pick.problem;
  }
}

TEST(GpuPick, NoVisibleGpuIsRefused) {
  const GpuPick pick = pick_gpu(0, 1, 0);
  EXPECT_EQ(pick.device, -1);
  EXPECT_NE(pick.problem.find("no CUDA device is visible"), std::string::npos) << pick.problem;
  EXPECT_EQ(pick_gpu(3, 8, 0).device, -1);
}

TEST(GpuPick, ImpossibleArgumentsAreInternalErrors) {
  for (auto [local_rank, local_size, visible] : {std::tuple{1, 1, 1}, std::tuple{-1, 2, 1}, std::tuple{0, 0, 1},
                                                 std::tuple{0, 1, -1}}) {
    SCOPED_TRACE(std::to_string(local_rank) + " of " + std::to_string(local_size) + ", " + std::to_string(visible));
    try {
      pick_gpu(local_rank, local_size, visible);
      ADD_FAILURE() << "no error";
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitFailure);
    }
  }
}

}  // namespace
