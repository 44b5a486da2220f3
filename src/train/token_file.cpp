// Token file writer (temporary file + fsync + rename) and memory-mapped reader; format in
// token_file.h. Integers are encoded byte by byte so the files are little-endian on any host.
#include "src/train/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "src/core/error.h"

namespace switchyard {
namespace {

constexpr size_t kWriteBufferBytes = size_t(1) << 20;

void store_le(uint8_t* destination, uint64_t value, int bytes) {
  for (int index = 0; index < bytes; ++index) destination[index] = uint8_t(value >> (8 * index));
}
uint64_t load_le(const uint8_t* source, int bytes) {
  uint64_t value = 0;
  for (int index = 0; index < bytes; ++index) value |= uint64_t(source[index]) << (8 * index);
  return value;
}

// For a token file that is not there: the command that makes it. train.bin / val.bin are the
// names the shipped configs use for the two splits, which one prepare-data call writes together.
std::string how_to_make_token_file(const std::string& path) {
  const std::filesystem::path file(path);
  const std::string name = file.filename().string();
  const std::string folder = file.has_parent_path() ? file.parent_path().string() + "/" : "";
  std::string hint = "; make it with `switchyard prepare-data --output ";
  if (name == "train.bin" || name == "val.bin")
    hint += folder + "train.bin --val-output " + folder + "val.bin";
  else
    hint += path;
  hint += " INPUT...` (INPUT: text files or folders of them, e.g. docs/ src/)";
  for (const std::filesystem::path& part : file.parent_path())
    if (part == "sotu") {
      hint += ", or, for data/sotu/, `bash launch/get-data.sh`, which downloads the State of the Union corpus "
              "and prepares it";
      break;
    }
  return hint;
}

void write_all(int descriptor, const uint8_t* data, size_t bytes, const std::string& path) {
  while (bytes > 0) {
    ssize_t written = ::write(descriptor, data, bytes);
    if (written < 0) {
      if (errno == EINTR) continue;
      SY_THROW("writing token file '", path, "' failed: ", std::strerror(errno));
    }
    data += written;
    bytes -= size_t(written);
  }
}

std::string directory_of(const std::string& path) {
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? "." : parent.string();
}

// fsync on the directory makes the rename itself durable.
void sync_directory(const std::string& directory) {
  int descriptor = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY);
  if (descriptor < 0) return;  // some file systems refuse; the data itself is already synced
  ::fsync(descriptor);
  ::close(descriptor);
}

}  // namespace

int bytes_per_token_for_vocab(uint32_t vocab_size) {
  if (vocab_size <= 256u) return 1;
  if (vocab_size <= 65536u) return 2;
  return 4;
}

// ---- Writer --------------------------------------------------------------------------------------

TokenFileWriter::TokenFileWriter(std::string path, uint32_t vocab_size)
    : path_(std::move(path)), vocab_size_(vocab_size), bytes_per_token_(bytes_per_token_for_vocab(vocab_size)) {
  SY_CHECK_INPUT(vocab_size >= 1, "token file '", path_, "': vocab_size must be at least 1");
  SY_CHECK_INPUT(!path_.empty(), "token file path is empty");
  std::error_code status;
  if (std::filesystem::is_directory(path_, status)) SY_BAD_INPUT("cannot write token file '", path_, "': it is a directory");
  // A unique hidden name in the same directory: rename() is atomic only within one file system.
  static std::atomic<uint64_t> counter{0};
  const std::filesystem::path final_path(path_);
  for (int attempt = 0; attempt < 100 && descriptor_ < 0; ++attempt) {
    temp_path_ = (std::filesystem::path(directory_of(path_)) /
                  ("." + final_path.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                   std::to_string(counter.fetch_add(1))))
                     .string();
    descriptor_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (descriptor_ < 0 && errno != EEXIST)
      SY_BAD_INPUT("cannot write token file '", path_, "': creating '", temp_path_, "' failed: ", std::strerror(errno));
  }
  if (descriptor_ < 0) SY_THROW("cannot create a temporary file for '", path_, "'");
  uint8_t header[kTokenFileHeaderBytes] = {0};  // placeholder; commit() writes the real one
  write_all(descriptor_, header, sizeof(header), temp_path_);
  buffer_.reserve(kWriteBufferBytes);
}

TokenFileWriter::~TokenFileWriter() {
  if (descriptor_ >= 0) ::close(descriptor_);
  if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
}

void TokenFileWriter::put_token(uint32_t token) {
  uint8_t encoded[4];
  store_le(encoded, token, bytes_per_token_);
  buffer_.insert(buffer_.end(), encoded, encoded + bytes_per_token_);
  if (buffer_.size() >= kWriteBufferBytes) flush();
}

