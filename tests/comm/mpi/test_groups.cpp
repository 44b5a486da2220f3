// Bootstrap, parallel-group membership, fault injection and collective timeouts.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <string>

#include "src/comm/mpi_comm.h"
#include "tests/support/comm_test_support.h"
#if defined(SWITCHYARD_WITH_CUDA)
#include "src/comm/nccl_comm.h"
#endif

using namespace switchyard;
using namespace switchyard::comm_test;

namespace {

// The world ranks of `comm`'s members in group-rank order, learnt by communicating over it.
std::vector<int32_t> members_of(Communicator& comm) {
  const int32_t my_world_rank = bootstrap_process(DeviceKind::cpu).world_rank;
  TestArray mine(DType::i32, 1, comm.device()), all(DType::i32, comm.size(), comm.device());
  mine.set(0, my_world_rank);
  mine.upload();
  all.upload();
  comm.all_gather(mine.data(), all.data(), 1, DType::i32);
  comm.synchronize();
  all.download();
  std::vector<int32_t> members;
  for (int index = 0; index < comm.size(); ++index) members.push_back(int32_t(all.get(index)));
  return members;
}

std::string error_of(const std::function<void()>& call, int* exit_code = nullptr) {
  try {
    call();
  } catch (const Error& error) {
    if (exit_code) *exit_code = error.exit_code();
    return error.what();
  }
  return "";
}

TEST(Bootstrap, ContextMatchesMpiAndIsIdempotent) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(context.world_rank, rank);
  EXPECT_EQ(context.world_size, size);
  EXPECT_EQ(process_rank(), rank);
  EXPECT_EQ(&bootstrap_process(DeviceKind::cpu), &context);
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) {
    EXPECT_EQ(context.launcher, "mpirun");
  }
  EXPECT_GE(context.local_rank, 0);
  EXPECT_LT(context.local_rank, context.local_size);

  // Local ranks: on each host, exactly 0 .. local_size-1, and local_size = ranks on that host.
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  std::vector<char> hosts(size_t(size) * sizeof(host));
  MPI_CHECK(MPI_Allgather(host, sizeof(host), MPI_CHAR, hosts.data(), sizeof(host), MPI_CHAR, MPI_COMM_WORLD));
  int local_pair[2] = {context.local_rank, context.local_size};
  std::vector<int> local_pairs(size_t(size) * 2);
  MPI_CHECK(MPI_Allgather(local_pair, 2, MPI_INT, local_pairs.data(), 2, MPI_INT, MPI_COMM_WORLD));
  std::vector<int> seen_local_ranks;
  for (int other = 0; other < size; ++other)
    if (std::string(&hosts[size_t(other) * sizeof(host)]) == host) {
      seen_local_ranks.push_back(local_pairs[size_t(other) * 2]);
      EXPECT_EQ(local_pairs[size_t(other) * 2 + 1], context.local_size);
    }
  std::sort(seen_local_ranks.begin(), seen_local_ranks.end());
  ASSERT_EQ(int(seen_local_ranks.size()), context.local_size);
  for (int index = 0; index < context.local_size; ++index) EXPECT_EQ(seen_local_ranks[size_t(index)], index);
}

class Groups : public ::testing::TestWithParam<DeviceKind> {
 protected:
  void SetUp() override {
    if (GetParam() == DeviceKind::cuda) {
      std::string reason;
      if (!nccl_usable(&reason)) GTEST_SKIP() << reason;
    }
  }
};

TEST_P(Groups, MembershipFollowsEpSize) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  const int world_size = context.world_size, rank = context.world_rank;
  for (int ep_size : ep_sizes_to_test(world_size)) {
    SCOPED_TRACE(detail::concat("ep_size ", ep_size));
    ParallelGroups& groups = groups_for(GetParam(), ep_size);
    EXPECT_EQ(groups.ep_size, ep_size);
    for (Communicator* comm : {groups.world.get(), groups.expert_parallel.get(), groups.expert_data_parallel.get()})
      EXPECT_EQ(comm->device(), GetParam());
    EXPECT_EQ(groups.world->name(), "world");
    EXPECT_EQ(groups.expert_parallel->name(), "expert_parallel");
    EXPECT_EQ(groups.expert_data_parallel->name(), "expert_data_parallel");

    std::vector<int32_t> world(static_cast<size_t>(world_size), 0), expert_parallel, expert_data_parallel;
    std::iota(world.begin(), world.end(), 0);
    for (int member = 0; member < ep_size; ++member) expert_parallel.push_back((rank / ep_size) * ep_size + member);
    for (int member = rank % ep_size; member < world_size; member += ep_size) expert_data_parallel.push_back(member);

    EXPECT_EQ(groups.world->rank(), rank);
    EXPECT_EQ(groups.expert_parallel->rank(), rank % ep_size);
    EXPECT_EQ(groups.expert_data_parallel->rank(), rank / ep_size);
    EXPECT_EQ(members_of(*groups.world), world);
    EXPECT_EQ(members_of(*groups.expert_parallel), expert_parallel);
    EXPECT_EQ(members_of(*groups.expert_data_parallel), expert_data_parallel);
  }
}

