// Checkpoint format: names, manifest JSON, markers and verified reads (src/train/checkpoint_format.h).
#include "src/train/checkpoint_format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "src/core/error.h"

namespace switchyard {
namespace fs = std::filesystem;
namespace {

constexpr const char* kCompleteText = "switchyard checkpoint complete\nmanifest xxh64 ";

std::string join_path(const std::string& directory, const std::string& name) {
  return (fs::path(directory) / name).string();
}

int64_t shape_elements(const std::vector<int64_t>& shape, const std::string& where) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0 || (dim > 0 && count > (int64_t(1) << 50) / dim)) SY_BAD_INPUT(where, ": impossible shape");
    count *= dim;
  }
  return count;
}

std::vector<int64_t> parse_shape(const json::Value& json, const std::string& where) {
  std::vector<int64_t> shape;
  for (const json::Value& dim : json.as_array(where)) shape.push_back(dim.as_int64(where));
  return shape;
}

json::Value shape_json(const std::vector<int64_t>& shape) {
  json::Value array = json::Value::array();
  for (int64_t dim : shape) array.push(json::Value::integer(dim));
  return array;
}

bool is_hex16(const std::string& text) {
  return text.size() == 16 && text.find_first_not_of("0123456789abcdef") == std::string::npos;
}

TensorState parse_state(const std::string& text, const std::string& where) {
  for (int state = 0; state < kNumTensorStates; ++state)
    if (text == tensor_state_name(TensorState(state))) return TensorState(state);
  SY_BAD_INPUT(where, ": unknown tensor state '", text, "'");
}

}  // namespace

// ---- Checksums and names -------------------------------------------------------------------------

const char* tensor_state_name(TensorState state) {
  switch (state) {
    case TensorState::master: return "master";
    case TensorState::exp_avg: return "exp_avg";
    case TensorState::exp_avg_sq: return "exp_avg_sq";
  }
  return "?";
}

std::string expert_tensor_name(const std::string& parameter, int64_t expert) {
  if (expert < 0) return parameter;
  const size_t dot = parameter.rfind('.');
  const std::string id = std::to_string(expert);
  if (dot == std::string::npos) return "experts." + id + "." + parameter;
  return parameter.substr(0, dot) + ".experts." + id + parameter.substr(dot);
}

std::string checkpoint_tensor_name(TensorState state, const std::string& parameter, int64_t expert) {
  const std::string base = expert_tensor_name(parameter, expert);
  if (state == TensorState::master) return base;
  return std::string("optimizer.") + tensor_state_name(state) + "." + base;
}

size_t checkpoint_dtype_size(const std::string& dtype) {
  if (dtype == "F32") return 4;
  if (dtype == "F64") return 8;
  if (dtype == "BF16" || dtype == "F16") return 2;
  return 0;
}

const CheckpointTensor* CheckpointManifest::find(const std::string& name) const {
  for (const CheckpointTensor& tensor : tensors)
    if (tensor.name == name) return &tensor;
  return nullptr;
}

// ---- Manifest JSON -------------------------------------------------------------------------------