void TokenFileWriter::append(const uint32_t* tokens, size_t count) {
  SY_CHECK(!committed_, "append after commit on '", path_, "'");
  for (size_t index = 0; index < count; ++index) {
    if (tokens[index] >= vocab_size_)
      SY_BAD_INPUT("token file '", path_, "': token ", tokens[index], " at position ", token_count_ + index,
                   " is not below vocab_size ", vocab_size_);
    put_token(tokens[index]);
  }
  token_count_ += count;
}

void TokenFileWriter::append_bytes(const uint8_t* bytes, size_t count) {
  SY_CHECK(!committed_, "append after commit on '", path_, "'");
  SY_CHECK(vocab_size_ >= 256u, "byte tokens need vocab_size >= 256, '", path_, "' has ", vocab_size_);
  if (bytes_per_token_ == 1) {
    flush();
    write_all(descriptor_, bytes, count, temp_path_);
  } else {
    for (size_t index = 0; index < count; ++index) put_token(bytes[index]);
  }
  token_count_ += count;
}

void TokenFileWriter::flush() {
  if (buffer_.empty()) return;
  write_all(descriptor_, buffer_.data(), buffer_.size(), temp_path_);
  buffer_.clear();
}

void TokenFileWriter::commit() {
  SY_CHECK(!committed_, "commit twice on '", path_, "'");
  flush();
  uint8_t header[kTokenFileHeaderBytes] = {0};
  std::memcpy(header, kTokenFileMagic, sizeof(kTokenFileMagic));
  store_le(header + 8, kTokenFileVersion, 4);
  store_le(header + 12, vocab_size_, 4);
  store_le(header + 16, token_count_, 8);
  store_le(header + 24, uint32_t(bytes_per_token_), 4);
  if (::lseek(descriptor_, 0, SEEK_SET) != 0) SY_THROW("seek in '", temp_path_, "' failed: ", std::strerror(errno));
  write_all(descriptor_, header, sizeof(header), temp_path_);
  if (::fsync(descriptor_) != 0) SY_THROW("fsync of '", temp_path_, "' failed: ", std::strerror(errno));
  if (::close(descriptor_) != 0) {
    descriptor_ = -1;
    SY_THROW("closing '", temp_path_, "' failed: ", std::strerror(errno));
  }
  descriptor_ = -1;
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0)
    SY_BAD_INPUT("cannot write token file '", path_, "': rename from '", temp_path_, "' failed: ", std::strerror(errno));
  committed_ = true;
  sync_directory(directory_of(path_));
}

void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
  TokenFileWriter writer(path, vocab_size);
  writer.append(tokens.data(), tokens.size());
  writer.commit();
}

// ---- Reader --------------------------------------------------------------------------------------

TokenFile::TokenFile(const std::string& path, uint32_t model_vocab_size) : path_(path) {
  int descriptor = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (descriptor < 0) {
    const int saved = errno;
    SY_BAD_INPUT("cannot open token file '", path, "': ", std::strerror(saved),
                 saved == ENOENT ? how_to_make_token_file(path) : std::string());
  }
  struct stat info;
  if (::fstat(descriptor, &info) != 0) {
    int saved = errno;
    ::close(descriptor);
    SY_BAD_INPUT("cannot stat token file '", path, "': ", std::strerror(saved));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(descriptor);
    SY_BAD_INPUT("token file '", path, "' is ", S_ISDIR(info.st_mode) ? "a directory" : "not a regular file",
                 "; expected a token file written by `switchyard prepare-data --output FILE INPUT...`");
  }
  const size_t file_bytes = size_t(info.st_size);
  if (file_bytes < kTokenFileHeaderBytes) {
    ::close(descriptor);
    SY_BAD_INPUT("token file '", path, "' is ", file_bytes, " bytes, smaller than the ", kTokenFileHeaderBytes,
                 "-byte header: not a token file or truncated");
  }
  void* mapping = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, descriptor, 0);
  int map_error = errno;
  ::close(descriptor);  // the mapping keeps the file alive
  if (mapping == MAP_FAILED) SY_THROW("cannot map token file '", path, "': ", std::strerror(map_error));
  mapping_ = mapping;
  mapping_bytes_ = file_bytes;
  try {
    validate_header(model_vocab_size);
  } catch (...) {
    release();  // the destructor does not run for a constructor that throws
    throw;
  }
}

