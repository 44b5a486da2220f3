// The CUDA direct peer row moves (src/ops/cuda/ep_nvlink.cu) on a virtual group in one process
// (tests/support/ep_nvlink_group.h): every "rank" is a set of device buffers, peer_bases point at
// them, so the kernels' index math, unit choice and signals are checked without a second GPU. The
// bytes must equal the NCCL path's reference (all-to-all + ep_to_expert_layout, and back);
// receive buffers start as garbage. The multi-GPU run over mapped peer memory is in
// tests/model/mpi/test_expert_parallel.cpp.
#include <cuda_runtime.h>

#include <tuple>

#include "src/ops/moe_ops.h"
#include "src/core/cuda_check.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/ep_nvlink_group.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

template <typename T>
Buffer upload_vector(const std::vector<T>& values) {
  Buffer buffer(DeviceKind::cuda, std::max<size_t>(values.size() * sizeof(T), 16));
  if (!values.empty()) device_copy(buffer.data(), DeviceKind::cuda, values.data(), DeviceKind::cpu, values.size() * sizeof(T));
  return buffer;
}

Bytes download_bytes(const void* device, size_t bytes) {
  Bytes host(bytes);
  if (bytes) device_copy(host.data(), DeviceKind::cpu, device, DeviceKind::cuda, bytes);
  return host;
}