TEST_P(Groups, NodeAndRailGroupsOfAGroupOverSeveralNodes) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  const int world_size = context.world_size, rank = context.world_rank;
  for (int ep_size : ep_sizes_to_test(world_size)) {
    for (int per_node : node_sizes_to_test(ep_size)) {
      SCOPED_TRACE(detail::concat("ep_size ", ep_size, ", ranks_per_node ", per_node));
      ParallelGroups& groups = groups_for(GetParam(), ep_size, per_node);
      const bool spans_nodes = per_node > 0 && per_node < ep_size;
      ASSERT_EQ(groups.expert_parallel_node != nullptr, spans_nodes);
      ASSERT_EQ(groups.expert_parallel_rail != nullptr, spans_nodes);
      if (!spans_nodes) continue;
      // The node: per_node consecutive ranks; the rail: one rank per node of the group, same place.
      const int group_first = rank / ep_size * ep_size, ep_rank = rank % ep_size;
      std::vector<int32_t> node, rail;
      for (int member = 0; member < per_node; ++member) node.push_back(rank / per_node * per_node + member);
      for (int place = ep_rank % per_node; place < ep_size; place += per_node) rail.push_back(group_first + place);
      EXPECT_EQ(members_of(*groups.expert_parallel_node), node);
      EXPECT_EQ(members_of(*groups.expert_parallel_rail), rail);
      EXPECT_EQ(groups.expert_parallel_node->rank(), ep_rank % per_node);
      EXPECT_EQ(groups.expert_parallel_rail->rank(), ep_rank / per_node);
      EXPECT_EQ(groups.expert_parallel_node->device(), GetParam());
      EXPECT_EQ(groups.expert_parallel_rail->name(), "expert_parallel_rail");
    }
  }
}

TEST(Bootstrap, ContiguousRanksPerNodeIsTheWholeWorldOnOneHost) {
  // mpirun on one machine places every rank on this node, as one contiguous block.
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  int hosts_differ = context.local_size != context.world_size ? 1 : 0;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &hosts_differ, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  if (hosts_differ) GTEST_SKIP() << "the ranks run on several hosts";
  EXPECT_EQ(contiguous_ranks_per_node(context), context.world_size);
}

INSTANTIATE_TEST_SUITE_P(Backends, Groups, ::testing::Values(DeviceKind::cpu, DeviceKind::cuda),
                         [](const ::testing::TestParamInfo<DeviceKind>& info) {
                           return std::string(info.param == DeviceKind::cpu ? "mpi" : "nccl");
                         });

TEST(GroupLayout, EpSizeMustDivideTheWorld) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  for (int ep_size : {context.world_size + 1, 0}) {
    int exit_code = -1;
    const std::string message = error_of([&] { create_parallel_groups(context, ep_size, 10.0); }, &exit_code);
    EXPECT_EQ(exit_code, kExitBadInput) << message;
    EXPECT_NE(message.find("ep_size = " + std::to_string(ep_size)), std::string::npos) << message;
    EXPECT_NE(message.find("world size " + std::to_string(context.world_size)), std::string::npos) << message;
  }
}

