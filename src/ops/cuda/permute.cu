// Token <-> expert-row moves on CUDA (semantics: src/ops/moe_ops.h and src/ops/cpu/permute.cpp).
//
// Layout: tokens [T, D]; the expert-contiguous buffer [R, D] gives expert e the rows
// [offsets[e], offsets[e+1]). A kept choice (t, j) -- expert id >= 0 and 0 <= slot < capacity,
// capacity = scalars[kCapacity] read on the device, so no host sync -- lives at row
// offsets[e] + slot. Rows no choice maps to are padding: the segment tail
// [offsets[e] + kept_e, offsets[e+1]) with kept_e = min(count_e, capacity), and [offsets[E], R).
// They are zero in every [R, D] output and -1 in row_tokens.
//   permute:                    permuted[row(t, j)] = tokens[t]
//   permute_backward:           grad_tokens[t] = sum_j grad_permuted[row(t, j)]
//   unpermute_combine:          combined[t] = sum_j gate[t, j] * expert_outputs[row(t, j)]
//   unpermute_combine_backward: grad_expert_outputs[row(t, j)] = gate[t, j] * grad_combined[t]
//                               grad_gates[t, j] = <grad_combined[t], expert_outputs[row(t, j)]>
// (sums over kept choices; dropped and empty choices get row -1 and grad_gate 0).
//
// One warp per token; lanes stride over 16-byte packs of a row (one element at a time when the
// width or alignment rules packs out). Every output element is written by exactly one thread:
// the token-side ops are gathers accumulated in fp32 in choice order, so there are no atomics and
// results are deterministic. Rows no choice refers to are zeroed by extra blocks of the same
// launch: in permute one block per expert for its segment padding and a few striding over the
// tail (from the routing layout, since the map is being built); in unpermute_combine_backward a
// few blocks sweeping the rows whose row_tokens entry is -1 (so any consistent map works, as on
// the CPU).
#include <algorithm>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kMaxChoices = kMaxTopK;  // src/ops/moe_ops.h
// Row pieces (16-byte packs) a lane loads before it uses any: a row of D = 768 bf16 is 3 per lane,
// so one batch issues all of a row's loads at once instead of one dependent round trip each.
constexpr int kBatch = 4;

// Where the padding rows are, all device pointers (routing outputs).
struct PaddingArgs {
  const int* expert_offsets;
  const int* expert_counts;
  const int* scalars;
  int num_experts;
  int tail_blocks;
  int64_t rows;
  int* row_tokens;  // set to -1 for padding rows when not null
};

// Zeroes the padding rows assigned to `padding_block` (0 <= padding_block < E + tail_blocks) of a
// buffer of `rows` rows of `row_units` Units each.
template <typename Unit>
__device__ __forceinline__ void zero_padding_rows(const PaddingArgs& padding, int padding_block, Unit* buffer,
                                                  int64_t row_units) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t begin, end, first, stride;
  if (padding_block < padding.num_experts) {
    const int kept = min(padding.expert_counts[padding_block], padding.scalars[kCapacity]);
    begin = int64_t(padding.expert_offsets[padding_block]) + kept;
    end = padding.expert_offsets[padding_block + 1];
    first = warp;
    stride = kWarpsPerBlock;
  } else {
    begin = padding.expert_offsets[padding.num_experts];
    end = padding.rows;
    first = int64_t(padding_block - padding.num_experts) * kWarpsPerBlock + warp;
    stride = int64_t(padding.tail_blocks) * kWarpsPerBlock;
  }
  end = min(end, padding.rows);
  for (int64_t row = begin + first; row < end; row += stride) {
    Unit* out = buffer + row * row_units;
    for (int64_t unit = lane; unit < row_units; unit += 32) out[unit] = Unit{};
    if (lane == 0 && padding.row_tokens) padding.row_tokens[row] = -1;
  }
}

