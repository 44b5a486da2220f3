// `switchyard bench moe --shape`: the MoE layer at any T,d,n,E,K (SwiGLU experts by default), or
// the five shapes of SonicMoE's H100 chart (--shape sonic), forward and backward TFLOP/s counted as
// SonicMoE counts them (fwd = 6 T K d n, bwd = 12 T K d n with SwiGLU; gelu: 4 and 8), the
// activation memory the layer keeps from forward for backward, and the ratio to a dense FFN of the
// same active size (T K rows through one W1 / W2 pair, same activation, the same gemm op).
//
// Kept for backward (the layer's own buffers, R = padded expert rows of this forward):
//   X_p [R, d], H [R, n or 2n], A [R, n], O [R, d] in the activation dtype; logits [T, E] fp32;
//   expert ids, gates, slots, row of each choice [T, K] (4 bytes each); token_k, logsumexp [T];
//   row tokens [R]. x itself belongs to the caller and is not counted.
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "src/cli/bench_moe_modes.h"
#include "src/core/error.h"

namespace switchyard::bench_moe {

std::vector<LayerShape> parse_shape_spec(const std::string& spec) {
  if (spec == "sonic")
    return {{"sonic1", 40960, 768, 256, 128, 8, ExpertActivation::swiglu},
            {"sonic2", 40960, 768, 1024, 32, 2, ExpertActivation::swiglu},
            {"sonic3", 24576, 1536, 1024, 32, 2, ExpertActivation::swiglu},
            {"sonic4", 32768, 4096, 1024, 64, 4, ExpertActivation::swiglu},
            {"sonic5", 32768, 4096, 2048, 64, 4, ExpertActivation::swiglu}};
  std::vector<std::string> fields;
  std::stringstream stream(spec);
  for (std::string field; std::getline(stream, field, ',');) fields.push_back(field);
  SY_CHECK_INPUT(fields.size() == 5 || fields.size() == 6, "--shape '", spec,
                 "': expected T,d,n,E,K[,act] (act: swiglu or gelu) or 'sonic'");
  long long values[5];
  const char* names[5] = {"T (tokens)", "d (model width)", "n (expert width)", "E (experts)", "K (top-k)"};
  for (int index = 0; index < 5; ++index) {
    char* rest = nullptr;
    values[index] = std::strtoll(fields[size_t(index)].c_str(), &rest, 10);
    SY_CHECK_INPUT(!fields[size_t(index)].empty() && rest && *rest == '\0' && values[index] >= 1, "--shape '", spec,
                   "': ", names[index], " must be a positive integer, got '", fields[size_t(index)], "'");
  }
  SY_CHECK_INPUT(values[4] <= values[3], "--shape '", spec, "': K (", values[4], ") exceeds E (", values[3], ")");
  SY_CHECK_INPUT(values[4] <= kMaxTopK, "--shape '", spec, "': K (", values[4], ") exceeds the router's limit ", kMaxTopK);
  ExpertActivation activation = ExpertActivation::swiglu;
  if (fields.size() == 6) {
    if (fields[5] == "gelu") activation = ExpertActivation::gelu_tanh;
    else SY_CHECK_INPUT(fields[5] == "swiglu", "--shape '", spec, "': act must be swiglu or gelu, got '", fields[5], "'");
  }
  return {{"shape", values[0], int(values[1]), int(values[2]), int(values[3]), int(values[4]), activation}};
}

namespace {

double saved_for_backward_bytes(const LayerShape& shape, int64_t rows, DType activation_dtype) {
  const double element = double(dtype_size(activation_dtype));
  const double up = shape.activation == ExpertActivation::swiglu ? 2.0 * shape.d_ff : double(shape.d_ff);
  const double expert_rows = double(rows) * (2.0 * shape.d_model + up + shape.d_ff) * element + 4.0 * double(rows);
  const double per_token = 4.0 * shape.experts + 16.0 * shape.top_k + 8.0;
  return expert_rows + per_token * double(shape.tokens);
}

}  // namespace

void run_shapes(const BenchSettings& settings, const std::vector<LayerShape>& shapes, std::vector<Record>& records) {
  const ExecContext& context = settings.context;
  std::printf("\nMoE layer at given shapes (%s, %s, %s), median of %d; TFLOP/s counted as fwd = %s, bwd = 2 x fwd;\n"
              "saved = activation memory kept from forward for backward (the layer's buffers, x not counted)\n",
              context.device == DeviceKind::cuda ? "cuda" : "cpu", dtype_name(settings.activation_dtype),
              settings.dropless ? "dropless" : "capacity", settings.iterations,
              "6 T K d n (swiglu) / 4 T K d n (gelu)");
  std::printf("%-26s %6s | %8s %8s | %8s %8s | %9s %6s | %9s\n", "T,d,n,E,K,act", "rows", "fwd ms", "bwd ms",
              "fwd TF/s", "bwd TF/s", "dense f+b", "ratio", "saved MiB");
  for (const LayerShape& shape : shapes) {
    MoeBench moe(settings, shape, ExpertComputeMode::sparse);
    const double forward_ms = time_median_ms(settings, [&] { moe.forward(context, true); });
    const double both_ms = time_median_ms(settings, [&] { moe.forward_backward(context); });
    const int64_t rows = moe.layer->rows();
    const double saved = saved_for_backward_bytes(shape, rows, settings.activation_dtype);
    double dense_both_ms = 0.0;
    {
      DenseFfnBench dense(settings, shape);  // freed before the next shape allocates
      dense_both_ms = time_median_ms(settings, [&] { dense.forward_backward(context); });
    }
    const double backward_ms = both_ms - forward_ms;
    const double flops = expert_forward_flops(shape);
    const double forward_tflops = flops / (forward_ms * 1e-3) / 1e12;
    const double backward_tflops = 2.0 * flops / (backward_ms * 1e-3) / 1e12;
    const char* act = shape.activation == ExpertActivation::swiglu ? "swiglu" : "gelu";
    char label[96];
    std::snprintf(label, sizeof(label), "%lld,%d,%d,%d,%d,%s", (long long)shape.tokens, shape.d_model, shape.d_ff,
                  shape.experts, shape.top_k, act);
    std::printf("%-26s %6lld | %8.3f %8.3f | %8.1f %8.1f | %9.3f %6.2f | %9.1f\n", label, (long long)rows, forward_ms,
                backward_ms, forward_tflops, backward_tflops, dense_both_ms, both_ms / dense_both_ms,
                saved / (1024.0 * 1024.0));
    std::fflush(stdout);  // each row as it is measured: a run cut short by a time limit keeps its rows
    Record record;
    record.add("part", "shape");
    record.add("shape", label);
    record.add("tokens", double(shape.tokens));
    record.add("d_model", shape.d_model);
    record.add("expert_width", shape.d_ff);
    record.add("experts", shape.experts);
    record.add("top_k", shape.top_k);
    record.add("activation", act);
    record.add("rows", double(rows));
    record.add("fwd_ms", forward_ms);
    record.add("bwd_ms", backward_ms);
    record.add("fwdbwd_ms", both_ms);
    record.add("fwd_tflops", forward_tflops);
    record.add("bwd_tflops", backward_tflops);
    record.add("dense_fwdbwd_ms", dense_both_ms);
    record.add("ratio_to_dense", both_ms / dense_both_ms);
    record.add("saved_for_backward_mib", saved / (1024.0 * 1024.0));
    records.push_back(record);
  }
}

}  // namespace switchyard::bench_moe