json::Value manifest_to_json(const CheckpointManifest& manifest) {
  json::Value root = json::Value::object();
  root.set("format", json::Value::string(kCheckpointFormatName));
  root.set("format_version", json::Value::integer(manifest.format_version));
  root.set("checksum", json::Value::string("xxh64"));
  if (!manifest.run_id.empty()) root.set("run_id", json::Value::string(manifest.run_id));
  if (!manifest.model_fingerprint.empty())
    root.set("model_fingerprint", json::Value::string(manifest.model_fingerprint));
  root.set("step", json::Value::integer(manifest.step));
  if (manifest.planned_steps > 0) root.set("planned_steps", json::Value::integer(manifest.planned_steps));
  if (manifest.lr_schedule_steps > 0) root.set("lr_schedule_steps", json::Value::integer(manifest.lr_schedule_steps));
  root.set("tokens_seen", json::Value::integer(manifest.tokens_seen));
  root.set("world_size", json::Value::integer(manifest.world_size));
  root.set("ep_size", json::Value::integer(manifest.ep_size));
  json::Value train = json::Value::object();
  train.set("samples_consumed", json::Value::integer(manifest.train_data.samples_consumed));
  train.set("seed", json::Value::unsigned_integer(manifest.train_data.seed));
  train.set("token_count", json::Value::integer(manifest.train_data.token_count));
  train.set("seq_len", json::Value::integer(manifest.train_data.seq_len));
  json::Value data = json::Value::object();
  data.set("train", std::move(train));
  root.set("data_loader", std::move(data));
  json::Value rng = json::Value::object();
  rng.set("seed", json::Value::unsigned_integer(manifest.rng.seed));
  rng.set("jitter_micro_steps", json::Value::integer(manifest.rng.jitter_micro_steps));
  root.set("rng", std::move(rng));
  json::Value optimizer = json::Value::object();
  optimizer.set("updates", json::Value::integer(manifest.optimizer_updates));
  root.set("optimizer", std::move(optimizer));
  json::Value scaler = json::Value::object();
  scaler.set("enabled", json::Value::boolean(manifest.loss_scaling));
  scaler.set("scale", json::Value::real(manifest.loss_scaler.scale));
  scaler.set("good_steps", json::Value::integer(manifest.loss_scaler.good_steps));
  scaler.set("consecutive_skips", json::Value::integer(manifest.loss_scaler.consecutive_skips));
  scaler.set("total_skips", json::Value::integer(manifest.loss_scaler.total_skips));
  root.set("loss_scaler", std::move(scaler));
  json::Value files = json::Value::array();
  for (const CheckpointShardFile& file : manifest.files) {
    json::Value entry = json::Value::object();
    entry.set("name", json::Value::string(file.name));
    entry.set("rank", json::Value::integer(file.rank));
    entry.set("bytes", json::Value::unsigned_integer(file.bytes));
    files.push(std::move(entry));
  }
  root.set("files", std::move(files));
  json::Value tensors = json::Value::array();
  for (const CheckpointTensor& tensor : manifest.tensors) {
    json::Value entry = json::Value::object();
    entry.set("name", json::Value::string(tensor.name));
    entry.set("parameter", json::Value::string(tensor.parameter));
    entry.set("state", json::Value::string(tensor_state_name(tensor.state)));
    entry.set("expert", json::Value::integer(tensor.expert));
    entry.set("dtype", json::Value::string(tensor.dtype));
    entry.set("shape", shape_json(tensor.shape));
    entry.set("file", json::Value::string(tensor.file));
    entry.set("owner", json::Value::integer(tensor.owner));
    entry.set("offset", json::Value::unsigned_integer(tensor.offset));
    entry.set("bytes", json::Value::unsigned_integer(tensor.bytes));
    entry.set("xxh64", json::Value::string(checksum_hex(tensor.checksum)));
    tensors.push(std::move(entry));
  }
  root.set("tensors", std::move(tensors));
  root.set("config", json::Value::string(manifest.config_yaml));  // last: long, and least read by eye
  return root;
}

