// switchyard prepare-data: text files -> byte-level token files (src/train/token_file.h).
//
// Tokens are bytes (vocabulary 256), so any file works and nothing is lost. Inputs are files or
// directories; directories are searched recursively, skipping hidden entries (names starting with
// '.') and not following symlinked directories, and their files are sorted by path so the output
// does not depend on directory order. Documents are joined with a newline between them (one is
// added only where a document does not already end with one).
// Validation split: the last --val-fraction of EACH file goes to the validation file, the rest to
// the training file, so both splits sample every document (a split of the whole stream would put
// only the last files, in sorted order, into validation).
// Files are streamed in 1 MiB chunks: memory use does not grow with the input.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/error.h"
#include "src/train/token_file.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kByteVocabulary = 256;
constexpr size_t kChunkBytes = size_t(1) << 20;

bool is_hidden(const fs::path& path) {
  const std::string name = path.filename().string();
  return name.size() > 1 && name[0] == '.' && name != "..";
}

bool starts_with_token_magic(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  char head[sizeof(kTokenFileMagic)] = {0};
  file.read(head, sizeof(head));
  return file.gcount() == std::streamsize(sizeof(head)) && std::memcmp(head, kTokenFileMagic, sizeof(head)) == 0;
}

// Files named by `inputs`, in command-line order, each directory's files sorted; no file twice.
// Token files (earlier outputs lying in an input directory) and the outputs are left out.
std::vector<fs::path> collect_input_files(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) {
  std::vector<fs::path> files;
  std::set<fs::path> seen;
  auto is_output = [&](const fs::path& candidate) {
    std::error_code status;
    for (const std::string& output : outputs)
      if (fs::exists(output, status) && fs::equivalent(candidate, output, status)) return true;
    return false;
  };
  auto add = [&](const fs::path& file) {
    std::error_code status;
    fs::path canonical = fs::weakly_canonical(file, status);
    if (status) canonical = file;
    if (!seen.insert(canonical).second || is_output(file)) return;
    if (starts_with_token_magic(file)) {
      std::cout << "prepare-data: skipping " << file.string() << " (already a token file)\n";
      return;
    }
    files.push_back(file);
  };
  for (const std::string& input : inputs) {
    std::error_code status;
    fs::file_status info = fs::status(input, status);
    if (status || !fs::exists(info)) SY_BAD_INPUT("prepare-data: input '", input, "' does not exist");
    if (fs::is_regular_file(info)) {
      add(input);
      continue;
    }
    if (!fs::is_directory(info)) SY_BAD_INPUT("prepare-data: input '", input, "' is neither a file nor a directory");
    std::vector<fs::path> found;
    fs::recursive_directory_iterator walker(input, status), end;
    if (status) SY_BAD_INPUT("prepare-data: cannot read directory '", input, "': ", status.message());
    for (; walker != end; walker.increment(status)) {
      if (status) SY_BAD_INPUT("prepare-data: cannot read inside '", input, "': ", status.message());
      if (is_hidden(walker->path())) {
        if (walker->is_directory(status)) walker.disable_recursion_pending();
        continue;
      }
      if (walker->is_regular_file(status)) found.push_back(walker->path());
    }
    if (status) SY_BAD_INPUT("prepare-data: cannot read inside '", input, "': ", status.message());
    std::sort(found.begin(), found.end());
    for (const fs::path& file : found) add(file);
  }
  return files;
}

// One output stream: a token writer plus the last byte written, for the newline separator.
struct Split {
  std::unique_ptr<TokenFileWriter> writer;
  bool empty = true;
  char last_byte = '\n';

  // Appends one document piece, first adding a newline if the previous piece did not end in one.
  void begin_document() {
    if (!empty && last_byte != '\n') {
      const uint8_t newline = '\n';
      writer->append_bytes(&newline, 1);
    }
  }
  void append(const char* bytes, size_t count) {
    if (count == 0) return;
    writer->append_bytes(reinterpret_cast<const uint8_t*>(bytes), count);
    empty = false;
    last_byte = bytes[count - 1];
  }
};

// Copies `count` bytes of `file` into `split` as one document.
void copy_piece(std::ifstream& file, const fs::path& path, uint64_t count, Split& split, std::vector<char>& chunk) {
  if (count == 0) return;
  split.begin_document();
  while (count > 0) {
    size_t want = size_t(std::min<uint64_t>(count, chunk.size()));
    file.read(chunk.data(), std::streamsize(want));
    if (size_t(file.gcount()) != want)
      SY_BAD_INPUT("prepare-data: '", path.string(), "' ended early (changed while being read?)");
    split.append(chunk.data(), want);
    count -= want;
  }
}