// The rows of token `token`'s K choices, on every lane (-1: no row). Lane j < K reads choice j.
__device__ __forceinline__ void token_rows(const int* choice_rows, int64_t token, int k_max, int64_t rows,
                                           int (&rows_of)[kMaxChoices]) {
  const int lane = threadIdx.x % 32;
  int row = -1;
  if (lane < k_max) {
    row = choice_rows[token * k_max + lane];
    if (row >= rows) row = -1;  // cannot happen for a map made by permute; never write out of bounds
  }
#pragma unroll
  for (int choice = 0; choice < kMaxChoices; ++choice) rows_of[choice] = __shfl_sync(kFullWarpMask, row, choice);
}

// ---- permute: a typeless row scatter (Unit = 16, 4 or 2 bytes) ----

struct PermuteArgs {
  const void* tokens;
  const int* expert_ids;
  const int* slots;
  int64_t num_tokens;
  int k_max;
  int64_t row_units;
  int token_blocks;
  void* permuted;
  int* choice_rows;
  PaddingArgs padding;
};

template <typename Unit>
__global__ void __launch_bounds__(kThreads) permute_kernel(PermuteArgs args) {
  Unit* permuted = static_cast<Unit*>(args.permuted);
  if (int(blockIdx.x) >= args.token_blocks) {
    zero_padding_rows<Unit>(args.padding, int(blockIdx.x) - args.token_blocks, permuted, args.row_units);
    return;
  }
  const int lane = threadIdx.x % 32;
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= args.num_tokens) return;
  const int k_max = args.k_max;
  int row = -1;
  if (lane < k_max) {
    const int64_t index = token * k_max + lane;
    const int expert = args.expert_ids[index], slot = args.slots[index];
    if (expert >= 0 && slot >= 0 && slot < args.padding.scalars[kCapacity]) {
      row = args.padding.expert_offsets[expert] + slot;
      if (row >= args.padding.rows) row = -1;  // excluded by the host check on R; never write out of bounds
    }
    args.choice_rows[index] = row;
    if (row >= 0) args.padding.row_tokens[row] = int(token);
  }
  int rows_of[kMaxChoices];
#pragma unroll
  for (int choice = 0; choice < kMaxChoices; ++choice) rows_of[choice] = __shfl_sync(kFullWarpMask, row, choice);

  const Unit* source = static_cast<const Unit*>(args.tokens) + token * args.row_units;
  for (int64_t base = lane; base < args.row_units; base += 32 * kBatch) {
    Unit values[kBatch];  // the loads of kBatch units first: a row is only a few per lane
#pragma unroll
    for (int step = 0; step < kBatch; ++step)
      if (base + step * 32 < args.row_units) values[step] = source[base + step * 32];
#pragma unroll
    for (int step = 0; step < kBatch; ++step) {
      const int64_t unit = base + step * 32;
      if (unit >= args.row_units) break;
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice)
        if (rows_of[choice] >= 0) permuted[rows_of[choice] * args.row_units + unit] = values[step];
    }
  }
}

// ---- permute_backward and unpermute_combine: weighted gathers of rows into tokens ----

template <typename T, int kElems, int kChoices>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const T* rows_in, const int* choice_rows, const float* gates, int64_t num_tokens, int k_max,
                       int64_t width, int64_t rows, T* tokens_out) {
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= num_tokens) return;
  int rows_of[kMaxChoices];
  token_rows(choice_rows, token, k_max, rows, rows_of);
  const T* sources[kChoices];
  float weights[kChoices];
#pragma unroll
  for (int choice = 0; choice < kChoices; ++choice) {
    sources[choice] = rows_of[choice] >= 0 ? rows_in + rows_of[choice] * width : nullptr;
    weights[choice] = (gates && rows_of[choice] >= 0) ? gates[token * k_max + choice] : 1.0f;
  }
  weighted_row_gather<T, kElems, kChoices>(sources, weights, width, tokens_out + token * width);
}

// ---- unpermute_combine_backward ----

