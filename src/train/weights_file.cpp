// The final weights file (format: src/train/weights_file.h).
#include "src/train/weights_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "src/core/error.h"
#include "src/train/checkpoint_checksum.h"

namespace switchyard {
namespace {

constexpr char kWeightsMagic[8] = {'S', 'W', 'Y', 'W', 'G', 'H', 'T', 'S'};
constexpr uint32_t kWeightsVersion = 1;
constexpr uint32_t kWeightsDtypeF32 = 1;

bool little_endian() {
  const uint16_t probe = 1;
  uint8_t first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

std::string directory_of(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? "." : parent.string();
}

// Sequential reader over the file's bytes; every read is bounds-checked.
class ByteReader {
 public:
  ByteReader(const std::string& path, std::vector<char> bytes) : path_(path), bytes_(std::move(bytes)) {}
  template <typename T>
  T get(const char* what) {
    T value;
    read(&value, sizeof(T), what);
    return value;
  }
  void read(void* destination, size_t count, const char* what) {
    if (count > bytes_.size() - position_)
      SY_BAD_INPUT("weights file '", path_, "' is truncated (reading ", what, " at byte ", position_, ")");
    std::memcpy(destination, bytes_.data() + position_, count);
    position_ += count;
  }
  size_t remaining() const { return bytes_.size() - position_; }

 private:
  std::string path_;
  std::vector<char> bytes_;
  size_t position_ = 0;
};

}  // namespace

const WeightsTensor* WeightsFile::find(const std::string& name) const {
  for (const WeightsTensor& tensor : tensors)
    if (tensor.name == name) return &tensor;
  return nullptr;
}

// ---- Writer ------------------------------------------------------------------------------------

WeightsFileWriter::WeightsFileWriter(std::string path, const std::string& config_yaml, uint32_t tensor_count)
    : path_(std::move(path)), expected_(tensor_count) {
  SY_CHECK(little_endian(), "the weights file format is little-endian; this host is not");
  static std::atomic<uint64_t> counter{0};
  temp_path_ = (std::filesystem::path(directory_of(path_)) /
                ("." + std::filesystem::path(path_).filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                 std::to_string(counter.fetch_add(1))))
                   .string();
  descriptor_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (descriptor_ < 0) SY_BAD_INPUT("cannot write weights file '", path_, "': ", std::strerror(errno));
  write_bytes(kWeightsMagic, sizeof(kWeightsMagic));
  write_bytes(&kWeightsVersion, sizeof(kWeightsVersion));
  write_bytes(&tensor_count, sizeof(tensor_count));
  const uint64_t config_bytes = config_yaml.size();
  write_bytes(&config_bytes, sizeof(config_bytes));
  write_bytes(config_yaml.data(), config_yaml.size());
}

WeightsFileWriter::~WeightsFileWriter() {
  if (descriptor_ >= 0) ::close(descriptor_);
  if (!committed_) ::unlink(temp_path_.c_str());
}

void WeightsFileWriter::write_bytes(const void* data, size_t bytes) {
  const char* input = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t written = ::write(descriptor_, input, bytes);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) SY_THROW("writing weights file '", temp_path_, "' failed: ", std::strerror(errno));
    input += written;
    bytes -= size_t(written);
  }
}

void WeightsFileWriter::add(const std::string& name, const std::vector<int64_t>& shape, const float* values) {
  SY_CHECK(!committed_ && written_ < expected_, "WeightsFileWriter: more tensors than the ", expected_, " announced");
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  const uint32_t name_bytes = uint32_t(name.size()), rank = uint32_t(shape.size());
  write_bytes(&name_bytes, sizeof(name_bytes));
  write_bytes(name.data(), name.size());
  write_bytes(&rank, sizeof(rank));
  write_bytes(shape.data(), shape.size() * sizeof(int64_t));
  write_bytes(&kWeightsDtypeF32, sizeof(kWeightsDtypeF32));
  const uint64_t checksum = fnv1a64(values, size_t(count) * sizeof(float));
  write_bytes(&checksum, sizeof(checksum));
  write_bytes(values, size_t(count) * sizeof(float));
  ++written_;
}