void create_parent_directory(const std::string& output) {
  fs::path parent = fs::path(output).parent_path();
  if (parent.empty()) return;
  std::error_code status;
  fs::create_directories(parent, status);
  if (status) SY_BAD_INPUT("prepare-data: cannot create directory '", parent.string(), "' for '", output, "': ",
                           status.message());
}

}  // namespace

int command_prepare_data(int argc, char** argv) {
  ArgParser parser("switchyard prepare-data",
                   "Turn text files into byte-level token files (vocabulary 256) for 'switchyard train'. "
                   "Directories are searched recursively (hidden entries skipped) and their files taken in "
                   "sorted order; documents are joined with a newline. With --val-output, the last "
                   "--val-fraction of each file goes to the validation file.");
  parser.add_option("output", "OUT.bin", "training token file to write (required)");
  parser.add_option("val-output", "VAL.bin", "validation token file to write (optional)");
  parser.add_option("val-fraction", "F", "share of each file that goes to validation, in (0, 1)", "0.05");
  parser.add_positional("inputs...", "text files or directories");
  parser.add_epilog(
      "Example:\n  switchyard prepare-data --output data/tiny/train.bin --val-output data/tiny/val.bin docs/ src/");
  if (!parser.parse(argc, argv)) return kExitOk;

  if (!parser.has("output")) SY_BAD_INPUT("prepare-data: --output is required (see 'switchyard prepare-data --help')");
  const std::string train_output = parser.get("output");
  const bool with_validation = parser.has("val-output");
  const std::string val_output = parser.get("val-output");
  if (parser.has("val-fraction") && !with_validation)
    SY_BAD_INPUT("prepare-data: --val-fraction needs --val-output (where the validation tokens go)");
  const double val_fraction = with_validation ? parser.get_double("val-fraction") : 0.0;
  if (with_validation && !(val_fraction > 0.0 && val_fraction < 1.0))
    SY_BAD_INPUT("prepare-data: --val-fraction ", parser.get("val-fraction"), " is outside (0, 1)");
  if (with_validation && fs::path(val_output).lexically_normal() == fs::path(train_output).lexically_normal())
    SY_BAD_INPUT("prepare-data: --output and --val-output are the same file '", train_output, "'");

  std::vector<std::string> outputs = {train_output};
  if (with_validation) outputs.push_back(val_output);
  const std::vector<fs::path> files = collect_input_files(parser.get_all("inputs"), outputs);
  if (files.empty()) SY_BAD_INPUT("prepare-data: no input files found (hidden files and token files are skipped)");
  uint64_t total_bytes = 0;
  std::vector<uint64_t> sizes;
  for (const fs::path& file : files) {
    std::error_code status;
    uint64_t size = fs::file_size(file, status);
    if (status) SY_BAD_INPUT("prepare-data: cannot read '", file.string(), "': ", status.message());
    sizes.push_back(size);
    total_bytes += size;
  }
  if (total_bytes == 0) SY_BAD_INPUT("prepare-data: the ", files.size(), " input file(s) are all empty");

  Split train, validation;
  create_parent_directory(train_output);
  train.writer = std::make_unique<TokenFileWriter>(train_output, kByteVocabulary);
  if (with_validation) {
    create_parent_directory(val_output);
    validation.writer = std::make_unique<TokenFileWriter>(val_output, kByteVocabulary);
  }
  std::vector<char> chunk(kChunkBytes);
  for (size_t index = 0; index < files.size(); ++index) {
    std::ifstream file(files[index], std::ios::binary);
    if (!file) SY_BAD_INPUT("prepare-data: cannot open '", files[index].string(), "': ", std::strerror(errno));
    const uint64_t val_bytes = with_validation ? uint64_t(std::floor(double(sizes[index]) * val_fraction)) : 0;
    copy_piece(file, files[index], sizes[index] - val_bytes, train, chunk);
    if (with_validation) copy_piece(file, files[index], val_bytes, validation, chunk);
  }
  if (train.writer->token_count() == 0)
    SY_BAD_INPUT("prepare-data: nothing left for training after the validation split");
  if (with_validation && validation.writer->token_count() == 0)
    SY_BAD_INPUT("prepare-data: the validation split is empty (inputs too small for --val-fraction ", val_fraction,
                 "); use a larger fraction or more data");
  const uint64_t train_tokens = train.writer->token_count();
  const uint64_t val_tokens = with_validation ? validation.writer->token_count() : 0;
  train.writer->commit();
  if (with_validation) validation.writer->commit();

  std::cout << "prepare-data: " << files.size() << " file(s), " << total_bytes << " bytes, vocabulary "
            << kByteVocabulary << " (bytes)\n"
            << "  train: " << train_output << ": " << train_tokens << " tokens\n";
  if (with_validation)
    std::cout << "  val:   " << val_output << ": " << val_tokens << " tokens (last " << val_fraction * 100.0
              << "% of each file)\n";
  return kExitOk;
}

}  // namespace switchyard
