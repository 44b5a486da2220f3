// Config parsing: valid files, every error class (with key, file and line in the message),
// --set overrides, derived defaults, and the emit -> parse round trip on random configs.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <sstream>
#include <utility>

#include "src/core/error.h"
#include "src/train/config.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;

namespace {

// A complete small config; line numbers below refer to this text (line 1 = "model:").
const char* kBaseYaml =
    "model:\n"                 // 1
    "  d_model: 64\n"          // 2
    "  n_layers: 2\n"          // 3
    "  n_heads: 4\n"           // 4
    "  seq_len: 32\n"          // 5
    "moe:\n"                   // 6
    "  num_experts: 8\n"       // 7
    "  top_k: 2\n"             // 8
    "parallel:\n"              // 9
    "  ep_size: 2\n"           // 10
    "training:\n"              // 11
    "  steps: 100\n"           // 12
    "data:\n"                  // 13
    "  path: data/train.bin\n";  // 14

// Replaces the line starting with `prefix` (after indentation) in kBaseYaml by `replacement`.
std::string base_with(const std::string& prefix, const std::string& replacement) {
  std::istringstream lines(kBaseYaml);
  std::string line, result;
  bool replaced = false;
  while (std::getline(lines, line)) {
    size_t first = line.find_first_not_of(' ');
    if (!replaced && line.compare(first, prefix.size(), prefix) == 0) {
      line = replacement;
      replaced = true;
    }
    result += line + "\n";
  }
  EXPECT_TRUE(replaced) << prefix;
  return result;
}


std::filesystem::path source_root() {
  // tests/train/test_config.cpp -> the repository root (CMake compiles with absolute paths).
  return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path();
}

}  // namespace

TEST(Config, ParsesBaseAndFillsDerivedDefaults) {
  Config config = parse_config_string(kBaseYaml, "configs/base.yaml");
  EXPECT_EQ(config.model.d_model, 64);
  EXPECT_EQ(config.model.n_layers, 2);
  EXPECT_EQ(config.model.seq_len, 32);
  EXPECT_EQ(config.moe.num_experts, 8);
  EXPECT_EQ(config.parallel.ep_size, 2);
  EXPECT_EQ(config.training.steps, 100);
  EXPECT_EQ(config.data.path, "data/train.bin");
  // Derived defaults.
  EXPECT_EQ(config.model.d_ff, 4 * 64);
  EXPECT_EQ(config.moe.expert_d_ff, 4 * 64);
  EXPECT_EQ(config.moe.k_min, 2);
  EXPECT_TRUE(config.moe.renormalize_gates);  // top_k 2 > 1
  EXPECT_EQ(config.optimizer.min_lr, 3e-5);  // lr 3e-4 / 10, rounded to a clean decimal
  EXPECT_EQ(config.logging.run_dir, "runs/base");
  EXPECT_EQ(config.checkpoint.dir, "runs/base/checkpoints");
  // Plain defaults.
  EXPECT_EQ(config.model.vocab_size, 256);
  EXPECT_EQ(config.model.compute_dtype, DType::bf16);
  EXPECT_EQ(config.moe.segment_alignment, 128);
  EXPECT_DOUBLE_EQ(config.moe.aux_loss_weight, 1e-2);
  EXPECT_DOUBLE_EQ(config.moe.z_loss_weight, 1e-3);
  EXPECT_DOUBLE_EQ(config.parallel.collective_timeout_s, 600.0);
  EXPECT_EQ(config.training.device, DeviceChoice::automatic);
  EXPECT_EQ(config.checkpoint.resume, "none");
}

TEST(Config, DerivedDefaultsFollowGivenValues) {
  std::string text = base_with("top_k:", "  top_k: 1") + "optimizer:\n  lr: 0.002\nlogging:\n  run_dir: /tmp/r7\n";
  Config config = parse_config_string(text, "x.yaml");
  EXPECT_EQ(config.moe.k_min, 1);
  EXPECT_FALSE(config.moe.renormalize_gates);  // top-1 keeps the raw gate
  EXPECT_DOUBLE_EQ(config.optimizer.min_lr, 0.0002);
  EXPECT_EQ(config.checkpoint.dir, "/tmp/r7/checkpoints");
  Config with_d_ff = parse_config_string(base_with("d_model:", "  d_model: 48\n  d_ff: 100"), "x.yaml");
  EXPECT_EQ(with_d_ff.model.d_ff, 100);
  EXPECT_EQ(with_d_ff.moe.expert_d_ff, 100);
}