CheckpointManifest manifest_from_json(const json::Value& json, const std::string& source) {
  CheckpointManifest manifest;
  const std::string& format = json.at("format", source).as_string(source + ": format");
  if (format != kCheckpointFormatName)
    SY_BAD_INPUT(source, ": format is '", format, "', not a ", kCheckpointFormatName, " manifest");
  manifest.format_version = int(json.at("format_version", source).as_int64(source + ": format_version"));
  if (manifest.format_version != kCheckpointFormatVersion)
    SY_BAD_INPUT(source, ": format version ", manifest.format_version, "; this build reads version ",
                 kCheckpointFormatVersion);
  const std::string& algorithm = json.at("checksum", source).as_string(source + ": checksum");
  if (algorithm != "xxh64") SY_BAD_INPUT(source, ": unknown checksum algorithm '", algorithm, "'");
  manifest.step = json.at("step", source).as_int64(source + ": step");
  manifest.tokens_seen = json.at("tokens_seen", source).as_int64(source + ": tokens_seen");
  manifest.world_size = int(json.at("world_size", source).as_int64(source + ": world_size"));
  manifest.ep_size = int(json.at("ep_size", source).as_int64(source + ": ep_size"));
  if (manifest.step < 0 || manifest.world_size < 1 || manifest.ep_size < 1 ||
      manifest.world_size % manifest.ep_size != 0)
    SY_BAD_INPUT(source, ": impossible step ", manifest.step, " / world_size ", manifest.world_size, " / ep_size ",
                 manifest.ep_size);
  // Identity and plan: absent in manifests of earlier versions.
  if (json.has("run_id")) {
    manifest.run_id = json.at("run_id", source).as_string(source + ": run_id");
    if (!is_hex16(manifest.run_id)) SY_BAD_INPUT(source, ": run_id '", manifest.run_id, "' is not 16 lower-case hex digits");
  }
  if (json.has("model_fingerprint")) {
    manifest.model_fingerprint = json.at("model_fingerprint", source).as_string(source + ": model_fingerprint");
    if (!is_hex16(manifest.model_fingerprint))
      SY_BAD_INPUT(source, ": model_fingerprint '", manifest.model_fingerprint, "' is not 16 lower-case hex digits");
  }
  if (json.has("planned_steps")) manifest.planned_steps = json.at("planned_steps", source).as_int64(source + ": planned_steps");
  if (json.has("lr_schedule_steps"))
    manifest.lr_schedule_steps = json.at("lr_schedule_steps", source).as_int64(source + ": lr_schedule_steps");
  if (json.has("planned_steps") && manifest.planned_steps < 1)
    SY_BAD_INPUT(source, ": planned_steps ", manifest.planned_steps, " is not positive");
  if (json.has("lr_schedule_steps") && manifest.lr_schedule_steps < 1)
    SY_BAD_INPUT(source, ": lr_schedule_steps ", manifest.lr_schedule_steps, " is not positive");
  const std::string data_where = source + ": data_loader.train";
  const json::Value& train = json.at("data_loader", source).at("train", data_where);
  manifest.train_data.samples_consumed = train.at("samples_consumed", data_where).as_int64(data_where);
  manifest.train_data.seed = train.at("seed", data_where).as_uint64(data_where);
  manifest.train_data.token_count = train.at("token_count", data_where).as_int64(data_where);
  manifest.train_data.seq_len = train.at("seq_len", data_where).as_int64(data_where);
  const std::string rng_where = source + ": rng";
  const json::Value& rng = json.at("rng", source);
  manifest.rng.seed = rng.at("seed", rng_where).as_uint64(rng_where + ".seed");
  manifest.rng.jitter_micro_steps = rng.at("jitter_micro_steps", rng_where).as_int64(rng_where + ".jitter_micro_steps");
  manifest.optimizer_updates =
      json.at("optimizer", source).at("updates", source + ": optimizer").as_int64(source + ": optimizer.updates");
  const std::string scaler_where = source + ": loss_scaler";
  const json::Value& scaler = json.at("loss_scaler", source);
  manifest.loss_scaling = scaler.at("enabled", scaler_where).as_bool(scaler_where + ".enabled");
  manifest.loss_scaler.scale = scaler.at("scale", scaler_where).as_double(scaler_where + ".scale");
  manifest.loss_scaler.good_steps = scaler.at("good_steps", scaler_where).as_int64(scaler_where);
  manifest.loss_scaler.consecutive_skips = scaler.at("consecutive_skips", scaler_where).as_int64(scaler_where);
  manifest.loss_scaler.total_skips = scaler.at("total_skips", scaler_where).as_int64(scaler_where);
  manifest.config_yaml = json.at("config", source).as_string(source + ": config");

  std::set<std::string> file_names;
  for (const json::Value& entry : json.at("files", source).as_array(source + ": files")) {
    const std::string where = source + ": files[" + std::to_string(manifest.files.size()) + "]";
    CheckpointShardFile file;
    file.name = entry.at("name", where).as_string(where + ".name");
    file.rank = int(entry.at("rank", where).as_int64(where + ".rank"));
    file.bytes = entry.at("bytes", where).as_uint64(where + ".bytes");
    // A file name from the manifest must stay inside the checkpoint directory.
    if (file.name.empty() || file.name.find('/') != std::string::npos || file.name[0] == '.' ||
        !file_names.insert(file.name).second)
      SY_BAD_INPUT(where, ": bad or repeated file name '", file.name, "'");
    if (file.bytes < kShardHeaderBytes) SY_BAD_INPUT(where, ": ", file.bytes, " bytes is less than a shard header");
    manifest.files.push_back(file);
  }
  std::set<std::string> tensor_names;
  for (const json::Value& entry : json.at("tensors", source).as_array(source + ": tensors")) {
    const std::string where = source + ": tensors[" + std::to_string(manifest.tensors.size()) + "]";
    CheckpointTensor tensor;
    tensor.name = entry.at("name", where).as_string(where + ".name");
    const std::string named = source + ": tensor " + tensor.name;
    tensor.parameter = entry.at("parameter", named).as_string(named + ": parameter");
    tensor.state = parse_state(entry.at("state", named).as_string(named + ": state"), named);
    tensor.expert = entry.at("expert", named).as_int64(named + ": expert");
    tensor.dtype = entry.at("dtype", named).as_string(named + ": dtype");
    tensor.shape = parse_shape(entry.at("shape", named), named + ": shape");
    tensor.file = entry.at("file", named).as_string(named + ": file");
    tensor.owner = int(entry.at("owner", named).as_int64(named + ": owner"));
    tensor.offset = entry.at("offset", named).as_uint64(named + ": offset");
    tensor.bytes = entry.at("bytes", named).as_uint64(named + ": bytes");
    if (!parse_checksum_hex(entry.at("xxh64", named).as_string(named + ": xxh64"), &tensor.checksum))
      SY_BAD_INPUT(named, ": xxh64 is not 16 lower-case hex digits");
    if (!tensor_names.insert(tensor.name).second) SY_BAD_INPUT(named, ": the name appears twice");
    if (tensor.name != checkpoint_tensor_name(tensor.state, tensor.parameter, tensor.expert))
      SY_BAD_INPUT(named, ": name does not match parameter '", tensor.parameter, "', state and expert ", tensor.expert);
    const size_t element = checkpoint_dtype_size(tensor.dtype);
    if (element == 0) SY_BAD_INPUT(named, ": unknown dtype '", tensor.dtype, "'");
    if (uint64_t(shape_elements(tensor.shape, named)) * element != tensor.bytes)
      SY_BAD_INPUT(named, ": ", tensor.bytes, " bytes do not match its dtype and shape");
    const CheckpointShardFile* file = nullptr;
    for (const CheckpointShardFile& candidate : manifest.files)
      if (candidate.name == tensor.file) file = &candidate;
    if (file == nullptr) SY_BAD_INPUT(named, ": file '", tensor.file, "' is not listed under files");
    if (tensor.offset < kShardHeaderBytes || tensor.offset > file->bytes || tensor.bytes > file->bytes - tensor.offset)
      SY_BAD_INPUT(named, ": bytes [", tensor.offset, ", ", tensor.offset + tensor.bytes, ") lie outside ", file->name,
                   " (", file->bytes, " bytes)");
    manifest.tensors.push_back(std::move(tensor));
  }
  return manifest;
}