template <typename T, int kElems, int kChoices>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(const T* grad_combined, const T* expert_outputs, const int* choice_rows,
                            const int* row_tokens, const float* gates, int64_t num_tokens, int k_max, int64_t width,
                            int64_t rows, int token_blocks, T* grad_expert_outputs, float* grad_gates) {
  if (int(blockIdx.x) >= token_blocks) {
    // Rows no choice refers to (row_tokens -1: padding, or rows of a layout the caller built) get
    // zero, as in the reference; the sweep blocks stride over all rows, a warp per row.
    using ZeroUnit = std::conditional_t<kElems == Pack<T>::kElems, uint4, T>;
    const int64_t row_units = width / kElems, sweep_warps = int64_t(gridDim.x - token_blocks) * kWarpsPerBlock;
    ZeroUnit* buffer = reinterpret_cast<ZeroUnit*>(grad_expert_outputs);
    for (int64_t row = int64_t(blockIdx.x - token_blocks) * kWarpsPerBlock + threadIdx.x / 32; row < rows;
         row += sweep_warps) {
      if (row_tokens[row] >= 0) continue;
      for (int64_t unit = threadIdx.x % 32; unit < row_units; unit += 32) buffer[row * row_units + unit] = ZeroUnit{};
    }
    return;
  }
  const int lane = threadIdx.x % 32;
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= num_tokens) return;
  int rows_of[kMaxChoices];
  token_rows(choice_rows, token, k_max, rows, rows_of);
  float gate[kChoices], dot[kChoices];
#pragma unroll
  for (int choice = 0; choice < kChoices; ++choice) {
    gate[choice] = rows_of[choice] >= 0 ? gates[token * k_max + choice] : 0.0f;
    dot[choice] = 0.0f;
  }

  const T* grad_row = grad_combined + token * width;
  // One pack per step: batching the loads here (as the gathers do) measured slower, 26.4 vs 25.1 us
  // at 8192 tokens (the register arrays cost occupancy).
  constexpr int kSteps = 1;
  for (int64_t base = int64_t(lane) * kElems; base < width; base += 32 * kElems * kSteps) {
    // All loads of the batch first (grad_combined and every choice's output row), then the math.
    float grad[kSteps][kElems], values[kChoices][kSteps][kElems];
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int64_t column = base + int64_t(step) * 32 * kElems;
      if (column >= width) break;
      load_elems<T, kElems>(grad_row + column, grad[step]);
#pragma unroll
      for (int choice = 0; choice < kChoices; ++choice)
        if (rows_of[choice] >= 0)
          load_elems<T, kElems>(expert_outputs + rows_of[choice] * width + column, values[choice][step]);
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int64_t column = base + int64_t(step) * 32 * kElems;
      if (column >= width) break;
#pragma unroll
      for (int choice = 0; choice < kChoices; ++choice) {
        if (rows_of[choice] < 0) continue;
        float scaled[kElems];
#pragma unroll
        for (int i = 0; i < kElems; ++i) {
          dot[choice] = fmaf(grad[step][i], values[choice][step][i], dot[choice]);
          scaled[i] = gate[choice] * grad[step][i];
        }
        store_elems<T, kElems>(grad_expert_outputs + rows_of[choice] * width + column, scaled);
      }
    }
  }
#pragma unroll
  for (int choice = 0; choice < kChoices; ++choice) {
    if (choice >= k_max) break;  // uniform over the warp
    const float total = warp_sum(dot[choice]);
    if (lane == 0) grad_gates[token * k_max + choice] = rows_of[choice] >= 0 ? total : 0.0f;
  }
}

// ---- host helpers ----

int tail_block_count(int64_t rows) {
  const int64_t wanted = (rows + 8 * kWarpsPerBlock - 1) / (8 * kWarpsPerBlock);  // ~8 rows per warp
  return int(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(multiprocessor_count()) * 2)));
}

PaddingArgs padding_args(const RoutingResult& routing, int num_experts, int64_t rows, int* row_tokens) {
  PaddingArgs padding{};
  padding.expert_offsets = routing.expert_offsets.as<int>();
  padding.expert_counts = routing.expert_counts.as<int>();
  padding.scalars = routing.scalars.as<int>();
  padding.num_experts = num_experts;
  padding.tail_blocks = tail_block_count(rows);
  padding.rows = rows;
  padding.row_tokens = row_tokens;
  return padding;
}

