// Token files: write/read round trips for every token width, the on-disk layout, and each
// validation error (bad magic, version, truncation, trailing bytes, vocab too large).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "src/core/error.h"
#include "src/train/token_file.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;

namespace {

class TokenFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = std::filesystem::temp_directory_path() /
                 ("sy_token_test_" + std::to_string(::getpid()) + "_" +
                  ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(directory_);
    std::filesystem::create_directories(directory_);
  }
  void TearDown() override { std::filesystem::remove_all(directory_); }
  std::string path(const std::string& name) const { return (directory_ / name).string(); }

  std::vector<uint8_t> read_bytes(const std::string& file) const {
    std::ifstream stream(file, std::ios::binary);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
  }
  void write_bytes(const std::string& file, const std::vector<uint8_t>& bytes) const {
    std::ofstream stream(file, std::ios::binary | std::ios::trunc);
    stream.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  }
  // Files in the directory other than `except` (to catch leftover temporaries).
  std::vector<std::string> other_files(const std::string& except) const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(directory_))
      if (entry.path().filename() != except) names.push_back(entry.path().filename().string());
    return names;
  }

  std::filesystem::path directory_;
};

std::vector<uint32_t> random_tokens(std::mt19937& generator, size_t count, uint32_t vocab_size) {
  std::uniform_int_distribution<uint32_t> pick(0, vocab_size - 1);
  std::vector<uint32_t> tokens(count);
  for (uint32_t& token : tokens) token = pick(generator);
  tokens[count / 2] = vocab_size - 1;  // the largest id must survive its width
  return tokens;
}


}  // namespace

TEST_F(TokenFileTest, RoundTripsEveryWidth) {
  std::mt19937 generator(std::random_device{}());
  for (uint32_t vocab_size : {256u, 300u, 65536u, 70000u, 5000000u}) {
    const std::string file = path("t" + std::to_string(vocab_size) + ".bin");
    std::vector<uint32_t> tokens = random_tokens(generator, 1000 + generator() % 3000, vocab_size);
    write_token_file(file, tokens, vocab_size);
    TokenFile reader(file, vocab_size);
    ASSERT_EQ(reader.size(), int64_t(tokens.size()));
    EXPECT_EQ(reader.vocab_size(), vocab_size);
    EXPECT_EQ(reader.bytes_per_token(), bytes_per_token_for_vocab(vocab_size));
    EXPECT_EQ(std::filesystem::file_size(file), kTokenFileHeaderBytes + tokens.size() * size_t(reader.bytes_per_token()));
    for (size_t index = 0; index < tokens.size(); ++index) ASSERT_EQ(reader.token(int64_t(index)), int32_t(tokens[index]));
    // A span from a random place, into poisoned memory.
    const int64_t first = int64_t(generator() % (tokens.size() / 2)), count = int64_t(tokens.size() / 3);
    std::vector<int32_t> span(size_t(count) + 2, -777);
    reader.copy_span(first, count, span.data() + 1);
    EXPECT_EQ(span.front(), -777);
    EXPECT_EQ(span.back(), -777);
    for (int64_t index = 0; index < count; ++index) ASSERT_EQ(span[size_t(index + 1)], int32_t(tokens[size_t(first + index)]));
    EXPECT_EQ(reader.span(first, count), std::vector<int32_t>(span.begin() + 1, span.end() - 1));
  }
}

TEST_F(TokenFileTest, HeaderLayoutIsLittleEndian) {
  const std::string file = path("layout.bin");
  write_token_file(file, {0x0102, 0xfffe, 7}, 65536);
  std::vector<uint8_t> bytes = read_bytes(file);
  ASSERT_EQ(bytes.size(), 64u + 3 * 2);
  EXPECT_EQ(std::memcmp(bytes.data(), "SWYTOKNS", 8), 0);
  EXPECT_EQ(bytes[8], 1);  // version 1
  EXPECT_EQ(bytes[9] | bytes[10] | bytes[11], 0);
  EXPECT_EQ(bytes[12] | (bytes[13] << 8) | (bytes[14] << 16) | (bytes[15] << 24), 65536);  // vocab_size
  EXPECT_EQ(bytes[16], 3);                                                                // token_count
  EXPECT_EQ(bytes[24], 2);                                                                // bytes_per_token
  for (size_t index = 28; index < 64; ++index) EXPECT_EQ(bytes[index], 0) << "reserved byte " << index;
  EXPECT_EQ(bytes[64], 0x02);
  EXPECT_EQ(bytes[65], 0x01);
  EXPECT_EQ(bytes[66], 0xfe);
  EXPECT_EQ(bytes[67], 0xff);
}

TEST_F(TokenFileTest, StreamingWriterAppendsBytesAndTokens) {
  std::mt19937 generator(std::random_device{}());
  const std::string file = path("stream.bin");
  std::vector<uint8_t> expected;
  {
    TokenFileWriter writer(file, 256);
    for (int piece = 0; piece < 20; ++piece) {
      std::vector<uint8_t> chunk(1 + generator() % 200000);
      for (uint8_t& byte : chunk) byte = uint8_t(generator());
      writer.append_bytes(chunk.data(), chunk.size());
      expected.insert(expected.end(), chunk.begin(), chunk.end());
      uint32_t token = generator() % 256;
      writer.append(&token, 1);
      expected.push_back(uint8_t(token));
    }
    EXPECT_EQ(writer.token_count(), expected.size());
    EXPECT_FALSE(std::filesystem::exists(file)) << "the final name must not appear before commit()";
    writer.commit();
  }
  TokenFile reader(file, 256);
  ASSERT_EQ(reader.size(), int64_t(expected.size()));
  std::vector<int32_t> all = reader.span(0, reader.size());
  for (size_t index = 0; index < expected.size(); ++index) ASSERT_EQ(all[index], expected[index]) << index;
  EXPECT_TRUE(other_files("stream.bin").empty()) << "temporary file left behind";
}