// ---- Directories and files -----------------------------------------------------------------------

std::string checkpoint_step_name(int64_t step) {
  char buffer[40];
  std::snprintf(buffer, sizeof(buffer), "step-%09lld", static_cast<long long>(step));
  return buffer;
}

std::string checkpoint_step_name(int64_t step, const std::string& run_id) {
  return checkpoint_step_name(step) + "-" + run_id;
}

bool parse_checkpoint_step_name(const std::string& name, int64_t* step, std::string* run_id) {
  if (name.size() < 6 || name.compare(0, 5, "step-") != 0) return false;
  const size_t digits_end = std::min(name.find('-', 5), name.size());
  const std::string digits = name.substr(5, digits_end - 5);
  if (digits.empty() || digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) return false;
  std::string suffix;
  if (digits_end < name.size()) {
    suffix = name.substr(digits_end + 1);
    if (!is_hex16(suffix)) return false;
  }
  *step = std::stoll(digits);
  if (run_id) *run_id = suffix;
  return true;
}

std::string checkpoint_temp_name(int64_t step, const std::string& run_id) {
  return "." + checkpoint_step_name(step) + "." + run_id + ".tmp";
}

bool parse_checkpoint_temp_name(const std::string& name, int64_t* step, std::string* run_id) {
  if (name.size() < 6 || name[0] != '.' || name.compare(name.size() - 4, 4, ".tmp") != 0) return false;
  std::string middle = name.substr(1, name.size() - 5);  // step-N or step-N.<run id>
  std::string suffix;
  const size_t dot = middle.find('.');
  if (dot != std::string::npos) {
    suffix = middle.substr(dot + 1);
    middle.resize(dot);
    if (!is_hex16(suffix)) return false;
  }
  std::string step_suffix;
  if (!parse_checkpoint_step_name(middle, step, &step_suffix) || !step_suffix.empty()) return false;
  *run_id = suffix;
  return true;
}

