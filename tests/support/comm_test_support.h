// Shared helpers of the MPI/NCCL communicator tests (tests/test_*.cpp).
//
// Values are exact by construction: element `index` of the message from rank `source` to rank
// `destination` is encode_value(...), an integer every tested dtype stores exactly, so results
// are compared bit for bit. Which elements move where (counts, gaps, a per-run salt) comes from
// a seed drawn fresh on rank 0 each run and broadcast, and is printed with every failure.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "src/comm/bootstrap.h"
#include "src/comm/ep_transport.h"
#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/mpi_check.h"
#include "src/core/rng.h"

namespace switchyard::comm_test {

// Long enough for 4 oversubscribed ranks on 2 cores, short enough that a test whose ranks
// disagree fails instead of hitting the ctest timeout.
constexpr double kTestTimeoutSeconds = 120.0;

inline uint64_t shared_seed() {
  static uint64_t seed = [] {
    uint64_t value = 0;
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) value = (uint64_t(std::random_device{}()) << 32) | std::random_device{}();
    MPI_CHECK(MPI_Bcast(&value, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD));
    return value;
  }();
  return seed;
}

// A uniform draw in [0, 1) that every rank computes identically for the same (stream, key).
inline float shared_uniform(uint32_t stream, uint64_t key) { return philox_uniform(shared_seed(), stream, 0, key); }

// An integer value for (source, destination, index), exact in `dtype` (bf16 and uint8 hold
// integers up to 255 only, so they carry fewer bits of the pair), never zero.
inline double encode_value(DType dtype, int source, int destination, int64_t index, int world_size) {
  const int64_t salt = int64_t(shared_seed() % 1000);
  if (dtype == DType::bf16 || dtype == DType::u8 || dtype == DType::f16) {
    const int64_t pair = (int64_t(source) * world_size + destination) % 15;
    return double((pair + 1) * 16 + (index + salt) % 16);  // 16 .. 255
  }
  const int64_t pair = int64_t(source) * 64 + destination;  // < 4096 for up to 64 ranks
  return double(pair * 4096 + (index + salt) % 4096 + 1);    // < 2^24: exact in fp32
}

inline void store_value(DType dtype, void* base, int64_t index, double value) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(base)[index] = float(value); return;
    case DType::f64: static_cast<double*>(base)[index] = value; return;
    case DType::bf16: static_cast<uint16_t*>(base)[index] = Bf16(float(value)).bits; return;
    case DType::f16: static_cast<uint16_t*>(base)[index] = Half(float(value)).bits; return;
    case DType::i32: static_cast<int32_t*>(base)[index] = int32_t(value); return;
    case DType::i64: static_cast<int64_t*>(base)[index] = int64_t(value); return;
    case DType::u8: static_cast<uint8_t*>(base)[index] = uint8_t(value); return;
  }
}

inline double load_value(DType dtype, const void* base, int64_t index) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(base)[index];
    case DType::f64: return static_cast<const double*>(base)[index];
    case DType::bf16: return bits_float(uint32_t(static_cast<const uint16_t*>(base)[index]) << 16);
    case DType::f16: return Half::to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::i32: return static_cast<const int32_t*>(base)[index];
    case DType::i64: return double(static_cast<const int64_t*>(base)[index]);
    case DType::u8: return static_cast<const uint8_t*>(base)[index];
  }
  return 0;
}

constexpr uint8_t kPoisonByte = 0xA5;

// A host array of `count` elements plus its copy where the communicator wants it.
struct TestArray {
  DType dtype;
  int64_t count;
  std::vector<uint8_t> host;
  Buffer placed;  // on the communicator's device