void WeightsFileWriter::commit() {
  SY_CHECK(written_ == expected_, "WeightsFileWriter: ", written_, " tensors written, ", expected_, " announced");
  if (::fsync(descriptor_) != 0) SY_THROW("fsync of '", temp_path_, "' failed: ", std::strerror(errno));
  ::close(descriptor_);
  descriptor_ = -1;
  if (std::rename(temp_path_.c_str(), path_.c_str()) != 0)
    SY_THROW("renaming '", temp_path_, "' to '", path_, "' failed: ", std::strerror(errno));
  committed_ = true;
  const int directory = ::open(directory_of(path_).c_str(), O_RDONLY | O_DIRECTORY);
  if (directory >= 0) {
    ::fsync(directory);
    ::close(directory);
  }
}

// ---- Reader ------------------------------------------------------------------------------------

bool has_weights_file_magic(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  char magic[sizeof(kWeightsMagic)] = {};
  return stream.read(magic, sizeof(magic)) && std::memcmp(magic, kWeightsMagic, sizeof(magic)) == 0;
}

WeightsFile read_weights_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) SY_BAD_INPUT("cannot read weights file '", path, "': ", std::strerror(errno));
  std::vector<char> bytes((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
  ByteReader reader(path, std::move(bytes));
  char magic[8];
  reader.read(magic, sizeof(magic), "the magic");
  if (std::memcmp(magic, kWeightsMagic, sizeof(magic)) != 0)
    SY_BAD_INPUT("'", path, "' is not a switchyard weights file (bad magic)");
  const uint32_t version = reader.get<uint32_t>("the version");
  if (version != kWeightsVersion)
    SY_BAD_INPUT("weights file '", path, "' has version ", version, "; this build reads version ", kWeightsVersion);
  const uint32_t count = reader.get<uint32_t>("the tensor count");
  const uint64_t config_bytes = reader.get<uint64_t>("the config size");
  if (config_bytes > reader.remaining()) SY_BAD_INPUT("weights file '", path, "' is truncated (config)");
  WeightsFile file;
  file.config_yaml.resize(size_t(config_bytes));
  reader.read(file.config_yaml.data(), size_t(config_bytes), "the config");
  for (uint32_t index = 0; index < count; ++index) {
    WeightsTensor tensor;
    const uint32_t name_bytes = reader.get<uint32_t>("a tensor name size");
    if (name_bytes > reader.remaining()) SY_BAD_INPUT("weights file '", path, "' is truncated (tensor ", index, ")");
    tensor.name.resize(name_bytes);
    reader.read(tensor.name.data(), name_bytes, "a tensor name");
    const uint32_t rank = reader.get<uint32_t>("a tensor rank");
    if (rank > uint32_t(kMaxTensorRank))
      SY_BAD_INPUT("weights file '", path, "': tensor ", tensor.name, " has rank ", rank);
    tensor.shape.resize(rank);
    reader.read(tensor.shape.data(), rank * sizeof(int64_t), "a tensor shape");
    int64_t elements = 1;
    for (int64_t dim : tensor.shape) {
      if (dim < 0 || (dim > 0 && elements > int64_t(reader.remaining()) / dim))
        SY_BAD_INPUT("weights file '", path, "': tensor ", tensor.name, " has an impossible shape");
      elements *= dim;
    }
    const uint32_t dtype = reader.get<uint32_t>("a tensor dtype");
    if (dtype != kWeightsDtypeF32)
      SY_BAD_INPUT("weights file '", path, "': tensor ", tensor.name, " has unknown dtype code ", dtype);
    const uint64_t checksum = reader.get<uint64_t>("a checksum");
    tensor.values.resize(size_t(elements));
    reader.read(tensor.values.data(), size_t(elements) * sizeof(float), "tensor data");
    if (fnv1a64(tensor.values.data(), size_t(elements) * sizeof(float)) != checksum)
      SY_BAD_INPUT("weights file '", path, "': tensor ", tensor.name, " fails its checksum (corrupt file)");
    file.tensors.push_back(std::move(tensor));
  }
  if (reader.remaining() != 0)
    SY_BAD_INPUT("weights file '", path, "' has ", reader.remaining(), " trailing bytes");
  return file;
}

// ---- Model <-> file ------------------------------------------------------------------------------

void save_final_weights(const ExecContext& context, const std::string& path, const std::string& config_yaml,
                        const ModelParameters& parameters, const ParallelGroups* groups, bool is_writer) {
  ops::synchronize(context);
  const ParameterLayout& layout = parameters.layout();
  std::unique_ptr<WeightsFileWriter> writer;
  if (is_writer) writer = std::make_unique<WeightsFileWriter>(path, config_yaml, uint32_t(layout.size()));
  const bool sharded = groups != nullptr && groups->expert_parallel != nullptr && groups->expert_parallel->size() > 1;
  for (int index = 0; index < layout.size(); ++index) {
    const ParameterSpec& spec = layout.spec(index);
    std::vector<float> values;
    if (spec.is_sharded() && sharded) {
      // All ranks of the expert-parallel group contribute their shard, in rank (= shard) order.
      Communicator& communicator = *groups->expert_parallel;
      const Tensor master = parameters.master(index);
      const int64_t count = master.numel();
      values.resize(size_t(count) * size_t(communicator.size()));
      if (communicator.device() == DeviceKind::cpu) {
        std::vector<float> mine(static_cast<size_t>(count));
        const std::vector<double> shard = parameters.master_values(context, index);
        for (size_t i = 0; i < shard.size(); ++i) mine[i] = float(shard[i]);
        communicator.all_gather(mine.data(), values.data(), count, DType::f32);
      } else {
        SY_CHECK(master.dtype == DType::f32, "expert master weights on the GPU must be fp32");
        Buffer gathered(communicator.device(), values.size() * sizeof(float));
        communicator.all_gather(master.data, gathered.data(), count, DType::f32);
        communicator.synchronize();
        device_copy(values.data(), DeviceKind::cpu, gathered.data(), communicator.device(), gathered.bytes());
      }
    } else {
      const std::vector<double> local = parameters.master_values(context, index);
      values.assign(local.begin(), local.end());
    }
    if (writer) writer->add(spec.name, spec.is_sharded() && sharded ? spec.global_shape() : spec.shape, values.data());
  }
  if (writer) writer->commit();
}

void load_weights(const ExecContext& context, const WeightsFile& file, ModelParameters& parameters) {
  const ParameterLayout& layout = parameters.layout();
  for (int index = 0; index < layout.size(); ++index) {
    const ParameterSpec& spec = layout.spec(index);
    const WeightsTensor* tensor = file.find(spec.name);
    if (tensor == nullptr) SY_BAD_INPUT("the weights file has no tensor '", spec.name, "'");
    if (tensor->shape != spec.global_shape()) {
      std::string expected, found;
      for (int64_t dim : spec.global_shape()) expected += (expected.empty() ? "" : ", ") + std::to_string(dim);
      for (int64_t dim : tensor->shape) found += (found.empty() ? "" : ", ") + std::to_string(dim);
      SY_BAD_INPUT("weights file tensor '", spec.name, "' is [", found, "], the model needs [", expected, "]");
    }
    // This rank's shard: experts [expert_first, expert_first + local) of the global tensor.
    const int64_t count = spec.numel();
    const int64_t first = spec.is_sharded() && spec.shape[0] > 0 ? spec.expert_first * (count / spec.shape[0]) : 0;
    std::vector<double> values(tensor->values.begin() + first, tensor->values.begin() + first + count);
    parameters.set_master_values(context, index, values);
  }
  parameters.refresh_compute_copies(context);
  ops::synchronize(context);
}

}  // namespace switchyard
