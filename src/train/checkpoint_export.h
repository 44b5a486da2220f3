// Reading whole checkpoints outside training: full verification (`switchyard ckpt inspect`) and
// export of the weights (of a checkpoint or a weights file) to a safetensors file
// (`switchyard ckpt export --format safetensors`).
//
// safetensors layout (https://github.com/huggingface/safetensors, "Format"):
//   uint64 little-endian N | N bytes of JSON header | the tensor bytes
// The header is one JSON object: "__metadata__" (string values only) and, per tensor,
//   "name": {"dtype": "F32" | "BF16", "shape": [...], "data_offsets": [begin, end]}
// with offsets relative to the start of the data; tensors are laid out back to back in header
// order, with no gaps, so the data ends exactly at the end of the file. The header is padded with
// spaces to a multiple of 8 bytes, so the data starts 8-byte aligned.
#pragma once

#include <cstdint>
#include <string>

#include "src/core/dtype.h"
#include "src/train/checkpoint_format.h"
#include "src/train/weights_source.h"

namespace switchyard {

// Reads every tensor of `directory` and verifies its checksum; returns the bytes verified.
// SY_BAD_INPUT naming the file and tensor at the first problem.
uint64_t verify_checkpoint_tensors(const std::string& directory, const CheckpointManifest& manifest);

struct SafetensorsExportOptions {
  DType dtype = DType::f32;        // f32 or bf16 (round to nearest even)
  bool include_optimizer = false;  // also the AdamW moments (names "optimizer.exp_avg.*", ...)
  bool merge_experts = false;      // one [E, ...] tensor per expert parameter, named as the model's
                                   // parameter (blocks.1.moe.w1), instead of one tensor per expert
};

struct SafetensorsExportResult {
  int64_t tensors = 0;
  uint64_t bytes = 0;  // file size
};

// Writes `output` (through a temporary file, fsynced and renamed) from the checkpoint in
// `directory`, verifying every tensor it reads. Metadata: format = "pt", switchyard_step,
// switchyard_tokens_seen, switchyard_source and switchyard_config (the run's resolved YAML).
SafetensorsExportResult export_safetensors(const std::string& directory, const std::string& output,
                                           const SafetensorsExportOptions& options);

// The same for any weights source (src/train/weights_source.h): a checkpoint as above; a weights
// file (final.weights) holds no optimizer state (include_optimizer is bad input) and no step, so
// its metadata has format, switchyard_source and switchyard_config only.
SafetensorsExportResult export_safetensors(const WeightsSource& source, const std::string& output,
                                           const SafetensorsExportOptions& options);

}  // namespace switchyard