void TokenFile::validate_header(uint32_t model_vocab_size) {
  const std::string& path = path_;
  const size_t file_bytes = mapping_bytes_;
  const uint8_t* header = static_cast<const uint8_t*>(mapping_);
  if (std::memcmp(header, kTokenFileMagic, sizeof(kTokenFileMagic)) != 0)
    SY_BAD_INPUT("token file '", path, "' has the wrong magic (expected \"SWYTOKNS\"): not a switchyard token file "
                 "(write one with switchyard prepare-data)");
  const uint32_t version = uint32_t(load_le(header + 8, 4));
  if (version != kTokenFileVersion)
    SY_BAD_INPUT("token file '", path, "' has version ", version, "; this build reads version ", kTokenFileVersion);
  vocab_size_ = uint32_t(load_le(header + 12, 4));
  const uint64_t count = load_le(header + 16, 8);
  const uint32_t width = uint32_t(load_le(header + 24, 4));
  if (width != 1 && width != 2 && width != 4)
    SY_BAD_INPUT("token file '", path, "' has bytes_per_token ", width, " (expected 1, 2 or 4)");
  bytes_per_token_ = int(width);
  if (vocab_size_ == 0) SY_BAD_INPUT("token file '", path, "' has vocab_size 0");
  // Compare sizes without overflowing: count may be garbage in a damaged header.
  const uint64_t payload_bytes = file_bytes - kTokenFileHeaderBytes;
  if (count > payload_bytes / width || count * width != payload_bytes) {
    if (count > payload_bytes / width)
      SY_BAD_INPUT("token file '", path, "' is truncated: the header says ", count, " tokens (",
                   kTokenFileHeaderBytes, " + ", count, " * ", width, " bytes) but the file has ", file_bytes, " bytes");
    SY_BAD_INPUT("token file '", path, "' has ", payload_bytes - count * width,
                 " unexpected bytes after its ", count, " tokens (damaged header?)");
  }
  if (vocab_size_ > model_vocab_size)
    SY_BAD_INPUT("token file '", path, "' has vocab_size ", vocab_size_, ", larger than the model's vocab_size ",
                 model_vocab_size, " (set model.vocab_size to at least ", vocab_size_, ")");
  token_count_ = int64_t(count);
  tokens_ = header + kTokenFileHeaderBytes;
}

TokenFile::~TokenFile() { release(); }

void TokenFile::release() {
  if (mapping_) ::munmap(mapping_, mapping_bytes_);
  mapping_ = nullptr;
  mapping_bytes_ = 0;
  tokens_ = nullptr;
}

TokenFile::TokenFile(TokenFile&& other) noexcept { *this = std::move(other); }

TokenFile& TokenFile::operator=(TokenFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_bytes_ = std::exchange(other.mapping_bytes_, 0);
    tokens_ = std::exchange(other.tokens_, nullptr);
    vocab_size_ = std::exchange(other.vocab_size_, 0);
    bytes_per_token_ = std::exchange(other.bytes_per_token_, 0);
    token_count_ = std::exchange(other.token_count_, 0);
  }
  return *this;
}

uint32_t TokenFile::raw_token(int64_t index) const {
  const uint8_t* at = tokens_ + size_t(index) * size_t(bytes_per_token_);
  uint32_t value = uint32_t(load_le(at, bytes_per_token_));
  if (value >= vocab_size_)
    SY_BAD_INPUT("token file '", path_, "': token ", value, " at position ", index, " is not below its vocab_size ",
                 vocab_size_, " (corrupt data)");
  return value;
}

int32_t TokenFile::token(int64_t index) const {
  SY_CHECK(is_open(), "token file not open");
  SY_CHECK(index >= 0 && index < token_count_, "token index ", index, " outside [0, ", token_count_, ") of '", path_, "'");
  return int32_t(raw_token(index));
}

void TokenFile::copy_span(int64_t first, int64_t count, int32_t* destination) const {
  SY_CHECK(is_open(), "token file not open");
  SY_CHECK(first >= 0 && count >= 0 && first <= token_count_ && count <= token_count_ - first, "token span [", first,
           ", ", first, " + ", count, ") outside [0, ", token_count_, ") of '", path_, "'");
  if (bytes_per_token_ == 1 && vocab_size_ >= 256u) {  // every byte is a valid id: a plain widening copy
    const uint8_t* source = tokens_ + first;
    for (int64_t index = 0; index < count; ++index) destination[index] = source[index];
    return;
  }
  for (int64_t index = 0; index < count; ++index) destination[index] = int32_t(raw_token(first + index));
}

std::vector<int32_t> TokenFile::span(int64_t first, int64_t count) const {
  std::vector<int32_t> tokens(size_t(count > 0 ? count : 0));
  copy_span(first, count, tokens.data());
  return tokens;
}

}  // namespace switchyard