TEST_F(TokenFileTest, AbandonedWriterLeavesNothing) {
  const std::string file = path("abandoned.bin");
  write_token_file(file, {1, 2, 3}, 256);  // an older complete file stays intact
  {
    TokenFileWriter writer(file, 256);
    uint32_t tokens[2] = {9, 9};
    writer.append(tokens, 2);
  }  // no commit
  TokenFile reader(file, 256);
  EXPECT_EQ(reader.span(0, 3), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_TRUE(other_files("abandoned.bin").empty());
}

TEST_F(TokenFileTest, WriterRejectsTokensOutsideTheVocabulary) {
  TokenFileWriter writer(path("v.bin"), 300);
  uint32_t tokens[3] = {5, 300, 1};
  expect_bad_input([&] { writer.append(tokens, 3); }, {"v.bin", "300", "position 1"});
}

TEST_F(TokenFileTest, UnwritableDirectoryIsBadInput) {
  expect_bad_input([&] { TokenFileWriter writer(path("missing_dir/x.bin"), 256); }, {"missing_dir/x.bin"});
  expect_bad_input([&] { TokenFileWriter writer(directory_.string(), 256); }, {"directory"});
}

TEST_F(TokenFileTest, RejectsWrongMagic) {
  const std::string file = path("magic.bin");
  write_token_file(file, {1, 2, 3, 4}, 256);
  std::vector<uint8_t> bytes = read_bytes(file);
  bytes[3] = 'X';
  write_bytes(file, bytes);
  expect_bad_input([&] { TokenFile reader(file, 256); }, {"magic.bin", "magic"});
  write_bytes(file, std::vector<uint8_t>(100, 'a'));  // plain text of header size
  expect_bad_input([&] { TokenFile reader(file, 256); }, {"magic.bin", "magic"});
}

TEST_F(TokenFileTest, RejectsUnknownVersion) {
  const std::string file = path("version.bin");
  write_token_file(file, {1, 2}, 256);
  std::vector<uint8_t> bytes = read_bytes(file);
  bytes[8] = 2;
  write_bytes(file, bytes);
  expect_bad_input([&] { TokenFile reader(file, 256); }, {"version.bin", "version 2"});
}

TEST_F(TokenFileTest, RejectsTruncatedAndPaddedFiles) {
  std::mt19937 generator(std::random_device{}());
  const std::string file = path("trunc.bin");
  write_token_file(file, random_tokens(generator, 500, 60000), 60000);
  std::vector<uint8_t> bytes = read_bytes(file);
  std::vector<uint8_t> cut(bytes.begin(), bytes.end() - 1 - int(generator() % 100));
  write_bytes(file, cut);
  expect_bad_input([&] { TokenFile reader(file, 65536); }, {"trunc.bin", "truncated", "500 tokens"});
  write_bytes(file, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 20));  // not even a header
  expect_bad_input([&] { TokenFile reader(file, 65536); }, {"trunc.bin", "smaller than"});
  std::vector<uint8_t> padded = bytes;
  padded.push_back(0);
  padded.push_back(0);
  write_bytes(file, padded);
  expect_bad_input([&] { TokenFile reader(file, 65536); }, {"trunc.bin", "2 unexpected bytes"});
  // A huge count in a damaged header must not overflow into a "valid" size.
  std::vector<uint8_t> damaged = bytes;
  for (int index = 16; index < 24; ++index) damaged[size_t(index)] = 0xff;
  write_bytes(file, damaged);
  expect_bad_input([&] { TokenFile reader(file, 65536); }, {"trunc.bin", "truncated"});
}

TEST_F(TokenFileTest, RejectsVocabularyLargerThanTheModel) {
  const std::string file = path("vocab.bin");
  write_token_file(file, {1, 2, 3}, 50000);
  expect_bad_input([&] { TokenFile reader(file, 256); }, {"vocab.bin", "vocab_size 50000", "vocab_size 256"});
  EXPECT_NO_THROW(TokenFile(file, 50000));
}

TEST_F(TokenFileTest, RejectsStoredIdsOutsideTheFileVocabulary) {
  const std::string file = path("ids.bin");
  write_token_file(file, {1, 2, 3, 4}, 300);
  std::vector<uint8_t> bytes = read_bytes(file);
  bytes[64 + 2 * 2] = 0x2c;  // token 2 becomes 0x012c = 300
  bytes[64 + 2 * 2 + 1] = 0x01;
  write_bytes(file, bytes);
  TokenFile reader(file, 300);
  EXPECT_EQ(reader.token(1), 2);
  expect_bad_input([&] { reader.token(2); }, {"ids.bin", "300", "position 2"});
  std::vector<int32_t> span(4);
  expect_bad_input([&] { reader.copy_span(0, 4, span.data()); }, {"ids.bin", "position 2"});
}

TEST_F(TokenFileTest, MissingFileAndMoves) {
  expect_bad_input([&] { TokenFile reader(path("absent.bin"), 256); }, {"absent.bin", "cannot open"});
  const std::string file = path("move.bin");
  write_token_file(file, {10, 20, 30}, 256);
  TokenFile first(file, 256);
  TokenFile second(std::move(first));
  EXPECT_FALSE(first.is_open());
  EXPECT_EQ(second.token(2), 30);
  TokenFile third;
  third = std::move(second);
  EXPECT_EQ(third.span(0, 3), (std::vector<int32_t>{10, 20, 30}));
}
