// The two detailed modes of `switchyard bench moe` (src/cli/bench_moe_command.cpp):
// --breakdown times every stage of the layer's forward and backward separately (the layer reports
// its stage boundaries through MoeStageObserver, so the timed sequence is the layer's own) and
// compares the sum of the stage medians with the uninstrumented whole and a dense FFN of the same
// active size. --stream times streaming mode (src/model/moe_stream.h): a small-batch inference
// forward replayed from a CUDA graph, per step (median and p99 of device time per replay and of
// host latency per request, host buffers in and out) and in steps/s, against the same forward run
// eagerly. Both print a table and append one Record per row to `records`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/cli/bench_moe_fixtures.h"

namespace switchyard::bench_moe {

// Stage timings of `shape` (training forward, then backward), with the whole layer's and the
// dense FFN's times for comparison, and the TFLOP/s of each expert GEMM stage over its padded rows.
void run_breakdown(const BenchSettings& settings, const LayerShape& shape, std::vector<Record>& records);

// Streaming latency for each of `token_counts` (each <= shape.tokens, the largest), `steps` timed
// steps each; the graph's output must match the eager forward's (the max |difference| is reported).
void run_stream(const BenchSettings& settings, const LayerShape& shape, const std::vector<int64_t>& token_counts,
                int steps, std::vector<Record>& records);

// --shape (src/cli/bench_moe_shapes.cpp): "sonic" (the five shapes of SonicMoE's H100 chart) or
// one "T,d,n,E,K[,act]" (act swiglu, the default, or gelu); SY_BAD_INPUT naming the bad field.
std::vector<LayerShape> parse_shape_spec(const std::string& spec);
// Forward and backward of the layer at each shape: TFLOP/s, memory kept for backward, and the
// ratio to a dense FFN of the same active size.
void run_shapes(const BenchSettings& settings, const std::vector<LayerShape>& shapes, std::vector<Record>& records);

}  // namespace switchyard::bench_moe