TEST(Config, TinyCpuConfigLoads) {
  const std::filesystem::path path = source_root() / "configs" / "tiny-cpu.yaml";
  Config config = load_config(path.string());
  EXPECT_EQ(config.training.device, DeviceChoice::cpu);
  EXPECT_EQ(config.model.compute_dtype, DType::f32);
  EXPECT_GE(config.model.n_layers, config.model.moe_every);
  EXPECT_EQ(config.moe.num_experts % config.parallel.ep_size, 0);
  // Each of its keys is written out (the file comments them all), so nothing is derived; except
  // checkpoint.dir, which shipped configs leave to follow logging.run_dir: set, every run moved with
  // --set logging.run_dir would save into one checkpoint folder.
  std::ifstream file(path);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  for (const ConfigField& field : config_fields()) {
    if (field.path() == "checkpoint.dir") continue;
    EXPECT_NE(text.find("  " + field.key + ":"), std::string::npos) << field.path() << " missing in tiny-cpu.yaml";
  }
  EXPECT_EQ(text.find("\n  dir:"), std::string::npos) << "tiny-cpu.yaml sets checkpoint.dir";
  EXPECT_EQ(config.checkpoint.dir, (std::filesystem::path(config.logging.run_dir) / "checkpoints").string());
  const Config moved = load_config(path.string(), {"logging.run_dir=runs/elsewhere"});
  EXPECT_EQ(moved.checkpoint.dir, (std::filesystem::path("runs/elsewhere") / "checkpoints").string())
      << "checkpoint.dir follows logging.run_dir";
}

// Every config the project ships loads and validates (unknown keys, ranges, cross-key rules), and
// configs/README.md lists it.
TEST(Config, EveryShippedConfigLoadsAndIsListed) {
  std::ifstream readme(source_root() / "configs" / "README.md");
  ASSERT_TRUE(readme) << "configs/README.md not found next to the sources";
  const std::string text((std::istreambuf_iterator<char>(readme)), std::istreambuf_iterator<char>());
  int loaded = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(source_root() / "configs")) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    EXPECT_NO_THROW(load_config(entry.path().string()));
    const std::string name = entry.path().filename().string();
    const bool in_compare = entry.path().parent_path().filename() == "compare";
    EXPECT_NE(text.find(in_compare ? "compare/*.yaml" : "`" + name + "`"), std::string::npos)
        << name << " is not in configs/README.md";
    ++loaded;
  }
  EXPECT_GE(loaded, 10) << "the shipped configs were not found";
}

TEST(Config, ReadmeDocumentsEveryKey) {
  std::ifstream readme(source_root() / "configs" / "README.md");
  ASSERT_TRUE(readme) << "configs/README.md not found next to the sources";
  std::string text((std::istreambuf_iterator<char>(readme)), std::istreambuf_iterator<char>());
  for (const ConfigField& field : config_fields())
    EXPECT_NE(text.find("`" + field.path() + "`"), std::string::npos) << field.path() << " not in configs/README.md";
}

TEST(Config, UnknownKeyNamesLineAndSuggests) {
  expect_bad_input([] { parse_config_string(base_with("n_heads:", "  n_haeds: 4"), "cfg/a.yaml"); },
                   {"cfg/a.yaml:4", "unknown key model.n_haeds", "did you mean model.n_heads?"});
  // The right key in the wrong section points to its section.
  expect_bad_input([] { parse_config_string(base_with("seq_len:", "  seq_len: 32\n  top_k: 2"), "cfg/a.yaml"); },
                   {"cfg/a.yaml:6", "unknown key model.top_k", "did you mean moe.top_k?"});
  expect_bad_input([] { parse_config_string(std::string(kBaseYaml) + "optimiser:\n  lr: 0.1\n", "cfg/b.yaml"); },
                   {"cfg/b.yaml:15", "unknown section optimiser", "did you mean optimizer?"});
  expect_bad_input([] { parse_config_string(std::string(kBaseYaml) + "  zzzz_qqq: 1\n", "cfg/b.yaml"); },
                   {"cfg/b.yaml:15", "data.zzzz_qqq"});
}