void check_layout_tensors(const char* op, const RoutingResult& routing, int num_experts) {
  std::string name = std::string(op) + ": ";
  check_tensor(routing.expert_offsets, (name + "expert_offsets").c_str(), DType::i32, {num_experts + 1});
  check_tensor(routing.expert_counts, (name + "expert_counts").c_str(), DType::i32, {num_experts});
  check_tensor(routing.scalars, (name + "scalars").c_str(), DType::i32, {kNumRoutingScalars});
}

// Packs need the row width in whole packs and 16-byte aligned bases.
template <typename T>
bool packs_fit(int64_t width, std::initializer_list<const void*> pointers) {
  if (width % Pack<T>::kElems != 0) return false;
  for (const void* pointer : pointers)
    if (!is_aligned(pointer, 16)) return false;
  return true;
}

int64_t token_block_count(int64_t tokens) { return (tokens + kWarpsPerBlock - 1) / kWarpsPerBlock; }

void check_grid(int64_t blocks, const char* op) {
  SY_CHECK(blocks < (int64_t(1) << 31), op, ": too many tokens for one launch");
}

}  // namespace

namespace cuda {

void permute(const Tensor& tokens, const RoutingResult& routing, const RoutingParams& params, Tensor& permuted,
             DispatchMap& map, void* stream) {
  validate_routing_params(params);
  const int64_t num_tokens = params.num_tokens, k_max = params.k_max;
  const int num_experts = params.num_experts;
  SY_CHECK(tokens.rank == 2 && is_activation_dtype(tokens.dtype),
                 "permute: tokens must be a bf16/fp16/fp32 [T, D] tensor, got ", tokens.describe());
  const int64_t width = tokens.dim(1);
  check_tensor(tokens, "permute: tokens", tokens.dtype, {num_tokens, width});
  SY_CHECK(permuted.rank == 2, "permute: permuted must be [R, D], got ", permuted.describe());
  const int64_t rows = permuted.dim(0);
  check_tensor(permuted, "permute: permuted", tokens.dtype, {rows, width});
  // The real row count is on the device; the buffer must hold the worst case.
  SY_CHECK(rows >= padded_rows_upper_bound(params), "permute: permuted has ", rows,
                 " rows, the layout may need ", padded_rows_upper_bound(params));
  check_tensor(routing.expert_ids, "permute: expert_ids", DType::i32, {num_tokens, k_max});
  check_tensor(routing.slots, "permute: slots", DType::i32, {num_tokens, k_max});
  check_layout_tensors("permute", routing, num_experts);
  check_tensor(map.choice_rows, "permute: map.choice_rows", DType::i32, {num_tokens, k_max});
  check_tensor(map.row_tokens, "permute: map.row_tokens", DType::i32, {rows});

  PermuteArgs args{};
  args.tokens = tokens.data;
  args.expert_ids = routing.expert_ids.as<int>();
  args.slots = routing.slots.as<int>();
  args.num_tokens = num_tokens;
  args.k_max = int(k_max);
  args.permuted = permuted.data;
  args.choice_rows = map.choice_rows.as<int>();
  args.padding = padding_args(routing, num_experts, rows, map.row_tokens.as<int>());
  const int64_t token_blocks = token_block_count(num_tokens);
  const int64_t blocks = token_blocks + num_experts + args.padding.tail_blocks;
  check_grid(blocks, "permute");
  args.token_blocks = int(token_blocks);

  const size_t row_bytes = size_t(width) * dtype_size(tokens.dtype);
  const bool aligned16 = is_aligned(tokens.data, 16) && is_aligned(permuted.data, 16);
  cudaStream_t cuda_stream = as_stream(stream);
  if (row_bytes % 16 == 0 && aligned16) {
    args.row_units = int64_t(row_bytes / 16);
    permute_kernel<uint4><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(args);
  } else if (row_bytes % 4 == 0 && is_aligned(tokens.data, 4) && is_aligned(permuted.data, 4)) {
    args.row_units = int64_t(row_bytes / 4);
    permute_kernel<unsigned><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(args);
  } else {
    args.row_units = int64_t(row_bytes / 2);
    permute_kernel<unsigned short><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(args);
  }
  CUDA_CHECK_LAUNCH();
}

void permute_backward(const Tensor& grad_permuted, const DispatchMap& map, int64_t num_tokens, Tensor& grad_tokens,
                      void* stream) {
  SY_CHECK(grad_permuted.rank == 2 && is_activation_dtype(grad_permuted.dtype),
                 "permute_backward: grad_permuted must be a bf16/fp16/fp32 [R, D] tensor, got ",
                 grad_permuted.describe());
  const int64_t rows = grad_permuted.dim(0), width = grad_permuted.dim(1);
  check_tensor(grad_permuted, "permute_backward: grad_permuted", grad_permuted.dtype, {rows, width});
  check_tensor(grad_tokens, "permute_backward: grad_tokens", grad_permuted.dtype, {num_tokens, width});
  SY_CHECK(map.choice_rows.rank == 2, "permute_backward: map.choice_rows must be [T, K], got ",
                 map.choice_rows.describe());
  const int64_t k_max = map.choice_rows.dim(1);
  SY_CHECK(k_max >= 1 && k_max <= kMaxChoices, "permute_backward: K must be in 1..8, got ", k_max);
  check_tensor(map.choice_rows, "permute_backward: map.choice_rows", DType::i32, {num_tokens, k_max});
  if (num_tokens == 0) return;
  const int64_t blocks = token_block_count(num_tokens);
  check_grid(blocks, "permute_backward");
  dispatch_activation_dtype(grad_permuted.dtype, "permute_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* source = grad_permuted.as<T>();
    T* out = grad_tokens.as<T>();
    dispatch_elems<T>(packs_fit<T>(width, {source, out}), [&](auto elems) {
      dispatch_choices(k_max, [&](auto choices) {
        gather_rows_kernel<T, decltype(elems)::value, decltype(choices)::value>
            <<<unsigned(blocks), kThreads, 0, as_stream(stream)>>>(source, map.choice_rows.as<int>(), nullptr,
                                                                   num_tokens, int(k_max), width, rows, out);
      });
      CUDA_CHECK_LAUNCH();
    });
  });
}