// The fused pull + gather against ep_pull_rows (checked above) followed by unpermute_combine
// (gates) or permute_backward (no gates): bit for bit, rows kept too.
void check_pull_combine(const VirtualEpGroup& group, int rank, const EpPeerRows& peers, DType dtype, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t rows = group.rows_of(rank), width = group.row_bytes / int64_t(dtype_size(dtype));
  const TokenMap map = make_token_map(rows, 3, rng);
  Buffer choice_rows = upload_vector(map.choice_rows), gates = upload_vector(map.gates);
  Buffer pulled = upload_vector(group.expected_pulled[size_t(rank)]);
  const size_t token_bytes = size_t(map.tokens * group.row_bytes);
  Buffer fused(DeviceKind::cuda, token_bytes), reference(DeviceKind::cuda, token_bytes),
      kept(DeviceKind::cuda, std::max<size_t>(size_t(rows * group.row_bytes), 16));
  RoutingResult routing;
  routing.gates = Tensor(gates.data(), DType::f32, DeviceKind::cuda, {map.tokens, map.k});
  DispatchMap dispatch;
  dispatch.choice_rows = Tensor(choice_rows.data(), DType::i32, DeviceKind::cuda, {map.tokens, map.k});
  const Tensor pulled_rows(pulled.data(), dtype, DeviceKind::cuda, {rows, width});
  for (bool weighted : {true, false}) {
    SCOPED_TRACE(weighted ? "unpermute_combine" : "permute_backward");
    device_memset(fused.data(), DeviceKind::cuda, 0xFF, fused.bytes());
    device_memset(reference.data(), DeviceKind::cuda, 0x7F, reference.bytes());
    device_memset(kept.data(), DeviceKind::cuda, 0xFF, kept.bytes());
    cuda::ep_pull_combine(peers, rows, choice_rows.as<int32_t>(), weighted ? gates.as<float>() : nullptr, map.tokens,
                          map.k, dtype, fused.data(), weighted ? kept.data() : nullptr, nullptr);
    Tensor out(reference.data(), dtype, DeviceKind::cuda, {map.tokens, width});
    if (weighted) cuda::unpermute_combine(pulled_rows, routing, dispatch, out, nullptr);
    else cuda::permute_backward(pulled_rows, dispatch, map.tokens, out, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(download_bytes(fused.data(), token_bytes), download_bytes(reference.data(), token_bytes));
    if (weighted)
      EXPECT_EQ(download_bytes(kept.data(), size_t(rows * group.row_bytes)), group.expected_pulled[size_t(rank)]);
  }
}

void run_cuda_group(const VirtualEpGroup& group, DType dtype) {
  const int ranks = group.ranks;
  const size_t padded_bytes = size_t(std::max<int64_t>(group.max_rows, 1) * group.row_bytes);
  std::vector<Buffer> padded, packed, offsets, peer_rows, layout_offsets, layout_totals, boards;
  std::vector<void*> bases;
  std::vector<unsigned long long*> board_pointers;
  for (int rank = 0; rank < ranks; ++rank) {
    padded.emplace_back(DeviceKind::cuda, padded_bytes);
    device_memset(padded.back().data(), DeviceKind::cuda, 0xAB, padded_bytes);
    bases.push_back(padded.back().data());
    packed.push_back(upload_vector(group.packed[size_t(rank)]));
    offsets.push_back(upload_vector(group.offsets[size_t(rank)]));
    peer_rows.push_back(upload_vector(group.peer_rows[size_t(rank)]));
    layout_offsets.push_back(upload_vector(group.expert_offsets[size_t(rank)]));
    layout_totals.push_back(upload_vector(group.expert_totals[size_t(rank)]));
    boards.emplace_back(DeviceKind::cuda, size_t(kEpSignalKinds * ranks) * sizeof(unsigned long long));
    device_memset(boards.back().data(), DeviceKind::cuda, 0, boards.back().bytes());
    board_pointers.push_back(boards.back().as<unsigned long long>());
  }
  Buffer bases_device = upload_vector(bases), boards_device = upload_vector(board_pointers);
  Buffer counter(DeviceKind::cuda, 16);
  device_memset(counter.data(), DeviceKind::cuda, 0, 16);
  EpWaitFailure* failure = nullptr;
  CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&failure), sizeof(EpWaitFailure), cudaHostAllocMapped));
  std::memset(failure, 0, sizeof(EpWaitFailure));
  EpWaitFailure* failure_device = nullptr;
  CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&failure_device), failure, 0));

  auto peers_of = [&](int rank) {
    return virtual_peer_rows(group, rank, offsets[size_t(rank)].as<int32_t>(), peer_rows[size_t(rank)].as<int32_t>(),
                             static_cast<void* const*>(bases_device.data()));
  };
  auto signal_of = [&](int rank) {
    EpSignalBoards signal;
    signal.boards = static_cast<unsigned long long* const*>(boards_device.data());
    signal.num_ranks = ranks;
    signal.rank = rank;
    return signal;
  };
  for (int rank = 0; rank < ranks; ++rank)
    cuda::ep_push_rows(packed[size_t(rank)].data(), group.rows_of(rank), peers_of(rank), signal_of(rank),
                       kEpRowsDispatched, counter.as<unsigned>(), nullptr);
  // Every rank heard once from every rank, so each wait for 1 returns (a wrong count would trap).
  for (int rank = 0; rank < ranks; ++rank) {
    cuda::ep_wait_signals(signal_of(rank), kEpRowsDispatched, 1, int64_t(20e9), failure_device, nullptr);
    cuda::ep_zero_padding_rows(padded[size_t(rank)].data(), group.row_bytes, layout_offsets[size_t(rank)].as<int32_t>(),
                               layout_totals[size_t(rank)].as<int32_t>(), group.local, group.max_rows, nullptr);
  }
  for (int rank = 0; rank < ranks; ++rank) cuda::ep_signal_peers(signal_of(rank), kEpOutputsReady, nullptr);
  {
    // The barrier form, one stream per rank (each waits for the others' signals, which come from
    // kernels on the other streams): afterwards every board holds one signal of it from everyone.
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<cudaStream_t> streams(static_cast<size_t>(ranks));
    for (cudaStream_t& stream : streams) CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int rank = 0; rank < ranks; ++rank)
      cuda::ep_signal_and_wait(signal_of(rank), kEpGradientsDispatched, 1, int64_t(20e9), failure_device,
                               streams[size_t(rank)]);
    CUDA_CHECK(cudaDeviceSynchronize());
    for (cudaStream_t stream : streams) CUDA_CHECK(cudaStreamDestroy(stream));
  }
  // The count all-gather: every rank's send counts (from its packed offsets) into every rank's
  // count region, row `rank`.
  const int64_t experts = group.experts();
  std::vector<Buffer> count_regions, own_offsets;
  std::vector<void*> count_bases;
  for (int rank = 0; rank < ranks; ++rank) {
    count_regions.emplace_back(DeviceKind::cuda, size_t(ranks * experts) * sizeof(int32_t));
    device_memset(count_regions.back().data(), DeviceKind::cuda, 0xFF, count_regions.back().bytes());
    count_bases.push_back(count_regions.back().data());
    std::vector<int32_t> offsets(size_t(experts) + 1, 0);
    for (int64_t expert = 0; expert < experts; ++expert)
      offsets[size_t(expert) + 1] = offsets[size_t(expert)] + group.all_counts[size_t(rank * experts + expert)];
    own_offsets.push_back(upload_vector(offsets));
  }
  Buffer count_bases_device = upload_vector(count_bases);
  for (int rank = 0; rank < ranks; ++rank)
    cuda::ep_all_gather_counts(own_offsets[size_t(rank)].as<int32_t>(), experts,
                               static_cast<void* const*>(count_bases_device.data()), signal_of(rank),
                               kEpCountsGathered, nullptr);
  for (int rank = 0; rank < ranks; ++rank)
    cuda::ep_wait_signals(signal_of(rank), kEpCountsGathered, 1, int64_t(20e9), failure_device, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(failure->failed, 0);
  for (int rank = 0; rank < ranks; ++rank) {
    const std::vector<unsigned long long> counts =
        [&] {
          const Bytes raw = download_bytes(boards[size_t(rank)].data(), boards[size_t(rank)].bytes());
          std::vector<unsigned long long> values(raw.size() / sizeof(unsigned long long));
          std::memcpy(values.data(), raw.data(), raw.size());
          return values;
        }();
    for (int source = 0; source < ranks; ++source) {
      EXPECT_EQ(counts[size_t(kEpRowsDispatched * ranks + source)], 1u) << "rank " << rank << " from " << source;
      EXPECT_EQ(counts[size_t(kEpOutputsReady * ranks + source)], 1u) << "rank " << rank << " from " << source;
      EXPECT_EQ(counts[size_t(kEpCountsGathered * ranks + source)], 1u) << "rank " << rank << " from " << source;
      EXPECT_EQ(counts[size_t(kEpGradientsDispatched * ranks + source)], 1u);
      EXPECT_EQ(counts[size_t(kEpInputGradientsReady * ranks + source)], 0u);
    }
    const Bytes gathered = download_bytes(count_regions[size_t(rank)].data(), count_regions[size_t(rank)].bytes());
    EXPECT_EQ(0, std::memcmp(gathered.data(), group.all_counts.data(), gathered.size())) << "counts at " << rank;
    const Bytes& expected = group.expected_padded[size_t(rank)];
    EXPECT_EQ(download_bytes(padded[size_t(rank)].data(), expected.size()), expected) << "receiver " << rank;
  }
  // The way back.
  for (int rank = 0; rank < ranks; ++rank) {
    const Bytes& outputs = group.outputs[size_t(rank)];
    if (!outputs.empty())
      device_copy(padded[size_t(rank)].data(), DeviceKind::cuda, outputs.data(), DeviceKind::cpu, outputs.size());
  }
  for (int rank = 0; rank < ranks; ++rank) {
    Buffer pulled(DeviceKind::cuda, std::max<size_t>(group.packed[size_t(rank)].size(), 16));
    device_memset(pulled.data(), DeviceKind::cuda, 0xEE, pulled.bytes());
    cuda::ep_pull_rows(pulled.data(), group.rows_of(rank), peers_of(rank), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(download_bytes(pulled.data(), group.packed[size_t(rank)].size()), group.expected_pulled[size_t(rank)])
        << "sender " << rank;
    check_pull_combine(group, rank, peers_of(rank), dtype, 977 * uint64_t(rank + 1));
  }
  CUDA_CHECK(cudaFreeHost(failure));
}

class EpNvlinkCuda : public ::testing::TestWithParam<std::tuple<int, int, int, int>> {};

TEST_P(EpNvlinkCuda, PushPullAndSignalsMatchTheAllToAllPath) {
  SKIP_WITHOUT_CUDA();
  const auto [ranks, local, alignment, row_bytes] = GetParam();
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    const DType dtype = row_bytes % 16 == 0 && row_bytes > 64 ? DType::bf16 : DType::f32;
    run_cuda_group(make_virtual_ep_group(ranks, local, alignment, row_bytes, 300, seed * 104729 + uint64_t(ranks), dtype),
                   dtype);
  }
}

// Row widths: 16-byte units (bf16 D = 768, 24), 4-byte units (D = 10).
INSTANTIATE_TEST_SUITE_P(Groups, EpNvlinkCuda,
                         ::testing::Values(std::make_tuple(1, 4, 128, 1536), std::make_tuple(2, 3, 128, 1536),
                                           std::make_tuple(3, 2, 8, 48), std::make_tuple(4, 5, 16, 20),
                                           std::make_tuple(8, 2, 128, 1536)));

}  // namespace