TEST(Config, WrongTypesNameKeyAndLine) {
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: two"), "w.yaml"); },
                   {"w.yaml:8", "moe.top_k", "not an integer"});
  expect_bad_input([] { parse_config_string(base_with("d_model:", "  d_model: 64.5"), "w.yaml"); },
                   {"w.yaml:2", "model.d_model", "not an integer"});
  expect_bad_input([] { parse_config_string(base_with("d_model:", "  d_model: \"64\""), "w.yaml"); },
                   {"w.yaml:2", "model.d_model", "not an integer"});
  expect_bad_input([] { parse_config_string(base_with("seq_len:", "  seq_len: [1, 2]"), "w.yaml"); },
                   {"w.yaml:5", "model.seq_len", "a list"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  deterministic: maybe"), "w.yaml"); },
                   {"w.yaml:11", "parallel.deterministic", "not a boolean"});
  expect_bad_input([] { parse_config_string(std::string(kBaseYaml) + "optimizer:\n  lr: fast\n", "w.yaml"); },
                   {"w.yaml:16", "optimizer.lr", "not a number"});
  expect_bad_input([] { parse_config_string(base_with("seq_len:", "  seq_len: 32\n  norm: batchnorm"), "w.yaml"); },
                   {"w.yaml:6", "model.norm", "one of: layernorm, rmsnorm"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ranks_per_node: -1"), "w.yaml"); },
                   {"w.yaml:11", "parallel.ranks_per_node"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 4\n  ranks_per_node: 3"), "w.yaml"); },
                   {"parallel.ranks_per_node = 3", "parallel.ep_size = 4", "divide"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ep_dispatch: bf16"), "w.yaml"); },
                   {"w.yaml:11", "parallel.ep_dispatch", "one of: activation, fp8"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ep_overlap: dual"), "w.yaml"); },
                   {"w.yaml:11", "parallel.ep_overlap", "one of: none, two_part"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ep_sm_budget: -1"), "w.yaml"); },
                   {"w.yaml:11", "parallel.ep_sm_budget", "out of range"});
  expect_bad_input([] { parse_config_string(base_with("seq_len:", "  seq_len:"), "w.yaml"); },
                   {"w.yaml:5", "model.seq_len", "has no value"});
  expect_bad_input([] { parse_config_string("model: 3\n", "w.yaml"); }, {"w.yaml:1", "section model", "mapping"});
  expect_bad_input([] { parse_config_string("- 1\n- 2\n", "w.yaml"); }, {"w.yaml:1", "top level"});
  expect_bad_input([] { parse_config_string("", "w.yaml"); }, {"w.yaml", "empty"});
}

TEST(Config, OutOfRangeMatchesTheDocumentedForm) {
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 9"), "configs/x.yaml"); },
                   {"configs/x.yaml:8: moe.top_k = 9 is out of range [1, 8]"});
  expect_bad_input([] { parse_config_string(base_with("n_layers:", "  n_layers: 0"), "configs/x.yaml"); },
                   {"configs/x.yaml:3: model.n_layers = 0 is out of range [1, 1024]"});
  expect_bad_input(
      [] { parse_config_string(std::string(kBaseYaml) + "optimizer:\n  beta2: 1.0\n", "configs/x.yaml"); },
      {"configs/x.yaml:16: optimizer.beta2 = 1.0 is out of range [0, 1)"});
  expect_bad_input([] { parse_config_string(base_with("steps:", "  steps: 99999999999999999999999"), "c.yaml"); },
                   {"c.yaml:12", "training.steps", "out of range"});
}

TEST(Config, MissingRequiredKey) {
  expect_bad_input([] { parse_config_string(base_with("n_heads:", "  # n_heads removed"), "m.yaml"); },
                   {"m.yaml:1", "model.n_heads is required"});
  expect_bad_input([] { parse_config_string(base_with("path:", "  val_path: v.bin"), "m.yaml"); },
                   {"m.yaml:13", "data.path is required"});
}

TEST(Config, CrossFieldChecks) {
  expect_bad_input([] { parse_config_string(base_with("num_experts:", "  num_experts: 5"), "e.yaml"); },
                   {"e.yaml:10", "parallel.ep_size = 2", "moe.num_experts = 5"});
  expect_bad_input([] { parse_config_string(base_with("n_heads:", "  n_heads: 5"), "e.yaml"); },
                   {"e.yaml:4", "model.n_heads = 5", "model.d_model = 64"});
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 2\n  k_min: 3"), "e.yaml"); },
                   {"e.yaml:9", "moe.k_min = 3", "moe.top_k = 2"});
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 2\n  k_min: 1"), "e.yaml"); },
                   {"e.yaml:9", "moe.k_min = 1", "moe.complexity = none"});
  EXPECT_NO_THROW(parse_config_string(base_with("top_k:", "  top_k: 2\n  k_min: 1\n  complexity: entropy"), "e.yaml"));
  expect_bad_input([] { parse_config_string(base_with("n_layers:", "  n_layers: 2\n  moe_every: 3"), "e.yaml"); },
                   {"e.yaml:4", "model.moe_every = 3", "model.n_layers = 2"});
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 2\n  segment_alignment: 96"), "e.yaml"); },
                   {"e.yaml:9", "moe.segment_alignment = 96", "power of two"});
  expect_bad_input([] { parse_config_string(std::string(kBaseYaml) + "optimizer:\n  lr: 0.001\n  min_lr: 0.01\n", "e.yaml"); },
                   {"e.yaml:17", "optimizer.min_lr"});
  expect_bad_input([] { parse_config_string(base_with("steps:", "  steps: 100\n  eval_every: 10"), "e.yaml"); },
                   {"e.yaml:13", "training.eval_every", "data.val_path"});
  expect_bad_input(
      [] {
        parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ep_transport: nvlink\n  ep_dispatch: fp8"), "e.yaml");
      },
      {"e.yaml:12", "parallel.ep_dispatch = fp8", "parallel.ep_transport"});
  const Config fp8 = parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ep_dispatch: fp8"), "e.yaml");
  EXPECT_EQ(fp8.parallel.ep_dispatch, EpDispatch::fp8);
  EXPECT_EQ(fp8.parallel.ep_layer_options().dispatch, EpDispatch::fp8);
  const Config overlap =
      parse_config_string(base_with("ep_size:", "  ep_size: 2\n  ep_overlap: two_part\n  ep_sm_budget: 24"), "e.yaml");
  EXPECT_EQ(overlap.parallel.ep_layer_options().overlap, EpOverlap::two_part);
  EXPECT_EQ(overlap.parallel.ep_layer_options().sm_budget, 24);
  EXPECT_EQ(fp8.parallel.ep_layer_options().overlap, EpOverlap::none);  // the default
  EXPECT_EQ(fp8.parallel.ep_layer_options().sm_budget, 0);
}

// Hot-expert replication (parallel.max_replicas_per_rank) reaches the layer options; the
// combinations the layer does not support are bad input naming both keys.
TEST(Config, ReplicationKeyAndItsUnsupportedCombinations) {
  const Config on = parse_config_string(base_with("ep_size:", "  ep_size: 2\n  max_replicas_per_rank: 2"), "r.yaml");
  EXPECT_EQ(on.parallel.max_replicas_per_rank, 2);
  EXPECT_EQ(on.parallel.ep_layer_options().max_replicas_per_rank, 2);
  EXPECT_EQ(parse_config_string(kBaseYaml, "r.yaml").parallel.ep_layer_options().max_replicas_per_rank, 0);
  const Config minimum =
      parse_config_string(base_with("ep_size:", "  ep_size: 2\n  max_replicas_per_rank: 1\n  replica_min_rows: 3000"),
                          "r.yaml");
  EXPECT_EQ(minimum.parallel.ep_layer_options().replica_min_rows, 3000);
  EXPECT_EQ(on.parallel.ep_layer_options().replica_min_rows, 0);
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  replica_min_rows: -5"), "r.yaml"); },
                   {"r.yaml:11", "parallel.replica_min_rows", "out of range"});
  expect_bad_input([] { parse_config_string(base_with("ep_size:", "  ep_size: 2\n  max_replicas_per_rank: -1"), "r.yaml"); },
                   {"r.yaml:11", "parallel.max_replicas_per_rank", "out of range"});
  expect_bad_input(
      [] {
        parse_config_string(base_with("ep_size:", "  ep_size: 2\n  max_replicas_per_rank: 1\n  ep_overlap: two_part"),
                            "r.yaml");
      },
      {"r.yaml:11", "parallel.max_replicas_per_rank = 1", "parallel.ep_overlap = none"});
  expect_bad_input(
      [] {
        parse_config_string(base_with("ep_size:", "  ep_size: 2\n  max_replicas_per_rank: 1\n  a2a_chunks: 2"), "r.yaml");
      },
      {"r.yaml:11", "parallel.max_replicas_per_rank = 1", "parallel.a2a_chunks = 1"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "r.yaml", {"parallel.max_replicas_per_rank=1",
                                                                  "parallel.ranks_per_node=1"}); },
                   {"--set parallel.max_replicas_per_rank=1", "parallel.ranks_per_node = 1", "hierarchical"});
  // Nodes the launcher made (known only at start-up) are checked against the world.
  expect_bad_input([&] { validate_against_world(on, 4, /*ranks_per_node=*/1); },
                   {"parallel.max_replicas_per_rank = 2", "one-level exchange", "parallel.ranks_per_node"});
  EXPECT_NO_THROW(validate_against_world(on, 4, /*ranks_per_node=*/2));
}