void unpermute_combine(const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                       Tensor& combined, void* stream) {
  SY_CHECK(expert_outputs.rank == 2 && is_activation_dtype(expert_outputs.dtype),
                 "unpermute_combine: expert_outputs must be a bf16/fp16/fp32 [R, D] tensor, got ",
                 expert_outputs.describe());
  const int64_t rows = expert_outputs.dim(0), width = expert_outputs.dim(1);
  check_tensor(expert_outputs, "unpermute_combine: expert_outputs", expert_outputs.dtype, {rows, width});
  SY_CHECK(combined.rank == 2, "unpermute_combine: combined must be [T, D], got ", combined.describe());
  const int64_t num_tokens = combined.dim(0);
  check_tensor(combined, "unpermute_combine: combined", expert_outputs.dtype, {num_tokens, width});
  SY_CHECK(map.choice_rows.rank == 2, "unpermute_combine: map.choice_rows must be [T, K], got ",
                 map.choice_rows.describe());
  const int64_t k_max = map.choice_rows.dim(1);
  SY_CHECK(k_max >= 1 && k_max <= kMaxChoices, "unpermute_combine: K must be in 1..8, got ", k_max);
  check_tensor(map.choice_rows, "unpermute_combine: map.choice_rows", DType::i32, {num_tokens, k_max});
  check_tensor(routing.gates, "unpermute_combine: gates", DType::f32, {num_tokens, k_max});
  if (num_tokens == 0) return;
  const int64_t blocks = token_block_count(num_tokens);
  check_grid(blocks, "unpermute_combine");
  dispatch_activation_dtype(expert_outputs.dtype, "unpermute_combine", [&](auto tag) {
    using T = decltype(tag);
    const T* source = expert_outputs.as<T>();
    T* out = combined.as<T>();
    dispatch_elems<T>(packs_fit<T>(width, {source, out}), [&](auto elems) {
      dispatch_choices(k_max, [&](auto choices) {
        gather_rows_kernel<T, decltype(elems)::value, decltype(choices)::value>
            <<<unsigned(blocks), kThreads, 0, as_stream(stream)>>>(source, map.choice_rows.as<int>(),
                                                                   routing.gates.as<float>(), num_tokens, int(k_max),
                                                                   width, rows, out);
      });
      CUDA_CHECK_LAUNCH();
    });
  });
}

