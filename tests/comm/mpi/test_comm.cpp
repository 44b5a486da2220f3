// Collectives on both backends (MPI on host buffers, NCCL on device buffers) against values
// that are exact by construction (comm_test_support.h): all_to_all_v with uneven counts and
// zeros and gaps between segments, all_reduce_sum, all_gather (also in place), broadcast and
// barrier, on the world and on the expert-parallel / expert-data-parallel sub-communicators.
// Receive buffers are poisoned first; bytes outside the written segments must stay poisoned.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <thread>

#include "src/comm/mpi_comm.h"
#include "tests/support/comm_test_support.h"

using namespace switchyard;
using namespace switchyard::comm_test;

namespace {

constexpr int kMaxReportedMismatches = 5;

// Fails (with the first few differences) unless actual == expected everywhere.
struct MismatchCounter {
  int64_t mismatches = 0;
  void check(bool ok, const std::string& what) {
    if (ok) return;
    if (++mismatches <= kMaxReportedMismatches) ADD_FAILURE() << what;
  }
  ~MismatchCounter() { EXPECT_EQ(mismatches, 0) << "mismatching elements (seed " << shared_seed() << ")"; }
};

// A random layout of one segment per peer: peers in a shuffled order, random gaps between them.
struct SegmentLayout {
  std::vector<int64_t> counts, offsets;
  int64_t total = 0;
};

SegmentLayout random_layout(const std::vector<int64_t>& counts, uint32_t stream, int rank) {
  SegmentLayout layout;
  layout.counts = counts;
  layout.offsets.assign(counts.size(), 0);
  std::vector<int> order(counts.size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 shuffle_engine(uint32_t(shared_seed()) ^ (stream * 7919u) ^ uint32_t(rank));
  std::shuffle(order.begin(), order.end(), shuffle_engine);
  for (int peer : order) {
    layout.total += int64_t(shared_uniform(stream, uint64_t(rank) * 1000 + uint64_t(peer)) * 4);  // gap 0..3
    layout.offsets[size_t(peer)] = layout.total;
    layout.total += counts[size_t(peer)];
  }
  return layout;
}

void check_all_to_all_v(Communicator& comm, DType dtype, uint32_t stream) {
  SCOPED_TRACE(detail::concat("all_to_all_v on '", comm.name(), "' ", dtype_name(dtype), " seed ", shared_seed()));
  const int size = comm.size(), me = comm.rank();
  auto count_of = [&](int source, int destination) -> int64_t {
    const float draw = shared_uniform(stream, uint64_t(source) * 64 + uint64_t(destination));
    return draw < 0.25f ? 0 : int64_t((draw - 0.25f) / 0.75f * 300.0f) + 1;  // a quarter are zero
  };
  std::vector<int64_t> send_counts(static_cast<size_t>(size), 0), recv_counts(static_cast<size_t>(size), 0);
  for (int peer = 0; peer < size; ++peer) {
    send_counts[size_t(peer)] = count_of(me, peer);
    recv_counts[size_t(peer)] = count_of(peer, me);
  }
  const SegmentLayout send_layout = random_layout(send_counts, stream + 1, me);
  const SegmentLayout recv_layout = random_layout(recv_counts, stream + 2, me);
  TestArray send(dtype, send_layout.total, comm.device()), recv(dtype, recv_layout.total, comm.device());
  for (int peer = 0; peer < size; ++peer)
    for (int64_t index = 0; index < send_counts[size_t(peer)]; ++index)
      send.set(send_layout.offsets[size_t(peer)] + index, encode_value(dtype, me, peer, index, size));
  send.upload();
  recv.upload();  // poisoned

  comm.all_to_all_v(send.data(), send_layout.counts, send_layout.offsets, recv.data(), recv_layout.counts,
                    recv_layout.offsets, dtype);
  comm.synchronize();
  recv.download();

  MismatchCounter counter;
  std::vector<bool> written(size_t(recv_layout.total), false);
  for (int source = 0; source < size; ++source) {
    for (int64_t index = 0; index < recv_counts[size_t(source)]; ++index) {
      const int64_t position = recv_layout.offsets[size_t(source)] + index;
      written[size_t(position)] = true;
      const double expected = encode_value(dtype, source, me, index, size);
      counter.check(recv.get(position) == expected,
                    detail::concat("from rank ", source, " element ", index, ": got ", recv.get(position),
                                   ", expected ", expected));
    }
  }
  for (int64_t position = 0; position <= recv_layout.total; ++position)  // gaps and one element past the end
    if (position == recv_layout.total || !written[size_t(position)])
      counter.check(position == recv_layout.total ? recv.host[recv.bytes()] == kPoisonByte : recv.poisoned(position),
                    detail::concat("gap element ", position, " was overwritten"));
}

double reduce_input(DType dtype, int rank, int64_t index, uint32_t stream) {
  const bool narrow = dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::u8;
  const double limit = narrow ? 8 : 100000;  // narrow sums stay <= 32 for 4 ranks: exact
  const double magnitude = 1 + std::floor(double(philox_uniform(shared_seed(), stream, uint64_t(rank), uint64_t(index))) * limit);
  const bool negative = dtype != DType::u8 && (index + rank) % 3 == 0;
  return negative ? -magnitude : magnitude;
}

void check_all_reduce_sum(Communicator& comm, DType dtype, uint32_t stream) {
  SCOPED_TRACE(detail::concat("all_reduce_sum on '", comm.name(), "' ", dtype_name(dtype), " seed ", shared_seed()));
  const int64_t count = 1 + int64_t(shared_uniform(stream, 0) * 3000);
  TestArray data(dtype, count, comm.device());
  for (int64_t index = 0; index < count; ++index) data.set(index, reduce_input(dtype, comm.rank(), index, stream));
  data.upload();
  comm.all_reduce_sum(data.data(), count, dtype);
  comm.synchronize();
  data.poison();
  data.download();
  MismatchCounter counter;
  for (int64_t index = 0; index < count; ++index) {
    double expected = 0;
    for (int rank = 0; rank < comm.size(); ++rank) expected += reduce_input(dtype, rank, index, stream);
    counter.check(data.get(index) == expected,
                  detail::concat("element ", index, ": got ", data.get(index), ", expected ", expected));
  }
  counter.check(data.host[data.bytes()] == kPoisonByte, "wrote past the end");
}

void check_all_gather(Communicator& comm, DType dtype, uint32_t stream, bool in_place) {
  SCOPED_TRACE(detail::concat("all_gather", in_place ? " (in place)" : "", " on '", comm.name(), "' ",
                              dtype_name(dtype), " seed ", shared_seed()));
  const int size = comm.size(), me = comm.rank();
  const int64_t count = 1 + int64_t(shared_uniform(stream, 0) * 400);
  TestArray send(dtype, count, comm.device()), recv(dtype, count * size, comm.device());
  for (int64_t index = 0; index < count; ++index) {
    send.set(index, encode_value(dtype, me, 0, index, size));
    if (in_place) recv.set(me * count + index, encode_value(dtype, me, 0, index, size));
  }
  send.upload();
  recv.upload();
  const void* source = in_place ? static_cast<const char*>(recv.data()) + size_t(me * count) * dtype_size(dtype)
                                : send.data();
  comm.all_gather(source, recv.data(), count, dtype);
  comm.synchronize();
  recv.poison();
  recv.download();
  MismatchCounter counter;
  for (int rank = 0; rank < size; ++rank)
    for (int64_t index = 0; index < count; ++index) {
      const double expected = encode_value(dtype, rank, 0, index, size);
      counter.check(recv.get(rank * count + index) == expected,
                    detail::concat("block ", rank, " element ", index, ": got ", recv.get(rank * count + index),
                                   ", expected ", expected));
    }
  counter.check(recv.host[recv.bytes()] == kPoisonByte, "wrote past the end");
}

void check_broadcast(Communicator& comm, DType dtype, uint32_t stream, int root) {
  SCOPED_TRACE(detail::concat("broadcast from ", root, " on '", comm.name(), "' ", dtype_name(dtype), " seed ",
                              shared_seed()));
  const int64_t count = 1 + int64_t(shared_uniform(stream, uint64_t(root)) * 500);
  TestArray data(dtype, count, comm.device());
  if (comm.rank() == root)
    for (int64_t index = 0; index < count; ++index) data.set(index, encode_value(dtype, root, 0, index, comm.size()));
  data.upload();
  comm.broadcast(data.data(), count, dtype, root);
  comm.synchronize();
  data.poison();
  data.download();
  MismatchCounter counter;
  for (int64_t index = 0; index < count; ++index) {
    const double expected = encode_value(dtype, root, 0, index, comm.size());
    counter.check(data.get(index) == expected,
                  detail::concat("element ", index, ": got ", data.get(index), ", expected ", expected));
  }
}

class Collectives : public ::testing::TestWithParam<DeviceKind> {
 protected:
  void SetUp() override {
    if (GetParam() == DeviceKind::cuda) {
      std::string reason;
      if (!nccl_usable(&reason)) GTEST_SKIP() << reason;
    }
  }
  ParallelGroups& groups(int ep_size) { return groups_for(GetParam(), ep_size); }
  int world_size() const { return bootstrap_process(DeviceKind::cpu).world_size; }
  // Every communicator of every tested ep size, the world once.
  std::vector<Communicator*> all_communicators() {
    std::vector<Communicator*> communicators{groups(1).world.get()};
    for (int ep_size : ep_sizes_to_test(world_size())) {
      communicators.push_back(groups(ep_size).expert_parallel.get());
      communicators.push_back(groups(ep_size).expert_data_parallel.get());
    }
    return communicators;
  }
};

const DType kAllDtypes[] = {DType::f32, DType::bf16, DType::f64, DType::i32, DType::i64, DType::u8, DType::f16};

TEST_P(Collectives, AllToAllVUnevenCountsEveryDtype) {
  uint32_t stream = 100;
  for (DType dtype : kAllDtypes) check_all_to_all_v(*groups(1).world, dtype, stream += 10);
}

TEST_P(Collectives, AllToAllVOnExpertGroups) {
  uint32_t stream = 300;
  for (Communicator* comm : all_communicators())
    for (DType dtype : {DType::f32, DType::bf16}) check_all_to_all_v(*comm, dtype, stream += 10);
}

TEST_P(Collectives, AllReduceSumIsExact) {
  uint32_t stream = 500;
  for (DType dtype : kAllDtypes) check_all_reduce_sum(*groups(1).world, dtype, stream += 10);
  for (Communicator* comm : all_communicators())
    for (DType dtype : {DType::f32, DType::bf16}) check_all_reduce_sum(*comm, dtype, stream += 10);
}

TEST_P(Collectives, AllGather) {
  uint32_t stream = 700;
  for (DType dtype : kAllDtypes) check_all_gather(*groups(1).world, dtype, stream += 10, /*in_place=*/false);
  for (Communicator* comm : all_communicators())
    for (DType dtype : {DType::f32, DType::bf16}) {
      check_all_gather(*comm, dtype, stream += 10, /*in_place=*/false);
      check_all_gather(*comm, dtype, stream += 10, /*in_place=*/true);
    }
}

TEST_P(Collectives, BroadcastFromFirstAndLastRank) {
  uint32_t stream = 900;
  for (Communicator* comm : all_communicators())
    for (DType dtype : {DType::f32, DType::bf16, DType::i64}) {
      check_broadcast(*comm, dtype, stream += 10, 0);
      check_broadcast(*comm, dtype, stream += 10, comm->size() - 1);
    }
}

TEST_P(Collectives, BarrierWaitsForTheLastRank) {
  Communicator& world = *groups(1).world;
  world.barrier();  // start together
  constexpr double kDelaySeconds = 0.3;
  const auto start = std::chrono::steady_clock::now();
  if (world.rank() == 0) std::this_thread::sleep_for(std::chrono::duration<double>(kDelaySeconds));
  world.barrier();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(waited, kDelaySeconds * 0.9) << "rank " << world.rank() << " left the barrier before rank 0 arrived";
}

TEST_P(Collectives, BadArgumentsThrowBeforeCommunicating) {
  Communicator& world = *groups(1).world;
  std::vector<int64_t> too_short(size_t(world.size() + 1), 0);
  int dummy = 0;
  EXPECT_THROW(world.all_to_all_v(&dummy, too_short, too_short, &dummy, too_short, too_short, DType::i32), Error);
  EXPECT_THROW(world.broadcast(&dummy, 1, DType::i32, world.size()), Error);
  EXPECT_THROW(world.all_reduce_sum(nullptr, 4, DType::f32), Error);
  world.barrier();  // still usable: nothing was sent
}

INSTANTIATE_TEST_SUITE_P(Backends, Collectives, ::testing::Values(DeviceKind::cpu, DeviceKind::cuda),
                         [](const ::testing::TestParamInfo<DeviceKind>& info) {
                           return std::string(info.param == DeviceKind::cpu ? "mpi" : "nccl");
                         });

// The large-count paths (derived datatypes for all_to_all_v / all_gather, chunking for
// all_reduce / broadcast), forced with tiny limits so that small buffers take them.
TEST(MpiLargeCounts, DerivedTypesAndChunksGiveTheSameResults) {
  Communicator& world = *groups_for(DeviceKind::cpu, 1).world;
  struct LimitGuard {
    LimitGuard() { mpi_testing::set_large_count_limits(/*int_limit=*/7, /*chunk_elements=*/3); }
    ~LimitGuard() { mpi_testing::reset_large_count_limits(); }
  } guard;
  uint32_t stream = 1100;
  for (DType dtype : {DType::f32, DType::bf16, DType::i64, DType::u8}) {
    check_all_to_all_v(world, dtype, stream += 10);
    check_all_reduce_sum(world, dtype, stream += 10);
    check_all_gather(world, dtype, stream += 10, /*in_place=*/false);
    check_all_gather(world, dtype, stream += 10, /*in_place=*/true);
    check_broadcast(world, dtype, stream += 10, world.size() - 1);
  }
}

}  // namespace