TEST(Config, SharedExpertsAndDenseFirstBlocks) {
  const Config base = parse_config_string(kBaseYaml, "s.yaml");
  EXPECT_EQ(base.model.dense_first_blocks, 0);
  EXPECT_EQ(base.moe.num_shared_experts, 0);
  EXPECT_EQ(base.moe.shared_expert_d_ff, base.moe.expert_d_ff);  // derived default
  const Config shared =
      parse_config_string(base_with("top_k:", "  top_k: 2\n  expert_d_ff: 48\n  num_shared_experts: 2"), "s.yaml");
  EXPECT_EQ(shared.moe.num_shared_experts, 2);
  EXPECT_EQ(shared.moe.shared_expert_d_ff, 48);
  EXPECT_EQ(shared.moe.shared_ffn_width(), 96);
  const Config wide = parse_config_string(
      base_with("top_k:", "  top_k: 2\n  num_shared_experts: 1\n  shared_expert_d_ff: 512"), "s.yaml");
  EXPECT_EQ(wide.moe.shared_expert_d_ff, 512);
  const Config dense_first = parse_config_string(
      base_with("n_layers:", "  n_layers: 4\n  dense_first_blocks: 3"), "s.yaml");
  EXPECT_EQ(dense_first.model.moe_block_count(), 1);
  EXPECT_FALSE(dense_first.model.block_is_moe(2));
  EXPECT_TRUE(dense_first.model.block_is_moe(3));
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 2\n  num_shared_experts: -1"), "s.yaml"); },
                   {"s.yaml:9", "moe.num_shared_experts", "[0, 64]"});
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 2\n  num_shared_experts: 65"), "s.yaml"); },
                   {"s.yaml:9", "moe.num_shared_experts"});
  expect_bad_input([] { parse_config_string(base_with("top_k:", "  top_k: 2\n  shared_expert_d_ff: 0"), "s.yaml"); },
                   {"s.yaml:9", "moe.shared_expert_d_ff"});
  expect_bad_input([] { parse_config_string(base_with("n_layers:", "  n_layers: 2\n  dense_first_blocks: -1"), "s.yaml"); },
                   {"s.yaml:4", "model.dense_first_blocks"});
  // 2 blocks, every block MoE: dense_first_blocks 2 leaves none (1 is the most allowed).
  expect_bad_input([] { parse_config_string(base_with("n_layers:", "  n_layers: 2\n  dense_first_blocks: 2"), "s.yaml"); },
                   {"s.yaml:4", "model.dense_first_blocks = 2", "leaves no MoE block", "at most that"});
  // moe_every 2 of 4 blocks: blocks 1 and 3 are MoE; 3 dense first blocks keep block 3.
  parse_config_string(base_with("n_layers:", "  n_layers: 4\n  moe_every: 2\n  dense_first_blocks: 3"), "s.yaml");
  expect_bad_input(
      [] { parse_config_string(base_with("n_layers:", "  n_layers: 4\n  moe_every: 2\n  dense_first_blocks: 4"), "s.yaml"); },
      {"model.dense_first_blocks = 4", "the last MoE block is 3"});
}