std::string shard_file_name(int rank) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "shard-%05d.bin", rank);
  return buffer;
}

std::vector<CheckpointListing> list_checkpoints(const std::string& root) {
  std::vector<CheckpointListing> listing;
  std::error_code status;
  if (!fs::is_directory(root, status)) return listing;
  for (const fs::directory_entry& entry : fs::directory_iterator(root, status)) {
    int64_t step = 0;
    if (!parse_checkpoint_step_name(entry.path().filename().string(), &step)) continue;
    std::error_code entry_status;
    if (!entry.is_directory(entry_status)) continue;
    CheckpointListing item;
    item.path = entry.path().string();
    item.step = step;
    item.complete = fs::is_regular_file(entry.path() / kCheckpointCompleteFile, entry_status);
    listing.push_back(item);
  }
  // By step; step-N before step-N-<run id> (a shorter name sorts first).
  std::sort(listing.begin(), listing.end(), [](const CheckpointListing& left, const CheckpointListing& right) {
    return left.step != right.step ? left.step < right.step : left.path < right.path;
  });
  return listing;
}

bool is_checkpoint_directory(const std::string& path) {
  std::error_code status;
  return fs::is_regular_file(fs::path(path) / kCheckpointManifestFile, status);
}

void write_all(int descriptor, const void* data, size_t bytes, const std::string& path) {
  const char* input = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t written = ::write(descriptor, input, bytes);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) SY_THROW("writing '", path, "' failed: ", std::strerror(errno));
    input += written;
    bytes -= size_t(written);
  }
}

void fsync_path(const std::string& path, bool directory) {
  const int descriptor = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (descriptor < 0) SY_THROW("cannot open '", path, "' to fsync it: ", std::strerror(errno));
  const int result = ::fsync(descriptor);
  const int saved = errno;
  ::close(descriptor);
  // Some file systems do not support fsync on directories (EINVAL); the data files are synced.
  if (result != 0 && !(directory && (saved == EINVAL || saved == ENOTSUP)))
    SY_THROW("fsync of '", path, "' failed: ", std::strerror(saved));
}

void write_file_atomically(const std::string& path, bool user_path,
                           const std::function<void(int descriptor, const std::string& temp)>& write) {
  static std::atomic<uint64_t> counter{0};
  const fs::path target(path);
  const std::string directory = target.parent_path().empty() ? "." : target.parent_path().string();
  const std::string temp = join_path(directory, "." + target.filename().string() + ".tmp." +
                                                    std::to_string(::getpid()) + "." + std::to_string(counter++));
  const int descriptor = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (descriptor < 0) {
    if (user_path) SY_BAD_INPUT("cannot write '", path, "': ", std::strerror(errno));
    SY_THROW("cannot create '", temp, "': ", std::strerror(errno));
  }
  try {
    write(descriptor, temp);
    if (::fsync(descriptor) != 0) SY_THROW("fsync of '", temp, "' failed: ", std::strerror(errno));
  } catch (...) {
    ::close(descriptor);
    ::unlink(temp.c_str());
    throw;
  }
  ::close(descriptor);
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    const int saved = errno;
    ::unlink(temp.c_str());
    SY_THROW("renaming '", temp, "' to '", path, "' failed: ", std::strerror(saved));
  }
  fsync_path(directory, true);
}

void write_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, false, [&](int descriptor, const std::string& temp) {
    write_all(descriptor, text.data(), text.size(), temp);
  });
}

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) SY_BAD_INPUT("cannot read ", what, " '", path, "': ", std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
  if (stream.bad()) SY_BAD_INPUT("reading ", what, " '", path, "' failed");
  return text;
}

void write_complete_marker(const std::string& directory, const std::string& manifest_text) {
  write_file_atomically(join_path(directory, kCheckpointCompleteFile),
                        std::string(kCompleteText) + checksum_hex(xxh64(manifest_text.data(), manifest_text.size())) +
                            "\n");
}

