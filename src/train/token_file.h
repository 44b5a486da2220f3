// Token files: the training data format `switchyard prepare-data` writes and the trainer reads.
//
// Layout (all integers little-endian):
//   offset  0  char[8]  magic "SWYTOKNS"
//   offset  8  uint32   version (1)
//   offset 12  uint32   vocab_size (every token id is < vocab_size)
//   offset 16  uint64   token_count
//   offset 24  uint32   bytes_per_token (1, 2 or 4: the smallest that holds vocab_size - 1)
//   offset 28  zeros up to offset 64 (reserved)
//   offset 64  token_count tokens, bytes_per_token each
// The file size is exactly 64 + token_count * bytes_per_token.
//
// The writer streams tokens into a temporary file in the destination directory, then writes the
// header, fsyncs and renames, so a crash never leaves a half file under the final name. The reader
// memory-maps the file read-only (the OS pages in only what a step reads) and validates the header
// against the file size and the model's vocabulary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace switchyard {

constexpr char kTokenFileMagic[8] = {'S', 'W', 'Y', 'T', 'O', 'K', 'N', 'S'};
constexpr uint32_t kTokenFileVersion = 1;
constexpr size_t kTokenFileHeaderBytes = 64;

// 1 for vocabularies up to 256, 2 up to 65536, else 4.
int bytes_per_token_for_vocab(uint32_t vocab_size);

class TokenFileWriter {
 public:
  // Creates the temporary file next to `path`; SY_BAD_INPUT when the directory is not writable.
  TokenFileWriter(std::string path, uint32_t vocab_size);
  ~TokenFileWriter();  // without commit(): removes the temporary file, `path` is untouched
  TokenFileWriter(const TokenFileWriter&) = delete;
  TokenFileWriter& operator=(const TokenFileWriter&) = delete;

  void append(const uint32_t* tokens, size_t count);  // SY_BAD_INPUT if a token >= vocab_size
  void append_bytes(const uint8_t* bytes, size_t count);  // byte tokens (any vocab_size >= 256)
  uint64_t token_count() const { return token_count_; }
  // Writes the header, fsyncs, renames onto `path` (replacing it) and fsyncs the directory.
  void commit();

 private:
  void put_token(uint32_t token);
  void flush();

  std::string path_, temp_path_;
  uint32_t vocab_size_;
  int bytes_per_token_;
  int descriptor_ = -1;
  uint64_t token_count_ = 0;
  std::vector<uint8_t> buffer_;
  bool committed_ = false;
};

// Writes a whole token file in one call.
void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size);

class TokenFile {
 public:
  TokenFile() = default;
  // Maps and validates `path`. SY_BAD_INPUT naming the file for: missing/unreadable, too small,
  // wrong magic, unknown version, bad bytes_per_token, size not matching token_count (truncated
  // or trailing bytes), vocab_size larger than `model_vocab_size`.
  TokenFile(const std::string& path, uint32_t model_vocab_size);
  ~TokenFile();
  TokenFile(TokenFile&& other) noexcept;
  TokenFile& operator=(TokenFile&& other) noexcept;
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  bool is_open() const { return mapping_ != nullptr; }
  const std::string& path() const { return path_; }
  uint32_t vocab_size() const { return vocab_size_; }
  int bytes_per_token() const { return bytes_per_token_; }
  int64_t size() const { return token_count_; }

  // Token `index` (SY_CHECK on the range). A stored id >= vocab_size is SY_BAD_INPUT (corrupt data).
  int32_t token(int64_t index) const;
  // Tokens [first, first + count) into `destination`, checked as token() does.
  void copy_span(int64_t first, int64_t count, int32_t* destination) const;
  std::vector<int32_t> span(int64_t first, int64_t count) const;

 private:
  void release();
  void validate_header(uint32_t model_vocab_size);
  uint32_t raw_token(int64_t index) const;

  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  const uint8_t* tokens_ = nullptr;
  uint32_t vocab_size_ = 0;
  int bytes_per_token_ = 0;
  int64_t token_count_ = 0;
};

}  // namespace switchyard