TEST(Config, YamlSyntaxErrorNamesFileAndLine) {
  std::string text = base_with("num_experts:", "  num_experts: [8");
  expect_bad_input([&] { parse_config_string(text, "s.yaml"); }, {"s.yaml:", "YAML syntax error"});
  expect_bad_input([] { parse_config_string("model:\n  d_model: 64\n   n_layers: 2\n", "s.yaml"); },
                   {"s.yaml:3:", "YAML syntax error"});
}

TEST(Config, DuplicateKeysAreRejected) {
  expect_bad_input([] { parse_config_string(base_with("n_layers:", "  n_layers: 2\n  n_layers: 3"), "d.yaml"); },
                   {"d.yaml:4", "model.n_layers is given twice", "d.yaml:3"});
}

TEST(Config, OverridesApplyInOrderAndNameTheArgument) {
  Config config = parse_config_string(kBaseYaml, "o.yaml",
                                      {"moe.top_k=1", "moe.top_k=4", "data.val_path=v.bin", "training.eval_every=5",
                                       "model.norm=layernorm", "optimizer.lr=1e-3"});
  EXPECT_EQ(config.moe.top_k, 4);
  EXPECT_EQ(config.moe.k_min, 4);
  EXPECT_EQ(config.data.val_path, "v.bin");
  EXPECT_EQ(config.training.eval_every, 5);
  EXPECT_EQ(config.model.norm, NormKind::layernorm);
  EXPECT_DOUBLE_EQ(config.optimizer.lr, 1e-3);
  // An override may supply a required key the file lacks.
  Config filled = parse_config_string(base_with("path:", "  format: tokens"), "o.yaml", {"data.path=/d/t.bin"});
  EXPECT_EQ(filled.data.path, "/d/t.bin");

  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"moe.top_k=9"}); },
                   {"--set moe.top_k=9: moe.top_k = 9 is out of range [1, 8]"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"moe.topk=2"}); },
                   {"--set moe.topk=2", "unknown key moe.topk", "did you mean moe.top_k?"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"moe.top_k"}); }, {"--set moe.top_k", "section.key=value"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"top_k=2"}); }, {"--set top_k=2", "section.key"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"moe.top_k=[1, 2]"}); },
                   {"--set moe.top_k=[1, 2]", "single scalar"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"parallel.ep_size=3"}); },
                   {"--set parallel.ep_size=3", "moe.num_experts = 8"});
  expect_bad_input([] { parse_config_string(kBaseYaml, "o.yaml", {"data.path="}); }, {"--set data.path=", "data.path"});
}

