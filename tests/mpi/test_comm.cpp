// Collectives on both backends (MPI on host buffers, NCCL on device buffers) against values
// that are exact by construction (comm_test_support.h): all_to_all_v with uneven counts and
// zeros and gaps between segments, all_to_all_segments (several segments per pair in random
// buffer positions, peers interleaved in the lists, empty segments placed differently on the two
// sides, empty pairs, self-sends), all_reduce_sum, all_gather (also in place), broadcast and
// barrier, on the world and on the expert-parallel / expert-data-parallel sub-communicators.
// Then the ExpertDispatcher (comm/expert_dispatch.h) on top of them: every row must land at its
// exact row of the padded expert layout (sources in order within an expert), padding rows zero,
// nothing else written, and combine must bring rows back to their exact packed rows.
// Receive buffers are poisoned first; bytes outside the written segments must stay poisoned.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <thread>

#include "comm/expert_dispatch.h"
#include "comm/mpi_comm.h"
#include "src/core/timing.h"
#include "tests/mpi/comm_test_support.h"
#include "tests/unit/test_helpers.h"

using namespace switchyard;
using namespace switchyard::comm_test;
using switchyard::testing::HostTensor;
using switchyard::testing::poison;

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

// ---- all_to_all_segments ----------------------------------------------------------------------

// The non-empty segment counts of the pair source -> destination, the same on every rank: none
// for about a fifth of the pairs, else 1 to 4 segments of 1 to 40 elements.
std::vector<int64_t> pair_segment_counts(uint32_t stream, int source, int destination) {
  const uint64_t key = (uint64_t(source) * 64 + uint64_t(destination)) * 8;
  const int segments = int(shared_uniform(stream, key) * 5.0f);
  std::vector<int64_t> counts;
  for (int segment = 0; segment < segments; ++segment)
    counts.push_back(1 + int64_t(shared_uniform(stream, key + 1 + uint64_t(segment)) * 40.0f));
  return counts;
}

// One side's segment list over a buffer. The non-empty segments of each peer keep their order
// (the contract); around them this side alone inserts empty segments, interleaves the peers at
// random and places the segments in the buffer either in list order (so that a peer's neighbours
// may touch, which MPI merges) or shuffled, with random gaps.
struct SegmentSide {
  std::vector<CommSegment> list;
  std::vector<std::vector<int64_t>> peer_offsets;  // offsets of each peer's non-empty segments, in order
  int64_t total = 0;

  SegmentSide(const std::vector<std::vector<int64_t>>& counts_by_peer, std::mt19937& engine) {
    const int size = int(counts_by_peer.size());
    std::vector<std::vector<int64_t>> queues(static_cast<size_t>(size));
    for (int peer = 0; peer < size; ++peer) {
      for (int64_t count : counts_by_peer[size_t(peer)]) {
        if (engine() % 4 == 0) queues[size_t(peer)].push_back(0);  // an empty segment this side only
        queues[size_t(peer)].push_back(count);
      }
      if (engine() % 3 == 0) queues[size_t(peer)].push_back(0);
    }
    size_t remaining = 0;
    for (const std::vector<int64_t>& queue : queues) remaining += queue.size();
    std::vector<size_t> next(static_cast<size_t>(size), 0);
    for (; remaining > 0; --remaining) {
      int peer = int(engine() % unsigned(size));
      while (next[size_t(peer)] == queues[size_t(peer)].size()) peer = (peer + 1) % size;
      list.push_back({peer, 0, queues[size_t(peer)][next[size_t(peer)]++]});
    }
    std::vector<size_t> placement(list.size());
    std::iota(placement.begin(), placement.end(), 0);
    if (engine() % 2 == 0) std::shuffle(placement.begin(), placement.end(), engine);
    for (size_t index : placement) {
      if (engine() % 2 == 0) total += int64_t(engine() % 4);  // a gap before it, or none
      list[index].offset = total;
      total += list[index].count;
    }
    peer_offsets.assign(size_t(size), {});
    for (const CommSegment& segment : list)
      if (segment.count > 0) peer_offsets[size_t(segment.peer)].push_back(segment.offset);
  }
};

