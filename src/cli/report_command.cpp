// switchyard report RUN_DIR [--output FILE] [--text FILE] [--tokens N] [--device auto|cpu|cuda]
//                           [--no-specialization] [--specialization-json FILE]
// switchyard specialize --checkpoint PATH --text FILE [--tokens N] [--json FILE] [--device ...]
//
// report: reads the run directory of `switchyard train` (config.yaml, the metrics file named by
// logging.metrics_file, its weights) and writes one self-contained HTML page (default
// RUN_DIR/report.html) with the training curves, the expert load per layer over training, the
// router statistics and -- when weights and a text are available -- the expert specialization
// map (src/report/report.h). The text defaults to the run's validation data (data.val_path),
// else its training data.
// specialize: the specialization map alone, printed as a table (and written as JSON with --json).
// Both find the weights by the rule every weights-reading command shares (src/train/weights_source.h):
// a run folder's newest complete checkpoint, else its final.weights, so a preempted run has a map too.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include "src/report/report.h"
#include "src/report/run_history.h"
#include "src/report/specialization_run.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "src/train/config.h"
#include "src/train/step_profiler.h"
#include "src/train/weights_file.h"
#include "src/train/weights_source.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;

DeviceKind resolve_analysis_device(const std::string& choice) {
  if (choice == "cpu") return DeviceKind::cpu;
  if (choice == "cuda") {
    SY_CHECK_INPUT(cuda_available(), "--device cuda, but no CUDA device is visible");
    return DeviceKind::cuda;
  }
  SY_CHECK_INPUT(choice == "auto", "--device must be auto, cpu or cuda, not '", choice, "'");
  return cuda_available() ? DeviceKind::cuda : DeviceKind::cpu;
}

std::string read_text_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) SY_BAD_INPUT("cannot read '", path, "'");
  return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

void write_text_file(const std::string& path, const std::string& text, const char* what) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) SY_BAD_INPUT("cannot write the ", what, " '", path, "'");
  file << text;
  file.flush();
  if (!file) SY_THROW("writing the ", what, " '", path, "' failed");
}

SpecializationOptions specialization_options(const ArgParser& parser) {
  SpecializationOptions options;
  options.device = resolve_analysis_device(parser.get("device"));
  options.max_tokens = parser.get_int("tokens");
  SY_CHECK_INPUT(options.max_tokens >= 1, "--tokens must be >= 1, got ", options.max_tokens);
  if (options.device == DeviceKind::cuda) cuda_set_device(0);
  return options;
}

}  // namespace