TEST(Config, RecomputeTakesItsFourModesAndNamesTheKeyOtherwise) {
  EXPECT_EQ(parse_config_string(kBaseYaml, "r.yaml").training.recompute, RecomputeMode::none);
  for (const auto& [text, mode] : {std::pair<const char*, RecomputeMode>{"none", RecomputeMode::none},
                                   {"moe", RecomputeMode::moe},
                                   {"attention", RecomputeMode::attention},
                                   {"all", RecomputeMode::all}}) {
    const Config config = parse_config_string(kBaseYaml, "r.yaml", {std::string("training.recompute=") + text});
    EXPECT_EQ(config.training.recompute, mode) << text;
    EXPECT_EQ(recompute_mode_name(mode), std::string(text));
    EXPECT_EQ(parse_config_string(config_to_yaml(config), "round trip").training.recompute, mode) << text;
  }
  const std::string choices = "one of: none, moe, attention, all";
  expect_bad_input([] { parse_config_string(kBaseYaml, "r.yaml", {"training.recompute=full"}); },
                   {"--set training.recompute=full", "training.recompute", choices});
  expect_bad_input([] { parse_config_string(base_with("steps:", "  steps: 100\n  recompute: MoE"), "r.yaml"); },
                   {"r.yaml:13", "training.recompute", choices});
  expect_bad_input([] { parse_config_string(base_with("steps:", "  steps: 100\n  recompute: true"), "r.yaml"); },
                   {"training.recompute", choices});
}