  TestArray(DType dtype_, int64_t count_, DeviceKind device)
      : dtype(dtype_), count(count_), host(size_t(count_) * dtype_size(dtype_) + 1, kPoisonByte),
        placed(device, size_t(count_) * dtype_size(dtype_) + 1) {}
  size_t bytes() const { return size_t(count) * dtype_size(dtype); }
  void set(int64_t index, double value) { store_value(dtype, host.data(), index, value); }
  double get(int64_t index) const { return load_value(dtype, host.data(), index); }
  bool poisoned(int64_t index) const {
    const size_t element = dtype_size(dtype);
    for (size_t byte = 0; byte < element; ++byte)
      if (host[size_t(index) * element + byte] != kPoisonByte) return false;
    return true;
  }
  void poison() { std::memset(host.data(), kPoisonByte, host.size()); }
  void upload() { device_copy(placed.data(), placed.device(), host.data(), DeviceKind::cpu, host.size()); }
  void download() { device_copy(host.data(), DeviceKind::cpu, placed.data(), placed.device(), host.size()); }
  void* data() { return placed.data(); }
};

// True on every rank when every node has at least one GPU per local rank (NCCL's requirement),
// decided collectively so that all ranks run or skip the same NCCL tests.
inline bool nccl_usable(std::string* reason) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  const int local_ok = cuda_device_count() >= context.local_size ? 1 : 0;
  int all_ok = 0;
  MPI_CHECK(MPI_Allreduce(&local_ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (!all_ok && reason)
    *reason = detail::concat("NCCL tests need one GPU per local rank: ", cuda_device_count(), " GPU(s) for ",
                             context.local_size, " rank(s) on ", process_host(), " (or a node elsewhere lacks them)");
  return all_ok != 0;
}

// Parallel groups per (device, ep_size, ranks_per_node), created once: NCCL set-up is expensive.
// Every rank runs the same tests in the same order, so the collective creation calls match.
// ranks_per_node < ep_size (dividing it) emulates nodes: the groups get node and rail communicators.
inline std::map<std::tuple<DeviceKind, int, int>, ParallelGroups>& group_cache() {
  static std::map<std::tuple<DeviceKind, int, int>, ParallelGroups> cache;
  return cache;
}

inline ParallelGroups& groups_for(DeviceKind device, int ep_size, int ranks_per_node = 0) {
  auto key = std::make_tuple(device, ep_size, ranks_per_node);
  auto found = group_cache().find(key);
  if (found != group_cache().end()) return found->second;
  ProcessContext context = bootstrap_process(device);
  context.device = device;  // a cpu request keeps using MPI even after a GPU was selected
  const ParallelLayout layout(context.world_size, ep_size, /*num_experts=*/0, ranks_per_node);
  return group_cache().emplace(key, create_parallel_groups(context, layout, kTestTimeoutSeconds)).first->second;
}

// The EP layer's exchange options over `groups` (the node and rail groups when it has them).
inline EpLayerOptions layer_options(const ParallelGroups& groups, int a2a_chunks = 1,
                                    EpTransport transport = EpTransport::automatic,
                                    EpDispatch dispatch = EpDispatch::activation,
                                    EpOverlap overlap = EpOverlap::none) {
  EpLayerOptions options{a2a_chunks, transport, dispatch};
  options.node_group = groups.expert_parallel_node;
  options.rail_group = groups.expert_parallel_rail;
  options.overlap = overlap;
  return options;
}

// Both overlap modes: every EP equivalence test runs each (none first).
inline std::vector<EpOverlap> overlaps_to_test() { return {EpOverlap::none, EpOverlap::two_part}; }

// The node sizes to test for an EP group of ep_size: 0 (one node), then emulated nodes of
// ep_size / 2 and of 1 rank (each once, when they make the group span several nodes).
inline std::vector<int> node_sizes_to_test(int ep_size) {
  std::vector<int> sizes{0};
  if (ep_size >= 4) sizes.push_back(ep_size / 2);
  if (ep_size >= 2) sizes.push_back(1);
  return sizes;
}

// Called by main before MPI_Finalize: communicators must not outlive MPI or the CUDA runtime.
inline void release_groups() { group_cache().clear(); }

// The ep sizes to test on this world: 1, 2 and the world size (each once, 2 only if it divides).
inline std::vector<int> ep_sizes_to_test(int world_size) {
  std::vector<int> sizes{1};
  if (world_size % 2 == 0 && world_size != 2) sizes.push_back(2);
  if (world_size > 1) sizes.push_back(world_size);
  return sizes;
}

}  // namespace switchyard::comm_test