int command_report(int argc, char** argv) {
  ArgParser parser("switchyard report",
                   "Write an HTML report of a training run: loss and validation curves, expert load per layer over\n"
                   "training, router statistics and the expert specialization map (docs/ANALYTICS.md).");
  parser.add_positional("run_dir", "the run directory (logging.run_dir) of `switchyard train`; the specialization "
                        "map runs its newest complete checkpoint, else its final.weights");
  parser.add_option("output", "FILE", "where to write the report (default RUN_DIR/report.html)");
  parser.add_option("text", "FILE",
                    "text for the specialization map: a token file or any file of bytes (default: "
                    "the run's data.val_path, else data.path)");
  parser.add_option("tokens", "N", "tokens of the text to analyse", "16384");
  parser.add_option("device", "auto|cpu|cuda", "where to run the model for the specialization map", "auto");
  parser.add_option("specialization-json", "FILE", "also write the specialization map as JSON");
  parser.add_option("heatmap-columns", "N", "step ranges (columns) of the expert-load heatmaps", "160");
  parser.add_flag("no-specialization", "skip the specialization map (no model is run)");
  parser.add_epilog("Example:\n  switchyard report runs/tiny-cpu && xdg-open runs/tiny-cpu/report.html");
  if (!parser.parse(argc, argv)) return kExitOk;

  const std::string run_dir = parser.get("run_dir");
  std::error_code status;
  SY_CHECK_INPUT(fs::is_directory(run_dir, status), "'", run_dir, "' is not a run directory");
  const int heatmap_columns = int(parser.get_int("heatmap-columns"));
  SY_CHECK_INPUT(heatmap_columns >= 1 && heatmap_columns <= 2000, "--heatmap-columns must be in [1, 2000]");

  // The run's config: config.yaml, else the one stored with its weights.
  std::unique_ptr<Config> config;
  const std::string config_path = (fs::path(run_dir) / "config.yaml").string();
  WeightsSource source;
  std::string no_weights_reason;
  const bool has_weights = find_weights_source(run_dir, &source, &no_weights_reason);
  std::unique_ptr<WeightsFile> weights;
  if (fs::exists(config_path, status)) {
    config = std::make_unique<Config>(parse_stored_config(read_text_file(config_path), config_path));
  } else if (has_weights) {
    weights = std::make_unique<WeightsFile>(read_weights_source(source));
    config = std::make_unique<Config>(parse_stored_config(weights->config_yaml, source.path));
  }
  std::string metrics_path = (fs::path(run_dir) / "metrics.jsonl").string();
  if (config) {
    const fs::path named(config->logging.metrics_file);
    const std::string candidate = named.is_absolute() ? named.string() : (fs::path(run_dir) / named).string();
    if (fs::exists(candidate, status)) metrics_path = candidate;
  }
  SY_CHECK_INPUT(fs::exists(metrics_path, status), "no metrics file in '", run_dir, "' (looked for ", metrics_path,
                 ")");
  const RunHistory history = read_run_history(metrics_path, heatmap_columns);

  ReportInputs inputs;
  inputs.title = fs::path(run_dir).lexically_normal().filename().string();
  if (inputs.title.empty() || inputs.title == ".") inputs.title = fs::absolute(run_dir).filename().string();
  inputs.run_dir = run_dir;
  inputs.config = config.get();
  inputs.history = &history;

  std::unique_ptr<SpecializationMap> map;
  if (parser.flag("no-specialization")) {
    inputs.specialization_missing_reason = "skipped (--no-specialization).";
  } else if (!has_weights) {
    inputs.specialization_missing_reason = no_weights_reason + ". The map needs trained weights.";
  } else {
    std::string text = parser.get("text");
    if (text.empty() && config) {
      for (const std::string& candidate : {config->data.val_path, config->data.path})
        if (!candidate.empty() && fs::exists(candidate, status)) {
          text = candidate;
          break;
        }
    }
    if (text.empty()) {
      inputs.specialization_missing_reason = "no text: the run's data files are not reachable from here; give --text.";
    } else {
      if (!weights) weights = std::make_unique<WeightsFile>(read_weights_source(source));
      const SpecializationOptions options = specialization_options(parser);
      const Config weights_config = parse_stored_config(weights->config_yaml, source.path);
      const std::vector<int32_t> tokens =
          load_analysis_tokens(text, weights_config.model.vocab_size, options.max_tokens);
      map = std::make_unique<SpecializationMap>(run_specialization(*weights, source.path, tokens, options));
      inputs.specialization = map.get();
      inputs.specialization_source = "the first " + std::to_string(tokens.size()) + " tokens of " + text;
      if (parser.has("specialization-json"))
        write_text_file(parser.get("specialization-json"), map->json() + "\n", "specialization JSON");
    }
  }

  // The step time breakdown, when the run was profiled (train --profile-steps writes profile.json).
  const std::string profile_path = (fs::path(run_dir) / "profile.json").string();
  if (!fs::exists(profile_path, status)) {
    inputs.step_profile_missing_reason =
        "not profiled: the run has no profile.json (train --profile-steps N writes one).";
  } else {
    try {
      ProfileFlops flops;
      const std::vector<StepProfile> profiles =
          parse_step_profile_json(read_text_file(profile_path), profile_path, flops);
      inputs.step_profile = format_step_profile(profiles, flops);
    } catch (const Error& error) {  // a broken profile costs its section, not the report
      inputs.step_profile_missing_reason = "not shown: " + error.message();  // names the file and the field
    }
  }

  const std::string output = parser.has("output") ? parser.get("output") : (fs::path(run_dir) / "report.html").string();
  write_text_file(output, build_report_html(inputs), "report");
  std::cout << "switchyard report: " << history.step.size() << " metrics lines";
  if (map)
    std::cout << ", specialization map of " << map->text().count << " tokens (" << describe_weights_source(source)
              << ")";
  else
    std::cout << ", no specialization map (" << inputs.specialization_missing_reason << ")";
  std::cout << " -> " << output << "\n";
  return kExitOk;
}

int command_specialize(int argc, char** argv) {
  ArgParser parser("switchyard specialize",
                   "Show which inputs each expert receives: run a trained model over a text and count, per MoE\n"
                   "layer and expert, the routed bytes by class, by position and by the preceding byte.");
  parser.add_option("checkpoint", "PATH", kWeightsPathHelp);
  parser.add_option("text", "FILE", "a token file, or any file whose bytes are the text");
  parser.add_option("tokens", "N", "tokens of the text to analyse", "16384");
  parser.add_option("device", "auto|cpu|cuda", "where to run the model", "auto");
  parser.add_option("json", "FILE", "also write the map (counts, shares and lifts) as JSON");
  parser.add_option("position-buckets", "N", "equal ranges of the position axis", "8");
  parser.add_epilog("Example:\n  switchyard specialize --checkpoint runs/tiny-cpu --text README.md --json map.json");
  if (!parser.parse(argc, argv)) return kExitOk;
  SY_CHECK_INPUT(parser.has("checkpoint"), "specialize needs --checkpoint: ", kWeightsPathHelp);
  SY_CHECK_INPUT(parser.has("text"), "specialize needs --text (a token file or a text file)");
  const WeightsSource source = resolve_weights_source(parser.get("checkpoint"));
  SpecializationOptions options = specialization_options(parser);
  options.position_buckets = int(parser.get_int("position-buckets"));
  SY_CHECK_INPUT(options.position_buckets >= 1 && options.position_buckets <= 4096,
                 "--position-buckets must be in [1, 4096]");
  std::cerr << "switchyard specialize: " << describe_weights_source(source) << "\n";
  const WeightsFile weights = read_weights_source(source);
  const Config config = parse_stored_config(weights.config_yaml, source.path);
  const std::vector<int32_t> tokens =
      load_analysis_tokens(parser.get("text"), config.model.vocab_size, options.max_tokens);
  const SpecializationMap map = run_specialization(weights, source.path, tokens, options);
  std::cout << map.table();
  if (parser.has("json")) write_text_file(parser.get("json"), map.json() + "\n", "specialization JSON");
  return kExitOk;
}

}  // namespace switchyard
