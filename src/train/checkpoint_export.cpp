// Checkpoint verification and safetensors export (src/train/checkpoint_export.h).
#include "src/train/checkpoint_export.h"

#include <filesystem>
#include <map>
#include <vector>

#include "src/core/error.h"
#include "src/core/json.h"

namespace switchyard {
namespace fs = std::filesystem;
namespace {

// One tensor of the output: the checkpoint tensors it is made of (several when experts merge).
struct ExportTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<const CheckpointTensor*> parts;
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
      output.parts.push_back(&tensor);
      output.shape[0] += 1;
      output.bytes += uint64_t(count) * element;
      continue;
    }
    ExportTensor output;
    output.name = tensor.name;
    output.shape = tensor.shape;
    output.parts.push_back(&tensor);
    output.bytes = uint64_t(count) * element;
    selected.push_back(output);
  }
  // Merged experts must be complete and in expert order (the manifest lists them so; a
  // hand-edited manifest could not).
  if (!options.merge_experts) return selected;
  for (const ExportTensor& output : selected) {
    if (output.parts.front()->expert < 0) continue;
    for (size_t index = 0; index < output.parts.size(); ++index)
      if (output.parts[index]->expert != int64_t(index))
        SY_BAD_INPUT("checkpoint tensor ", output.parts[index]->name, ": experts of ", output.name,
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

SafetensorsExportResult export_safetensors(const std::string& directory, const std::string& output,
                                           const SafetensorsExportOptions& options) {
  SY_CHECK(little_endian(), "safetensors is little-endian; this host is not");
  SY_CHECK_INPUT(options.dtype == DType::f32 || options.dtype == DType::bf16,
                 "safetensors export writes fp32 or bf16, not ", dtype_name(options.dtype));
  const CheckpointManifest manifest = read_checkpoint_manifest(directory);
  for (const CheckpointTensor& tensor : manifest.tensors)
    SY_CHECK_INPUT(tensor.dtype == "F32", "checkpoint tensor ", tensor.name, " is ", tensor.dtype,
                   "; the export reads F32 tensors");
  const std::vector<ExportTensor> selected = select_tensors(manifest, options);

  json::Value header = json::Value::object();
  json::Value metadata = json::Value::object();
  metadata.set("format", json::Value::string("pt"));
  metadata.set("switchyard_step", json::Value::string(std::to_string(manifest.step)));
  metadata.set("switchyard_tokens_seen", json::Value::string(std::to_string(manifest.tokens_seen)));
  metadata.set("switchyard_source", json::Value::string(fs::absolute(directory).lexically_normal().string()));
  metadata.set("switchyard_config", json::Value::string(manifest.config_yaml));
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
    CheckpointReader reader(directory, manifest);
    std::vector<float> values;
    std::vector<uint16_t> halves;
    for (const ExportTensor& tensor : selected) {
      for (const CheckpointTensor* part : tensor.parts) {
        values.resize(size_t(part->bytes / sizeof(float)));
        reader.read(*part, values.data());
        if (options.dtype == DType::f32) {
          write_all(descriptor, values.data(), size_t(part->bytes), temp);
        } else {
          halves.resize(values.size());
          for (size_t index = 0; index < values.size(); ++index) halves[index] = Bf16::from_float(values[index]);
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

}  // namespace switchyard