TEST(Config, LoadConfigNamesTheFile) {
  const std::filesystem::path directory =
      std::filesystem::temp_directory_path() / ("sy_config_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  const std::string path = (directory / "bad.yaml").string();
  {
    std::ofstream file(path);
    file << base_with("top_k:", "  top_k: 0");
  }
  expect_bad_input([&] { load_config(path); }, {path + ":8: moe.top_k = 0 is out of range [1, 8]"});
  expect_bad_input([&] { load_config((directory / "absent.yaml").string()); }, {"absent.yaml", "cannot read"});
  std::filesystem::remove_all(directory);
}

TEST(Config, ValidateAgainstWorld) {
  Config config = parse_config_string(kBaseYaml, "w.yaml");  // ep_size 2
  EXPECT_NO_THROW(validate_against_world(config, 2));
  EXPECT_NO_THROW(validate_against_world(config, 8));
  expect_bad_input([&] { validate_against_world(config, 3); }, {"parallel.ep_size = 2", "world size 3"});
  expect_bad_input([&] { validate_against_world(config, 1); }, {"parallel.ep_size = 2", "world size 1"});
}

TEST(Config, ValidateAgainstWorldReturnsTheLayout) {
  const ParallelLayout layout = validate_against_world(parse_config_string(kBaseYaml, "w.yaml"), 4);  // 8 experts
  EXPECT_EQ(layout.world_size(), 4);
  EXPECT_EQ(layout.ep_size(), 2);
  EXPECT_EQ(layout.expert_dp_size(), 2);
  EXPECT_EQ(layout.experts_per_rank(), 4);
  EXPECT_EQ(layout.placement(3).first_expert, 4);
  Config config = parse_config_string(kBaseYaml, "w.yaml", {"parallel.ep_size=4"});
  expect_bad_input([&] { validate_against_world(config, 6); },
                   {"w.yaml: parallel.ep_size = 4", "world size 6", "moe.num_experts = 8"});
}

// CUDA routing takes at most kCudaMaxExperts experts per layer: a config that may run on CUDA
// (training.device auto or cuda in a CUDA build) is refused when read, not at its first forward.
// cuda_backend_built = true checks a CUDA build's limits in any build.
TEST(Config, CudaExpertLimitWhenTheDeviceCanBeCuda) {
  const std::string limit = std::to_string(kCudaMaxExperts), over = std::to_string(2 * kCudaMaxExperts);
  const std::string text = base_with("num_experts:", "  num_experts: " + over);  // line 7
  expect_bad_input([&] { parse_config_string(text, "c.yaml", {}, /*cuda_backend_built=*/true); },
                   {"c.yaml:7: moe.num_experts = " + over + " exceeds the CUDA backend's limit of " + limit +
                    " experts per layer; set training.device: cpu or use fewer experts"});
  expect_bad_input([&] { parse_config_string(text, "c.yaml", {"training.device=cuda"}, true); },
                   {"c.yaml:7", "moe.num_experts = " + over, "limit of " + limit});
  expect_bad_input([&] { parse_config_string(kBaseYaml, "c.yaml", {"moe.num_experts=" + over}, true); },
                   {"--set moe.num_experts=" + over + ": moe.num_experts = " + over, "limit of " + limit});
  EXPECT_NO_THROW(parse_config_string(base_with("num_experts:", "  num_experts: " + limit), "c.yaml", {}, true));
  // On the CPU, or in a build without CUDA, the CPU limits (the key's range) apply.
  EXPECT_EQ(parse_config_string(text, "c.yaml", {"training.device=cpu"}, true).moe.num_experts, 2 * kCudaMaxExperts);
  EXPECT_EQ(parse_config_string(text, "c.yaml", {}, /*cuda_backend_built=*/false).moe.num_experts,
            2 * kCudaMaxExperts);
  expect_bad_input([] { parse_config_string(kBaseYaml, "c.yaml", {"moe.num_experts=2048"}, false); },
                   {"moe.num_experts = 2048 is out of range [1, 1024]"});
}

// A config read back from a run or a checkpoint was trained already (perhaps on a CPU build with
// more experts than the CUDA router takes): reading it checks every rule but the backend limits.
TEST(Config, StoredConfigSkipsOnlyTheBackendLimits) {
  const std::string over = std::to_string(2 * kCudaMaxExperts);
  const std::string text = base_with("num_experts:", "  num_experts: " + over);
  EXPECT_EQ(parse_stored_config(text, "run/config.yaml").moe.num_experts, 2 * kCudaMaxExperts);
  expect_bad_input([] { parse_stored_config(base_with("num_experts:", "  num_experts: 2048"), "run/config.yaml"); },
                   {"run/config.yaml:7", "moe.num_experts = 2048 is out of range [1, 1024]"});
}

TEST(Config, BackendLimitsEntryPoint) {
  Config config = parse_config_string(kBaseYaml, "b.yaml", {"moe.num_experts=1024", "training.device=cpu"});
  const auto where = [](const std::string& path) { return "b.yaml (" + path + ")"; };
  EXPECT_NO_THROW(check_backend_limits(config, where, /*device_can_be_cuda=*/false));
  expect_bad_input([&] { check_backend_limits(config, where, /*device_can_be_cuda=*/true); },
                   {"b.yaml (moe.num_experts): moe.num_experts = 1024", "limit of " + std::to_string(kCudaMaxExperts)});

  EXPECT_FALSE(device_can_be_cuda(config, /*cuda_backend_built=*/true));  // training.device: cpu
  config.training.device = DeviceChoice::automatic;
  EXPECT_TRUE(device_can_be_cuda(config, true));
  EXPECT_FALSE(device_can_be_cuda(config, false));
  EXPECT_EQ(device_can_be_cuda(config), kCudaBackendBuilt);
  config.training.device = DeviceChoice::cuda;
  EXPECT_TRUE(device_can_be_cuda(config, true));
}

// top_k is limited alike on both backends: the key's range is the routing limit.
TEST(Config, TopKLimitIsTheRoutingLimit) {
  const std::string over = std::to_string(kMaxTopK + 1), range = "[1, " + std::to_string(kMaxTopK) + "]";
  for (bool cuda_backend_built : {false, true}) {
    expect_bad_input([&] { parse_config_string(kBaseYaml, "t.yaml", {"moe.top_k=" + over}, cuda_backend_built); },
                     {"moe.top_k = " + over + " is out of range " + range});
    expect_bad_input([&] { parse_config_string(kBaseYaml, "t.yaml", {"moe.k_min=" + over}, cuda_backend_built); },
                     {"moe.k_min = " + over + " is out of range " + range});
  }
  EXPECT_EQ(parse_config_string(kBaseYaml, "t.yaml", {"moe.top_k=" + std::to_string(kMaxTopK)}, true).moe.top_k,
            kMaxTopK);
}

TEST(Config, EmitContainsEveryKeyOnce) {
  Config config = parse_config_string(kBaseYaml, "e.yaml");
  std::string text = config_to_yaml(config);
  for (const ConfigField& field : config_fields()) {
    size_t position = text.find("\n  " + field.key + ": ");
    EXPECT_NE(position, std::string::npos) << field.path();
  }
  EXPECT_EQ(parse_config_string(text, "again.yaml"), config);
}

// Random configs through --set: every key gets a random value of its type and range (keys that
// take part in cross-field checks are drawn so that they pass). Emitting and parsing back must
// give an equal config and the same text.
TEST(Config, RoundTripOfRandomConfigs) {
  std::mt19937_64 generator(std::random_device{}());
  int round_trips = 0;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<std::string> overrides;
    for (const ConfigField& field : config_fields()) {
      if (generator() % 3 == 0 && !field.required) continue;  // leave some to their defaults
      std::string value;
      switch (field.type) {
        case ConfigValueType::integer: {
          int64_t span = std::min<int64_t>(field.integer_max - field.integer_min, 1000);
          value = std::to_string(field.integer_min + int64_t(generator() % uint64_t(span + 1)));
          break;
        }
        case ConfigValueType::real: {
          double top = std::min(field.real_max, field.real_min + 50.0);
          double fraction = std::uniform_real_distribution<double>(0.01, 0.99)(generator);
          std::ostringstream text;
          text.precision(17);
          text << field.real_min + fraction * (top - field.real_min);
          value = text.str();
          break;
        }
        case ConfigValueType::boolean: value = generator() % 2 ? "true" : "false"; break;
        case ConfigValueType::choice: value = field.choices[generator() % field.choices.size()]; break;
        case ConfigValueType::text: value = "p" + std::to_string(generator() % 100000) + "/x y#z.bin"; break;
      }
      overrides.push_back(field.path() + "=" + value);
    }
    // Make the cross-field constraints hold most of the time.
    int heads = 1 << (generator() % 4), layers = 1 + int(generator() % 4), experts = 8 << (generator() % 3);
    overrides.push_back("model.n_heads=" + std::to_string(heads));
    overrides.push_back("model.d_model=" + std::to_string(heads * 2 * (4 + int(generator() % 8))));
    overrides.push_back("model.n_layers=" + std::to_string(layers));
    const int moe_every = 1 + int(generator() % layers), last_moe_block = layers / moe_every * moe_every - 1;
    overrides.push_back("model.moe_every=" + std::to_string(moe_every));
    overrides.push_back("model.dense_first_blocks=" + std::to_string(generator() % uint64_t(last_moe_block + 1)));
    overrides.push_back("moe.num_experts=" + std::to_string(experts));
    overrides.push_back("parallel.ep_size=" + std::to_string(1 << (generator() % 3)));
    overrides.push_back("parallel.ranks_per_node=" + std::to_string(generator() % 2 ? 0 : 4 << (generator() % 3)));
    int top_k = 1 + int(generator() % 8);
    overrides.push_back("moe.top_k=" + std::to_string(top_k));
    overrides.push_back("moe.complexity=entropy");
    overrides.push_back("moe.k_min=" + std::to_string(1 + int(generator() % top_k)));
    overrides.push_back("moe.segment_alignment=" + std::to_string(1 << (generator() % 8)));
    overrides.push_back("optimizer.min_lr=" + std::to_string(0.5 * double(generator() % 1000) / 1000.0));
    overrides.push_back("optimizer.lr=" + std::to_string(0.5 + double(generator() % 1000) / 1000.0));
    overrides.push_back("training.steps=" + std::to_string(1000 + generator() % 100000));
    overrides.push_back("optimizer.warmup_steps=" + std::to_string(generator() % 1000));
    overrides.push_back("moe.renormalize_gates=" + std::string(generator() % 2 ? "true" : "false"));
    // Groups that divide the experts and hold top_k; token choice (entropy complexity is forced above,
    // which expert choice refuses; test_config_routing.cpp round-trips expert choice).
    const int groups = 1 << (generator() % 4);
    overrides.push_back("moe.num_groups=" + std::to_string(groups));
    overrides.push_back("moe.topk_groups=" + std::to_string(groups - int(generator() % uint64_t(groups))));
    overrides.push_back("moe.routing=token_choice");
    // Replication with what it supports (one chunk, one part); or off.
    const int replicas = generator() % 2 ? 0 : 1 + int(generator() % 3);
    overrides.push_back("parallel.max_replicas_per_rank=" + std::to_string(replicas));
    if (replicas > 0) {
      overrides.push_back("parallel.a2a_chunks=1");
      overrides.push_back("parallel.ep_overlap=none");
    }
    Config config;
    try {
      config = parse_config_string(kBaseYaml, "random.yaml", overrides);
    } catch (const Error& error) {
      continue;  // an unlucky combination (e.g. odd rotary head dim); others cover the trip
    }
    const std::string emitted = config_to_yaml(config);
    Config again = parse_config_string(emitted, "emitted.yaml");
    ASSERT_EQ(again, config) << emitted;
    const std::string emitted_again = config_to_yaml(again);  // differs only in the source named on line 1
    ASSERT_EQ(emitted_again.substr(emitted_again.find('\n')), emitted.substr(emitted.find('\n')));
    // Spot checks that the values are the ones given, not defaults.
    EXPECT_EQ(again.model.d_model, config.model.d_model);
    EXPECT_EQ(again.optimizer.beta1, config.optimizer.beta1);
    EXPECT_EQ(again.data.val_path, config.data.val_path);
    ++round_trips;
  }
  EXPECT_GE(round_trips, 100) << "too few random configs were valid to test the round trip";
}

TEST(Config, EqualityNoticesEveryField) {
  const Config base = parse_config_string(kBaseYaml, "q.yaml");
  for (const ConfigField& field : config_fields()) {
    Config changed = base;
    ConfigValue value;
    switch (field.type) {
      case ConfigValueType::integer:
        value.integer = std::stoll(field.get(base)) == field.integer_min ? field.integer_min + 1 : field.integer_min;
        break;
      case ConfigValueType::real: value.real = std::stod(field.get(base)) + 0.125; break;
      case ConfigValueType::boolean: value.boolean = field.get(base) != "true"; break;
      case ConfigValueType::choice:
        if (field.choices.size() < 2) continue;
        value.text = field.choices[0] == field.get(base) ? field.choices[1] : field.choices[0];
        break;
      case ConfigValueType::text: value.text = "changed"; break;
    }
    field.set(changed, value);
    EXPECT_NE(changed, base) << field.path();
  }
}
