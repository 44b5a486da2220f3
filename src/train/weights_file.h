// The final weights file, <logging.run_dir>/final.weights: the trained model's weights alone,
// in one self-contained file (what `switchyard generate` loads from a finished run). It is not a
// checkpoint: it holds no optimizer state, data position or RNG state, so runs resume from
// checkpoints (src/train/checkpoint.h), which generate also reads.
//
// Layout (little-endian):
//   char[8]  magic "SWYWGHTS"      uint32 version (1)      uint32 tensor_count
//   uint64   config_bytes, then the resolved config YAML (config_to_yaml) that built the model
//   per tensor: uint32 name_bytes, name; uint32 rank; int64 dims[rank]; uint32 dtype (1 = fp32);
//               uint64 FNV-1a 64 checksum of the data bytes; the fp32 values, row-major
// Tensors carry the global parameter names of src/model/transformer.h; expert tensors hold every
// expert ([E, ...], gathered from all expert-parallel ranks), so any ep_size can load them.
// Written to a temporary file, fsynced and renamed, so a crash never leaves a half file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/comm/communicator.h"
#include "src/model/parameters.h"

namespace switchyard {

struct WeightsTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

struct WeightsFile {
  std::string config_yaml;
  std::vector<WeightsTensor> tensors;
  const WeightsTensor* find(const std::string& name) const;  // nullptr when absent
};

class WeightsFileWriter {
 public:
  WeightsFileWriter(std::string path, const std::string& config_yaml, uint32_t tensor_count);
  ~WeightsFileWriter();  // without commit(): removes the temporary file
  WeightsFileWriter(const WeightsFileWriter&) = delete;
  WeightsFileWriter& operator=(const WeightsFileWriter&) = delete;
  void add(const std::string& name, const std::vector<int64_t>& shape, const float* values);
  void commit();  // checks that tensor_count tensors were added; fsync + rename

 private:
  void write_bytes(const void* data, size_t bytes);
  std::string path_, temp_path_;
  int descriptor_ = -1;
  uint32_t expected_ = 0, written_ = 0;
  bool committed_ = false;
};

// True when `path` is a regular file that starts with the weights file magic (nothing else checked).
bool has_weights_file_magic(const std::string& path);

// Reads and verifies a weights file (magic, version, sizes, checksums); SY_BAD_INPUT naming the
// file on any problem.
WeightsFile read_weights_file(const std::string& path);

// Writes the whole model from world rank 0 (`is_writer`); every rank must call it, because the
// expert tensors are gathered over groups->expert_parallel (when ep_size > 1). Waits for
// context.stream first.
void save_final_weights(const ExecContext& context, const std::string& path, const std::string& config_yaml,
                        const ModelParameters& parameters, const ParallelGroups* groups, bool is_writer);

// Loads every parameter of `parameters` (its shard, for sharded tensors) from `file` and
// refreshes the compute copies. SY_BAD_INPUT when a tensor is missing or has another shape.
void load_weights(const ExecContext& context, const WeightsFile& file, ModelParameters& parameters);

}  // namespace switchyard