CheckpointManifest read_checkpoint_manifest(const std::string& directory) {
  std::error_code status;
  if (!fs::is_directory(directory, status)) SY_BAD_INPUT("checkpoint '", directory, "' is not a directory");
  const std::string marker_path = join_path(directory, kCheckpointCompleteFile);
  const std::string manifest_path = join_path(directory, kCheckpointManifestFile);
  if (!fs::exists(marker_path, status))
    SY_BAD_INPUT("checkpoint '", directory, "' is incomplete: ", marker_path,
                 " is missing (the save did not finish)");
  if (!fs::exists(manifest_path, status))
    SY_BAD_INPUT("checkpoint '", directory, "': the manifest ", manifest_path, " is missing");
  const std::string manifest_text = read_text_file(manifest_path, "checkpoint manifest");
  const std::string marker = read_text_file(marker_path, "checkpoint marker");
  const std::string expected =
      std::string(kCompleteText) + checksum_hex(xxh64(manifest_text.data(), manifest_text.size())) + "\n";
  if (marker != expected)
    SY_BAD_INPUT("checkpoint '", directory, "': ", manifest_path, " does not match its completion marker ",
                 marker_path, " (the manifest was modified or damaged)");
  CheckpointManifest manifest = manifest_from_json(json::parse(manifest_text, manifest_path), manifest_path);

  for (const CheckpointShardFile& file : manifest.files) {
    const std::string path = join_path(directory, file.name);
    struct stat info;
    if (::stat(path.c_str(), &info) != 0)
      SY_BAD_INPUT("checkpoint shard ", path, " is missing (listed in ", manifest_path, ")");
    if (uint64_t(info.st_size) != file.bytes)
      SY_BAD_INPUT("checkpoint shard ", path, " is ", uint64_t(info.st_size) < file.bytes ? "truncated" : "too long",
                   ": ", info.st_size, " bytes, the manifest says ", file.bytes);
    const int descriptor = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (descriptor < 0) SY_BAD_INPUT("cannot read checkpoint shard ", path, ": ", std::strerror(errno));
    unsigned char header[kShardHeaderBytes];
    const ssize_t got = ::pread(descriptor, header, sizeof(header), 0);
    ::close(descriptor);
    if (got != ssize_t(sizeof(header))) SY_BAD_INPUT("cannot read the header of checkpoint shard ", path);
    uint32_t version = 0, rank = 0;
    int64_t step = 0;
    std::memcpy(&version, header + 8, 4);
    std::memcpy(&rank, header + 12, 4);
    std::memcpy(&step, header + 16, 8);
    if (std::memcmp(header, kShardMagic, sizeof(kShardMagic)) != 0 || version != uint32_t(kCheckpointFormatVersion) ||
        int(rank) != file.rank || step != manifest.step)
      SY_BAD_INPUT("checkpoint shard ", path, " has a bad header (not rank ", file.rank, "'s shard of step ",
                   manifest.step, ")");
  }
  return manifest;
}

// ---- Reader --------------------------------------------------------------------------------------

CheckpointReader::CheckpointReader(std::string directory, const CheckpointManifest& manifest)
    : directory_(std::move(directory)), manifest_(manifest) {}

CheckpointReader::~CheckpointReader() {
  for (auto& entry : open_) ::close(entry.second);
}

int CheckpointReader::descriptor(const std::string& file) {
  for (const auto& entry : open_)
    if (entry.first == file) return entry.second;
  const std::string path = join_path(directory_, file);
  const int handle = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (handle < 0) SY_BAD_INPUT("cannot read checkpoint shard ", path, ": ", std::strerror(errno));
  open_.emplace_back(file, handle);
  return handle;
}

void CheckpointReader::read(const CheckpointTensor& tensor, void* destination) {
  const int handle = descriptor(tensor.file);
  const std::string path = join_path(directory_, tensor.file);
  char* output = static_cast<char*>(destination);
  uint64_t done = 0;
  while (done < tensor.bytes) {
    const ssize_t got = ::pread(handle, output + done, size_t(tensor.bytes - done), off_t(tensor.offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      SY_BAD_INPUT("checkpoint shard ", path, " is truncated: tensor ", tensor.name, " needs bytes [", tensor.offset,
                   ", ", tensor.offset + tensor.bytes, ")");
    done += uint64_t(got);
  }
  const uint64_t checksum = xxh64(destination, size_t(tensor.bytes));
  if (checksum != tensor.checksum)
    SY_BAD_INPUT("checkpoint shard ", path, " is corrupt: tensor ", tensor.name, " (bytes ", tensor.offset, "..",
                 tensor.offset + tensor.bytes, ") has XXH64 ", checksum_hex(checksum), ", the manifest says ",
                 checksum_hex(tensor.checksum));
}

}  // namespace switchyard