void check_all_to_all_segments(Communicator& comm, DType dtype, uint32_t stream) {
  SCOPED_TRACE(
      detail::concat("all_to_all_segments on '", comm.name(), "' ", dtype_name(dtype), " seed ", shared_seed()));
  const int size = comm.size(), me = comm.rank();
  std::vector<std::vector<int64_t>> send_counts(static_cast<size_t>(size)), recv_counts(static_cast<size_t>(size));
  for (int peer = 0; peer < size; ++peer) {
    send_counts[size_t(peer)] = pair_segment_counts(stream, me, peer);
    recv_counts[size_t(peer)] = pair_segment_counts(stream, peer, me);
  }
  std::mt19937 engine(uint32_t(shared_seed()) ^ (stream * 7919u) ^ (uint32_t(me) * 104729u));
  const SegmentSide send_side(send_counts, engine), recv_side(recv_counts, engine);
  TestArray send(dtype, send_side.total, comm.device()), recv(dtype, recv_side.total, comm.device());
  // Element j of a pair's stream (its segments back to back) is encode_value(..., j).
  for (int peer = 0; peer < size; ++peer) {
    int64_t running = 0;
    for (size_t segment = 0; segment < send_counts[size_t(peer)].size(); ++segment)
      for (int64_t index = 0; index < send_counts[size_t(peer)][segment]; ++index)
        send.set(send_side.peer_offsets[size_t(peer)][segment] + index, encode_value(dtype, me, peer, running++, size));
  }
  send.upload();
  recv.upload();  // poisoned

  comm.all_to_all_segments(send.data(), send_side.list, recv.data(), recv_side.list, dtype);
  comm.synchronize();
  recv.download();

  MismatchCounter counter;
  std::vector<bool> written(size_t(recv_side.total), false);
  for (int source = 0; source < size; ++source) {
    int64_t running = 0;
    for (size_t segment = 0; segment < recv_counts[size_t(source)].size(); ++segment) {
      for (int64_t index = 0; index < recv_counts[size_t(source)][segment]; ++index, ++running) {
        const int64_t position = recv_side.peer_offsets[size_t(source)][segment] + index;
        written[size_t(position)] = true;
        const double expected = encode_value(dtype, source, me, running, size);
        counter.check(recv.get(position) == expected,
                      detail::concat("from rank ", source, " segment ", segment, " element ", index, ": got ",
                                     recv.get(position), ", expected ", expected));
      }
    }
  }
  for (int64_t position = 0; position < recv_side.total; ++position)
    if (!written[size_t(position)])
      counter.check(recv.poisoned(position), detail::concat("gap element ", position, " was overwritten"));
  counter.check(recv.host[recv.bytes()] == kPoisonByte, "wrote past the end");
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

TEST_P(Collectives, AllToAllSegmentsEveryDtype) {
  uint32_t stream = 1300;
  for (DType dtype : kAllDtypes) check_all_to_all_segments(*groups(1).world, dtype, stream += 10);
}

TEST_P(Collectives, AllToAllSegmentsOnExpertGroups) {
  uint32_t stream = 1500;
  for (Communicator* comm : all_communicators())
    for (DType dtype : {DType::f32, DType::bf16}) check_all_to_all_segments(*comm, dtype, stream += 10);
}

// Nothing to move at all: every list empty (or only empty segments), null buffers allowed.
TEST_P(Collectives, AllToAllSegmentsWithNothingToMove) {
  Communicator& world = *groups(1).world;
  world.all_to_all_segments(nullptr, {}, nullptr, {}, DType::f32);
  const std::vector<CommSegment> empty_segments{{0, 5, 0}, {world.size() - 1, 0, 0}};
  world.all_to_all_segments(nullptr, empty_segments, nullptr, empty_segments, DType::bf16);
  world.synchronize();
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
  const std::vector<CommSegment> fine{{0, 0, 1}};
  for (const std::vector<CommSegment>& bad :
       {std::vector<CommSegment>{{world.size(), 0, 1}}, std::vector<CommSegment>{{-1, 0, 1}},
        std::vector<CommSegment>{{0, -1, 1}}, std::vector<CommSegment>{{0, 0, -1}},
        std::vector<CommSegment>{{0, 0, 1}, {0, std::numeric_limits<int64_t>::max() - 1, 4}}}) {
    EXPECT_THROW(world.all_to_all_segments(&dummy, bad, &dummy, fine, DType::i32), Error);
    EXPECT_THROW(world.all_to_all_segments(&dummy, fine, &dummy, bad, DType::i32), Error);
  }
  EXPECT_THROW(world.all_to_all_segments(nullptr, fine, &dummy, fine, DType::i32), Error);  // null with a count
  EXPECT_THROW(world.all_to_all_segments(&dummy, fine, nullptr, fine, DType::i32), Error);
  world.barrier();  // still usable: nothing was sent
}

INSTANTIATE_TEST_SUITE_P(Backends, Collectives, ::testing::Values(DeviceKind::cpu, DeviceKind::cuda),
                         [](const ::testing::TestParamInfo<DeviceKind>& info) {
                           return std::string(info.param == DeviceKind::cpu ? "mpi" : "nccl");
                         });

// The large-count paths (derived datatypes for all_to_all_v / all_to_all_segments / all_gather,
// chunking for all_reduce / broadcast), forced with tiny limits so that small buffers take them.
TEST(MpiLargeCounts, DerivedTypesAndChunksGiveTheSameResults) {
  Communicator& world = *groups_for(DeviceKind::cpu, 1).world;
  struct LimitGuard {
    LimitGuard() { mpi_testing::set_large_count_limits(/*int_limit=*/7, /*chunk_elements=*/3); }
    ~LimitGuard() { mpi_testing::reset_large_count_limits(); }
  } guard;
  uint32_t stream = 1100;
  for (DType dtype : {DType::f32, DType::bf16, DType::i64, DType::u8}) {
    check_all_to_all_v(world, dtype, stream += 10);
    check_all_to_all_segments(world, dtype, stream += 10);  // blocks over 7 elements split
    check_all_reduce_sum(world, dtype, stream += 10);
    check_all_gather(world, dtype, stream += 10, /*in_place=*/false);
    check_all_gather(world, dtype, stream += 10, /*in_place=*/true);
    check_broadcast(world, dtype, stream += 10, world.size() - 1);
  }
}

// ---- ExpertDispatcher alone -------------------------------------------------------------------

// Row `index` of the rows `source` routes to global expert `expert`, column `column`: distinct
// integers, exact in f32.
float dispatch_value(int source, int expert, int64_t index, int64_t column, int experts) {
  return float(((int64_t(source) * experts + expert) * 32 + index) * 8 + column + 1);
}

struct DispatchCase {
  int local_experts, alignment, chunks;
};

void check_dispatcher(DeviceKind device, ParallelGroups& groups, const DispatchCase& test, uint32_t stream) {
  Communicator& ep = *groups.expert_parallel;
  const int ranks = ep.size(), me = ep.rank(), local = test.local_experts, experts = ranks * local;
  const int64_t width = 5;
  SCOPED_TRACE(::testing::Message() << "P=" << ranks << " L=" << local << " A=" << test.alignment
                                    << " C=" << test.chunks << ", seed " << shared_seed());
  // Rows source -> global expert, the same on every rank: 0 for about a third, else 1..10.
  auto rows_of = [&](int source, int expert) -> int64_t {
    const float draw = shared_uniform(stream, uint64_t(source) * 4096 + uint64_t(expert));
    return draw < 0.3f ? 0 : 1 + int64_t((draw - 0.3f) / 0.7f * 10.0f);
  };
  std::vector<int32_t> offsets(size_t(experts) + 1, 0);
  for (int expert = 0; expert < experts; ++expert)
    offsets[size_t(expert) + 1] = offsets[size_t(expert)] + int32_t(rows_of(me, expert));
  const int64_t send_rows = offsets.back();
  HostTensor send(DType::f32, {send_rows + 1, width});
  poison(send.tensor());
  for (int expert = 0; expert < experts; ++expert)
    for (int64_t index = 0; index < rows_of(me, expert); ++index)
      for (int64_t column = 0; column < width; ++column)
        send.data<float>()[(offsets[size_t(expert)] + index) * width + column] =
            dispatch_value(me, expert, index, column, experts);
  // The expected padded layout of this rank's local experts.
  std::vector<int64_t> expected_offsets(size_t(local) + 1, 0);
  for (int expert = 0; expert < local; ++expert) {
    int64_t total = 0;
    for (int source = 0; source < ranks; ++source) total += rows_of(source, me * local + expert);
    expected_offsets[size_t(expert) + 1] = expected_offsets[size_t(expert)] + round_up(total, test.alignment);
  }
  const int64_t expert_rows = expected_offsets.back();

  const ExecContext context{device, create_stream(device)};
  ExpertDispatcher dispatcher(groups.expert_parallel, device, experts, test.alignment, test.chunks);
  Buffer offsets_memory(device, offsets.size() * sizeof(int32_t)), send_memory(device, send.tensor().bytes()),
      expert_memory(device, size_t(expert_rows + 2) * size_t(width) * sizeof(float));
  device_copy(offsets_memory.data(), device, offsets.data(), DeviceKind::cpu, offsets_memory.bytes());
  device_copy(send_memory.data(), device, send.tensor().data, DeviceKind::cpu, send_memory.bytes());
  HostTensor padded(DType::f32, {expert_rows + 2, width});
  poison(padded.tensor());
  device_copy(expert_memory.data(), device, padded.tensor().data, DeviceKind::cpu, expert_memory.bytes());
  Tensor send_view = send_memory.view(DType::f32, {send_rows + 1, width});
  Tensor expert_view_all = expert_memory.view(DType::f32, {expert_rows + 2, width});

  const ExpertExchangePlan& plan = dispatcher.exchange_counts(context, offsets_memory.view(DType::i32, {experts + 1}));
  EXPECT_EQ(plan.send_rows(), send_rows);
  EXPECT_EQ(plan.expert_offsets, expected_offsets);
  for (int chunk = 0; chunk < dispatcher.chunks(); ++chunk)
    dispatcher.dispatch(context, chunk, send_view, expert_view_all);
  for (int chunk = 0; chunk < dispatcher.chunks(); ++chunk) dispatcher.wait_dispatched(context, chunk);
  ops::synchronize(context);
  device_copy(padded.tensor().data, DeviceKind::cpu, expert_memory.data(), device, expert_memory.bytes());

  int64_t mismatches = 0;
  auto expect_row = [&](int64_t row, auto&& expected_at, const char* what) {
    for (int64_t column = 0; column < width; ++column) {
      const float actual = padded.data<float>()[row * width + column], expected = expected_at(column);
      const bool same = std::isnan(expected) ? std::isnan(actual) : actual == expected;
      if (!same && ++mismatches <= 5)
        ADD_FAILURE() << what << " row " << row << " column " << column << ": got " << actual << ", expected "
                      << expected;
    }
  };
  for (int expert = 0; expert < local; ++expert) {
    const int global = me * local + expert;
    int64_t row = expected_offsets[size_t(expert)];
    for (int source = 0; source < ranks; ++source)
      for (int64_t index = 0; index < rows_of(source, global); ++index, ++row)
        expect_row(row, [&](int64_t column) { return dispatch_value(source, global, index, column, experts); }, "data");
    for (; row < expected_offsets[size_t(expert) + 1]; ++row) expect_row(row, [](int64_t) { return 0.0f; }, "padding");
  }
  for (int64_t row = expert_rows; row < expert_rows + 2; ++row)
    expect_row(row, [](int64_t) { return std::numeric_limits<float>::quiet_NaN(); }, "spare");
  EXPECT_EQ(mismatches, 0) << "dispatch";

  // Combine: the "expert output" is the negated input; it must land on the sender's packed rows.
  for (int64_t element = 0; element < expert_rows * width; ++element) padded.data<float>()[element] *= -1.0f;
  device_copy(expert_memory.data(), device, padded.tensor().data, DeviceKind::cpu, expert_memory.bytes());
  poison(send.tensor());
  device_copy(send_memory.data(), device, send.tensor().data, DeviceKind::cpu, send_memory.bytes());
  for (int chunk = 0; chunk < dispatcher.chunks(); ++chunk)
    dispatcher.combine(context, chunk, expert_view_all, send_view);
  dispatcher.wait_combined(context);
  ops::synchronize(context);
  device_copy(send.tensor().data, DeviceKind::cpu, send_memory.data(), device, send_memory.bytes());
  mismatches = 0;
  for (int expert = 0; expert < experts; ++expert)
    for (int64_t index = 0; index < rows_of(me, expert); ++index)
      for (int64_t column = 0; column < width; ++column) {
        const float actual = send.data<float>()[(offsets[size_t(expert)] + index) * width + column];
        const float expected = -dispatch_value(me, expert, index, column, experts);
        if (actual != expected && ++mismatches <= 5)
          ADD_FAILURE() << "combine: expert " << expert << " row " << index << ": got " << actual << ", expected "
                        << expected;
      }
  for (int64_t column = 0; column < width; ++column)
    EXPECT_TRUE(std::isnan(send.data<float>()[send_rows * width + column])) << "combine wrote past the sent rows";
  EXPECT_EQ(mismatches, 0) << "combine";
  destroy_stream(device, context.stream);
}

const DispatchCase kDispatchCases[] = {{3, 4, 2}, {2, 1, 1}, {4, 8, 4}, {1, 16, 1}};

TEST(ExpertDispatch, CpuRowsLandInThePaddedLayoutAndReturn) {
  const int world_size = bootstrap_process(DeviceKind::cpu).world_size;
  uint32_t stream = 2000;
  for (int ep_size : ep_sizes_to_test(world_size))
    for (const DispatchCase& test : kDispatchCases)
      check_dispatcher(DeviceKind::cpu, groups_for(DeviceKind::cpu, ep_size), test, stream += 10);
}

TEST(ExpertDispatch, NcclRowsLandInThePaddedLayoutAndReturn) {
  std::string reason;
  if (!nccl_usable(&reason)) GTEST_SKIP() << reason;
  const int world_size = bootstrap_process(DeviceKind::cuda).world_size;
  uint32_t stream = 3000;
  for (int ep_size : ep_sizes_to_test(world_size))
    for (const DispatchCase& test : kDispatchCases)
      check_dispatcher(DeviceKind::cuda, groups_for(DeviceKind::cuda, ep_size), test, stream += 10);
}

}  // namespace