TEST(FaultInjection, ThrowsOnlyOnTheNamedRankAndPoint) {
  const int rank = bootstrap_process(DeviceKind::cpu).world_rank;
  const int target = 1 % bootstrap_process(DeviceKind::cpu).world_size;
  ::unsetenv("SWITCHYARD_INJECT_FAULT");
  EXPECT_NO_THROW(inject_fault_point("test_point"));

  ::setenv("SWITCHYARD_INJECT_FAULT", (std::to_string(target) + ":test_point").c_str(), 1);
  const std::string message = error_of([] { inject_fault_point("test_point"); });
  if (rank == target) {
    EXPECT_NE(message.find("injected fault at test_point"), std::string::npos) << message;
  } else {
    EXPECT_EQ(message, "");
  }
  EXPECT_EQ(error_of([] { inject_fault_point("other_point"); }), "");

  ::setenv("SWITCHYARD_INJECT_FAULT", "*:test_point", 1);
  EXPECT_NE(error_of([] { inject_fault_point("test_point"); }), "");

  for (const char* malformed : {"1", "x:test_point", "1:test_point:crash", "1::hang"}) {
    ::setenv("SWITCHYARD_INJECT_FAULT", malformed, 1);
    int exit_code = -1;
    const std::string error = error_of([] { inject_fault_point("test_point"); }, &exit_code);
    EXPECT_EQ(exit_code, kExitBadInput) << malformed << ": " << error;
  }
  ::unsetenv("SWITCHYARD_INJECT_FAULT");
}

// Rank 0 enters a barrier the others skip: it must time out with an error naming the barrier,
// the communicator and the rank. The others then complete the abandoned barrier so that the
// communicator can be freed cleanly and the suite goes on.
TEST(Timeouts, MpiCollectiveTimesOutWithANamedError) {
  Communicator& world = *groups_for(DeviceKind::cpu, 1).world;
  if (world.size() < 2) GTEST_SKIP() << "needs two ranks";
  MPI_Comm duplicate = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &duplicate));
  constexpr double kShortTimeout = 0.5;
  MpiCommunicator probe(duplicate, "timeout_probe", world.rank() == 0 ? kShortTimeout : kTestTimeoutSeconds);
  world.barrier();
  if (world.rank() == 0) {
    const auto start = std::chrono::steady_clock::now();
    const std::string message = error_of([&] { probe.barrier(); });
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_NE(message.find("collective barrier on communicator 'timeout_probe' timed out"), std::string::npos)
        << message;
    EXPECT_NE(message.find("world rank 0"), std::string::npos) << message;
    EXPECT_GE(waited, kShortTimeout);
    EXPECT_LT(waited, kShortTimeout + 10.0);
    EXPECT_NE(error_of([&] { probe.barrier(); }).find("was aborted"), std::string::npos);
  }
  world.barrier();                         // the others wait here until rank 0 has given up
  if (world.rank() != 0) probe.barrier();  // completes rank 0's abandoned barrier
  world.barrier();
}

#if defined(SWITCHYARD_WITH_CUDA)
// The NCCL version: rank 0 all-reduces alone with a short timeout; synchronize() must abort the
// communicator and name the collective. The others abort their side without using it.
TEST(Timeouts, NcclCollectiveTimesOutAndAborts) {
  std::string reason;
  if (!nccl_usable(&reason)) GTEST_SKIP() << reason;
  Communicator& world = *groups_for(DeviceKind::cpu, 1).world;
  if (world.size() < 2) GTEST_SKIP() << "needs two ranks";
  bootstrap_process(DeviceKind::cuda);
  MPI_Comm duplicate = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &duplicate));
  constexpr double kShortTimeout = 2.0;
  auto probe = std::make_unique<NcclCommunicator>(duplicate, "nccl_timeout_probe",
                                                  world.rank() == 0 ? kShortTimeout : kTestTimeoutSeconds);
  MPI_Comm_free(&duplicate);
  world.barrier();
  if (world.rank() == 0) {
    Buffer value(DeviceKind::cuda, sizeof(float));
    device_memset(value.data(), DeviceKind::cuda, 0, sizeof(float));
    const std::string message = error_of([&] {
      probe->all_reduce_sum(value.data(), 1, DType::f32);
      probe->synchronize();
    });
    EXPECT_NE(message.find("collective all_reduce_sum on communicator 'nccl_timeout_probe' timed out"),
              std::string::npos)
        << message;
    EXPECT_NE(error_of([&] { probe->barrier(); }).find("was aborted"), std::string::npos);
  }
  world.barrier();
  probe->abort();  // the peers' side: never used, torn down without waiting
  probe.reset();
  world.barrier();
}
#endif

}  // namespace
