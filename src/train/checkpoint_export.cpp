// Checkpoint verification and safetensors export (src/train/checkpoint_export.h).
#include "src/train/checkpoint_export.h"

#include <filesystem>
#include <map>
#include <vector>

#include "src/core/error.h"
#include "src/core/json.h"
#include "src/model/transformer.h"
#include "src/train/config.h"

namespace switchyard {
namespace fs = std::filesystem;
namespace {

// One tensor of the output: the pieces it is made of (several when experts merge), each a checkpoint
// tensor read through the CheckpointReader or values already in memory (a weights file).
struct ExportPart {
  const CheckpointTensor* checkpoint = nullptr;
  const float* values = nullptr;
  uint64_t count = 0;  // values
};

struct ExportTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<ExportPart> parts;
  uint64_t bytes = 0;  // in the output dtype
};

bool little_endian() {
  const uint16_t probe = 1;
  uint8_t first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

std::vector<ExportTensor> select_tensors(const CheckpointManifest& manifest, const SafetensorsExportOptions& options) {
  const size_t element = dtype_size(options.dtype);
  std::vector<ExportTensor> selected;
  std::map<std::string, size_t> merged;  // output name -> index in `selected`
  for (const CheckpointTensor& tensor : manifest.tensors) {
    if (tensor.state != TensorState::master && !options.include_optimizer) continue;
    int64_t count = 1;
    for (int64_t dim : tensor.shape) count *= dim;
    if (options.merge_experts && tensor.expert >= 0) {
      const std::string name = checkpoint_tensor_name(tensor.state, tensor.parameter, -1);
      auto found = merged.find(name);
      if (found == merged.end()) {
        found = merged.emplace(name, selected.size()).first;
        ExportTensor output;
        output.name = name;
        output.shape = tensor.shape;
        output.shape.insert(output.shape.begin(), 0);
        selected.push_back(output);
      }
      ExportTensor& output = selected[found->second];
      output.parts.push_back({&tensor, nullptr, uint64_t(count)});
      output.shape[0] += 1;
      output.bytes += uint64_t(count) * element;
      continue;
    }
    ExportTensor output;
    output.name = tensor.name;
    output.shape = tensor.shape;
    output.parts.push_back({&tensor, nullptr, uint64_t(count)});
    output.bytes = uint64_t(count) * element;
    selected.push_back(output);
  }
  // Merged experts must be complete and in expert order (the manifest lists them so; a
  // hand-edited manifest could not).
  if (!options.merge_experts) return selected;
  for (const ExportTensor& output : selected) {
    if (output.parts.front().checkpoint->expert < 0) continue;
    for (size_t index = 0; index < output.parts.size(); ++index)
      if (output.parts[index].checkpoint->expert != int64_t(index))
        SY_BAD_INPUT("checkpoint tensor ", output.parts[index].checkpoint->name, ": experts of ", output.name,
                     " are not 0 .. E-1 in order");
  }
  return selected;
}

}  // namespace

uint64_t verify_checkpoint_tensors(const std::string& directory, const CheckpointManifest& manifest) {
  CheckpointReader reader(directory, manifest);
  std::vector<char> buffer;
  uint64_t total = 0;
  for (const CheckpointTensor& tensor : manifest.tensors) {
    buffer.resize(size_t(tensor.bytes));
    reader.read(tensor, buffer.data());
    total += tensor.bytes;
  }
  return total;
}

namespace {

// The weights-file tensors to export: as stored (experts stacked, [E, ...]) with merge_experts,
// else each expert parameter split into one tensor per expert, named as a checkpoint names them.
std::vector<ExportTensor> select_weights_tensors(const WeightsFile& weights, const ParameterLayout& layout,
                                                 const SafetensorsExportOptions& options) {
  const size_t element = dtype_size(options.dtype);
  std::vector<ExportTensor> selected;
  for (const WeightsTensor& tensor : weights.tensors) {
    bool expert_parameter = false;
    for (const ParameterSpec& spec : layout.specs())
      if (spec.name == tensor.name) expert_parameter = spec.is_sharded();
    const bool split = expert_parameter && !options.merge_experts;
    const int64_t pieces = split ? tensor.shape.at(0) : 1;
    const uint64_t per_part = pieces > 0 ? uint64_t(tensor.values.size()) / uint64_t(pieces) : 0;
    for (int64_t expert = 0; expert < pieces; ++expert) {
      ExportTensor output;
      output.name = split ? expert_tensor_name(tensor.name, expert) : tensor.name;
      output.shape = tensor.shape;
      if (split) output.shape.erase(output.shape.begin());
      output.parts.push_back({nullptr, tensor.values.data() + uint64_t(expert) * per_part, per_part});
      output.bytes = per_part * element;
      selected.push_back(std::move(output));
    }
  }
  return selected;
}

// Writes the header and `selected` to `output`; `reader` reads the checkpoint parts (null: none).
SafetensorsExportResult write_safetensors(const std::string& output, json::Value metadata,
                                          const std::vector<ExportTensor>& selected, CheckpointReader* reader,
                                          const SafetensorsExportOptions& options) {
  SY_CHECK(little_endian(), "safetensors is little-endian; this host is not");
  json::Value header = json::Value::object();
  header.set("__metadata__", std::move(metadata));
  const char* dtype_text = options.dtype == DType::f32 ? "F32" : "BF16";
  uint64_t offset = 0;
  for (const ExportTensor& tensor : selected) {
    json::Value entry = json::Value::object();
    entry.set("dtype", json::Value::string(dtype_text));
    json::Value shape = json::Value::array();
    for (int64_t dim : tensor.shape) shape.push(json::Value::integer(dim));
    entry.set("shape", std::move(shape));
    json::Value offsets = json::Value::array();
    offsets.push(json::Value::unsigned_integer(offset));
    offsets.push(json::Value::unsigned_integer(offset + tensor.bytes));
    entry.set("data_offsets", std::move(offsets));
    header.set(tensor.name, std::move(entry));
    offset += tensor.bytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_bytes = header_text.size();

  write_file_atomically(output, true, [&](int descriptor, const std::string& temp) {
    write_all(descriptor, &header_bytes, sizeof(header_bytes), temp);
    write_all(descriptor, header_text.data(), header_text.size(), temp);
    std::vector<float> buffer;
    std::vector<uint16_t> halves;
    for (const ExportTensor& tensor : selected) {
      for (const ExportPart& part : tensor.parts) {
        const float* values = part.values;
        if (part.checkpoint != nullptr) {
          SY_CHECK(reader != nullptr, "safetensors export: a checkpoint tensor without a reader");
          buffer.resize(size_t(part.count));
          reader->read(*part.checkpoint, buffer.data());
          values = buffer.data();
        }
        if (options.dtype == DType::f32) {
          write_all(descriptor, values, size_t(part.count) * sizeof(float), temp);
        } else {
          halves.resize(size_t(part.count));
          for (size_t index = 0; index < halves.size(); ++index) halves[index] = Bf16::from_float(values[index]);
          write_all(descriptor, halves.data(), halves.size() * sizeof(uint16_t), temp);
        }
      }
    }
  });
  SafetensorsExportResult result;
  result.tensors = int64_t(selected.size());
  result.bytes = sizeof(header_bytes) + header_bytes + offset;
  return result;
}

void check_export_dtype(const SafetensorsExportOptions& options) {
  SY_CHECK_INPUT(options.dtype == DType::f32 || options.dtype == DType::bf16,
                 "safetensors export writes fp32 or bf16, not ", dtype_name(options.dtype));
}

}  // namespace

SafetensorsExportResult export_safetensors(const std::string& directory, const std::string& output,
                                           const SafetensorsExportOptions& options) {
  check_export_dtype(options);
  const CheckpointManifest manifest = read_checkpoint_manifest(directory);
  for (const CheckpointTensor& tensor : manifest.tensors)
    SY_CHECK_INPUT(tensor.dtype == "F32", "checkpoint tensor ", tensor.name, " is ", tensor.dtype,
                   "; the export reads F32 tensors");
  const std::vector<ExportTensor> selected = select_tensors(manifest, options);
  json::Value metadata = json::Value::object();
  metadata.set("format", json::Value::string("pt"));
  metadata.set("switchyard_step", json::Value::string(std::to_string(manifest.step)));
  metadata.set("switchyard_tokens_seen", json::Value::string(std::to_string(manifest.tokens_seen)));
  metadata.set("switchyard_source", json::Value::string(fs::absolute(directory).lexically_normal().string()));
  metadata.set("switchyard_config", json::Value::string(manifest.config_yaml));
  CheckpointReader reader(directory, manifest);
  return write_safetensors(output, std::move(metadata), selected, &reader, options);
}

SafetensorsExportResult export_safetensors(const WeightsSource& source, const std::string& output,
                                           const SafetensorsExportOptions& options) {
  if (source.format == WeightsFormat::checkpoint) return export_safetensors(source.path, output, options);
  check_export_dtype(options);
  SY_CHECK_INPUT(!options.include_optimizer, "'", source.path, "' is a weights file: it holds no optimizer state, so "
                 "--optimizer has nothing to export; give a checkpoint (a step-* folder) instead");
  const WeightsFile weights = read_weights_file(source.path);
  const Config config = parse_stored_config(weights.config_yaml, source.path);
  const ParameterLayout layout = Transformer::build_layout(config.model, config.moe, 1, 0);
  json::Value metadata = json::Value::object();
  metadata.set("format", json::Value::string("pt"));
  metadata.set("switchyard_source", json::Value::string(fs::absolute(source.path).lexically_normal().string()));
  metadata.set("switchyard_config", json::Value::string(weights.config_yaml));
  return write_safetensors(output, std::move(metadata), select_weights_tensors(weights, layout, options), nullptr,
                           options);
}

}  // namespace switchyard