void unpermute_combine_backward(const Tensor& grad_combined, const Tensor& expert_outputs,
                                const RoutingResult& routing, const DispatchMap& map, Tensor& grad_expert_outputs,
                                Tensor& grad_gates, void* stream) {
  const char* op = "unpermute_combine_backward";
  SY_CHECK(expert_outputs.rank == 2 && is_activation_dtype(expert_outputs.dtype), op,
                 ": expert_outputs must be a bf16/fp16/fp32 [R, D] tensor, got ", expert_outputs.describe());
  const DType dtype = expert_outputs.dtype;
  const int64_t rows = expert_outputs.dim(0), width = expert_outputs.dim(1);
  check_tensor(expert_outputs, "unpermute_combine_backward: expert_outputs", dtype, {rows, width});
  check_tensor(grad_expert_outputs, "unpermute_combine_backward: grad_expert_outputs", dtype, {rows, width});
  SY_CHECK(grad_combined.rank == 2, op, ": grad_combined must be [T, D], got ", grad_combined.describe());
  const int64_t num_tokens = grad_combined.dim(0);
  check_tensor(grad_combined, "unpermute_combine_backward: grad_combined", dtype, {num_tokens, width});
  SY_CHECK(map.choice_rows.rank == 2, op, ": map.choice_rows must be [T, K], got ", map.choice_rows.describe());
  const int64_t k_max = map.choice_rows.dim(1);
  SY_CHECK(k_max >= 1 && k_max <= kMaxChoices, op, ": K must be in 1..8, got ", k_max);
  check_tensor(map.choice_rows, "unpermute_combine_backward: map.choice_rows", DType::i32, {num_tokens, k_max});
  check_tensor(routing.gates, "unpermute_combine_backward: gates", DType::f32, {num_tokens, k_max});
  check_tensor(grad_gates, "unpermute_combine_backward: grad_gates", DType::f32, {num_tokens, k_max});
  check_tensor(map.row_tokens, "unpermute_combine_backward: map.row_tokens", DType::i32, {rows});

  const int64_t token_blocks = token_block_count(num_tokens);
  const int64_t sweep_blocks =
      std::max<int64_t>(1, std::min<int64_t>((rows + 16 * kWarpsPerBlock - 1) / (16 * kWarpsPerBlock),
                                             int64_t(multiprocessor_count()) * 4));
  const int64_t blocks = token_blocks + sweep_blocks;
  check_grid(blocks, op);
  dispatch_activation_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = grad_combined.as<T>();
    const T* outputs = expert_outputs.as<T>();
    T* grad_outputs = grad_expert_outputs.as<T>();
    dispatch_elems<T>(packs_fit<T>(width, {grad, outputs, grad_outputs}), [&](auto elems) {
      dispatch_choices(k_max, [&](auto choices) {
        combine_backward_kernel<T, decltype(elems)::value, decltype(choices)::value>
            <<<unsigned(blocks), kThreads, 0, as_stream(stream)>>>(
                grad, outputs, map.choice_rows.as<int>(), map.row_tokens.as<int>(), routing.gates.as<float>(),
                num_tokens, int(k_max), width, rows, int(token_blocks), grad_outputs, grad_gates.as<float>());
      });
      CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace cuda
}  // namespace switchyard
