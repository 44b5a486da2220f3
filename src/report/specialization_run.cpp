// Running a model over a text for the specialization map (src/report/specialization_run.h).
#include "src/report/specialization_run.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "src/core/error.h"
#include "src/core/timing.h"
#include "src/model/transformer.h"
#include "src/train/config.h"
#include "src/train/token_file.h"

namespace switchyard {

std::vector<int32_t> load_analysis_tokens(const std::string& path, int vocab_size, int64_t max_tokens) {
  SY_CHECK_INPUT(max_tokens >= 1, "the analysis needs at least one token, got a limit of ", max_tokens);
  std::ifstream file(path, std::ios::binary);
  if (!file) SY_BAD_INPUT("cannot read the text '", path, "': ", std::strerror(errno));
  char magic[sizeof(kTokenFileMagic)] = {};
  file.read(magic, sizeof(magic));
  const bool is_token_file =
      file.gcount() == std::streamsize(sizeof(magic)) && std::memcmp(magic, kTokenFileMagic, sizeof(magic)) == 0;
  std::vector<int32_t> tokens;
  if (is_token_file) {
    file.close();
    TokenFile token_file(path, uint32_t(vocab_size));
    tokens = token_file.span(0, std::min(max_tokens, token_file.size()));
  } else {
    SY_CHECK_INPUT(vocab_size >= 256, "'", path, "' is not a token file, and the model's vocabulary (", vocab_size,
                   ") cannot hold bytes: give a token file written by switchyard prepare-data");
    file.clear();
    file.seekg(0);
    std::vector<char> bytes;
    bytes.reserve(size_t(std::min<int64_t>(max_tokens, int64_t(1) << 24)));
    char buffer[1 << 16];
    while (int64_t(bytes.size()) < max_tokens && file.read(buffer, sizeof(buffer)).gcount() > 0)
      bytes.insert(bytes.end(), buffer, buffer + file.gcount());
    if (int64_t(bytes.size()) > max_tokens) bytes.resize(size_t(max_tokens));
    for (char byte : bytes) tokens.push_back(int32_t(static_cast<unsigned char>(byte)));
  }
  SY_CHECK_INPUT(!tokens.empty(), "the text '", path, "' is empty");
  return tokens;
}

// ---- RoutingCapture --------------------------------------------------------------------------

RoutingCapture::RoutingCapture(int moe_layers) : layers_(size_t(std::max(0, moe_layers))) {}

void RoutingCapture::on_routing(const ExecContext& context, const RoutingEvent& event) {
  SY_CHECK(event.moe_layer >= 0 && event.moe_layer < int(layers_.size()), "RoutingCapture: MoE layer ", event.moe_layer,
           " of ", layers_.size());
  const RoutingResult& routing = *event.routing;
  Layer& layer = layers_[size_t(event.moe_layer)];
  const int64_t tokens = routing.expert_ids.dim(0);
  layer.k = int(routing.expert_ids.dim(1));
  layer.expert_ids.resize(size_t(tokens * layer.k));
  layer.token_k.resize(size_t(tokens));
  Tensor host_ids(layer.expert_ids.data(), DType::i32, DeviceKind::cpu, {tokens, int64_t(layer.k)});
  Tensor host_k(layer.token_k.data(), DType::i32, DeviceKind::cpu, {tokens});
  ops::copy(context, routing.expert_ids, host_ids);
  ops::copy(context, routing.token_k, host_k);
  layer.captured = true;
  ++events_;
}

void RoutingCapture::clear() {
  for (Layer& layer : layers_) layer.captured = false;
}

bool RoutingCapture::captured(int moe_layer) const { return layers_.at(size_t(moe_layer)).captured; }
const std::vector<int32_t>& RoutingCapture::expert_ids(int moe_layer) const {
  return layers_.at(size_t(moe_layer)).expert_ids;
}
const std::vector<int32_t>& RoutingCapture::token_k(int moe_layer) const {
  return layers_.at(size_t(moe_layer)).token_k;
}
int RoutingCapture::k(int moe_layer) const { return layers_.at(size_t(moe_layer)).k; }

// ---- The run ---------------------------------------------------------------------------------

SpecializationMap run_specialization(const WeightsFile& weights, const std::string& source,
                                     const std::vector<int32_t>& tokens, const SpecializationOptions& options) {
  SY_CHECK_INPUT(options.batch >= 1, "the analysis batch must be >= 1, got ", options.batch);
  SY_CHECK_INPUT(options.position_buckets >= 1, "position buckets must be >= 1, got ", options.position_buckets);
  SY_CHECK_INPUT(!tokens.empty(), "the analysis text is empty");
  const Config config = parse_stored_config(weights.config_yaml, source);
  const ModelConfig& model_config = config.model;
  for (int32_t token : tokens)
    SY_CHECK_INPUT(token >= 0 && token < model_config.vocab_size, "token ", token, " of the text is outside the ",
                   "model's vocabulary [0, ", model_config.vocab_size, ")");
  const DeviceKind device = options.device;
  const DType dtype = device == DeviceKind::cpu                  ? DType::f32
                      : model_config.compute_dtype == DType::f16 ? DType::f16
                                                                 : DType::bf16;
  const int64_t window = model_config.seq_len;
  const int64_t windows = int64_t(tokens.size()) / window;
  TransformerOptions model_options;
  model_options.device = device;
  model_options.activation_dtype = dtype;
  model_options.max_batch = std::max<int64_t>(1, std::min(options.batch, windows));
  model_options.max_seq_len = window;
  model_options.dropless = true;  // the router's preference, not what a capacity limit let through
  Transformer model(model_config, config.moe, model_options);
  ModelParameters parameters(model.layout(), device, DType::f32, dtype);
  void* stream = create_stream(device);
  const ExecContext context{device, stream};
  struct StreamGuard {
    DeviceKind device;
    void* stream;
    ~StreamGuard() { destroy_stream(device, stream); }
  } guard{device, stream};
  load_weights(context, weights, parameters);

  std::vector<int> blocks;
  for (int block = 0; block < model_config.n_layers; ++block)
    if (model_config.block_is_moe(block)) blocks.push_back(block);
  const int moe_layers = int(blocks.size());
  SY_CHECK_INPUT(moe_layers > 0, "the model in '", source, "' has no MoE layer to analyse");
  SpecializationMap map(blocks, config.moe.num_experts, window, options.position_buckets);
  RoutingCapture capture(moe_layers);
  RoutingObserverScope scope(&capture);
  Buffer device_tokens(device, size_t(model_options.max_batch * window) * sizeof(int32_t));

  // Runs `count` tokens starting at `first` as `batch` windows of `length`.
  auto run = [&](int64_t first, int64_t batch, int64_t length) {
    const int64_t count = batch * length;
    std::vector<int32_t> chunk(tokens.begin() + first, tokens.begin() + first + count);
    Tensor host(chunk.data(), DType::i32, DeviceKind::cpu, {count});
    Tensor input = device_tokens.view(DType::i32, {count});
    ops::copy(context, host, input);
    capture.clear();
    model.forward_logits(context, parameters, input, batch, length);
    ops::synchronize(context);
    for (int layer = 0; layer < moe_layers; ++layer)
      SY_CHECK(capture.captured(layer), "the model reported no routing for MoE layer ", layer,
               ": its MoE blocks must call notify_routing (src/model/routing_observer.h)");
    for (int64_t sequence = 0; sequence < batch; ++sequence) {
      const int32_t* window_tokens = chunk.data() + sequence * length;
      map.add_text(window_tokens, length);
      for (int layer = 0; layer < moe_layers; ++layer) {
        const int k = capture.k(layer);
        map.add_routing(layer, window_tokens, length, capture.expert_ids(layer).data() + sequence * length * k, k,
                        capture.token_k(layer).data() + sequence * length);
      }
    }
  };
  int64_t first = 0;
  for (int64_t done = 0; done < windows;) {
    const int64_t batch = std::min(model_options.max_batch, windows - done);
    run(first, batch, window);
    first += batch * window;
    done += batch;
  }
  const int64_t tail = int64_t(tokens.size()) - first;
  if (tail > 0) run(first, 1, tail);
  return map;
}

}  // namespace switchyard
