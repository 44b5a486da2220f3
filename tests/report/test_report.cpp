// The report's pieces: SVG plots (well-formed, the right number of marks, line breaks at missing
// values, colour scales), the specialization map on a routing whose answer is known, the run
// history read back from metrics lines, the HTML page, and the specialization run of a small model
// (the model must report its routing through the observer tap). The JSON reader: test_json.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "src/report/report.h"
#include "src/report/run_history.h"
#include "src/report/specialization.h"
#include "src/report/specialization_run.h"
#include "src/report/svg_plot.h"
#include "src/core/json.h"
#include "src/model/transformer.h"
#include "src/train/metrics.h"
#include "src/train/weights_file.h"

using namespace switchyard;

namespace {

size_t count_of(const std::string& text, const std::string& needle) {
  size_t count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) ++count;
  return count;
}

// Element nesting of an XML fragment is balanced (every <a> closed by </a> in order, <b/> alone).
bool balanced_xml(const std::string& text) {
  std::vector<std::string> open;
  for (size_t at = text.find('<'); at != std::string::npos; at = text.find('<', at + 1)) {
    const size_t end = text.find('>', at);
    if (end == std::string::npos) return false;
    const std::string tag = text.substr(at + 1, end - at - 1);
    if (tag.empty() || tag[0] == '!' || tag[0] == '?') continue;
    if (tag[0] == '/') {
      if (open.empty() || open.back() != tag.substr(1)) return false;
      open.pop_back();
    } else if (tag.back() != '/') {
      open.push_back(tag.substr(0, tag.find_first_of(" \n")));
    }
  }
  return open.empty();
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("switchyard_test_report_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

TEST(SvgPlot, NiceTicks) {
  const std::vector<double> unit = nice_ticks(0, 1, 5);
  ASSERT_EQ(unit.size(), 6u);
  for (size_t index = 0; index < unit.size(); ++index) EXPECT_NEAR(unit[index], 0.2 * double(index), 1e-12);
  const std::vector<double> ticks = nice_ticks(3, 97, 5);
  ASSERT_GE(ticks.size(), 4u);
  EXPECT_GE(ticks.front(), 3.0);
  EXPECT_LE(ticks.back(), 97.0);
  EXPECT_DOUBLE_EQ(ticks[1] - ticks[0], 20.0);
  EXPECT_FALSE(nice_ticks(5, 5, 4).empty());  // a flat range still gets ticks
}

TEST(SvgPlot, LineChartDrawsEachRunAndLegend) {
  PlotSeries loss;
  loss.name = "loss <train>";
  for (int step = 1; step <= 50; ++step) {
    loss.x.push_back(step);
    loss.y.push_back(step == 25 ? NAN : 5.0 / step);  // a gap splits the line in two
  }
  PlotSeries validation;
  validation.name = "validation";
  validation.x = {10, 20, 30};
  validation.y = {1.0, 0.6, 0.4};
  validation.markers = true;
  LineChartOptions options;
  options.title = "Loss & more";
  const std::string svg = svg_line_chart({loss, validation}, options);
  EXPECT_TRUE(balanced_xml(svg)) << svg;
  EXPECT_EQ(count_of(svg, "<polyline"), 3u);  // two runs of the loss, one validation line
  EXPECT_EQ(count_of(svg, "<circle"), 3u);
  EXPECT_NE(svg.find("loss &lt;train&gt;"), std::string::npos);
  EXPECT_NE(svg.find("Loss &amp; more"), std::string::npos);

  PlotSeries long_series;
  long_series.name = "long";
  for (int step = 0; step < 100000; ++step) {
    long_series.x.push_back(step);
    long_series.y.push_back(std::sin(step * 1e-3));
  }
  const std::string reduced = svg_line_chart({long_series}, options);
  EXPECT_LT(reduced.size(), 60000u) << "100k points must be reduced to about one per pixel";
  EXPECT_TRUE(balanced_xml(reduced));
  EXPECT_NE(svg_line_chart({}, options).find("no data"), std::string::npos);
}

TEST(SvgPlot, HeatmapCellsAndScales) {
  std::vector<std::vector<double>> values = {{1.0, 2.0, 0.5}, {NAN, 4.0, 0.25}};
  HeatmapOptions options;
  options.title = "load";
  options.row_labels = {"e0", "e1"};
  options.column_labels = {"a", "b", "c"};
  options.scale = HeatmapScale::diverging_ratio;
  options.ratio_limit = 4.0;
  options.annotate = true;
  const std::string svg = svg_heatmap(values, options);
  EXPECT_TRUE(balanced_xml(svg)) << svg;
  EXPECT_EQ(count_of(svg, "<title>"), 6u);                                          // one hover title per cell
  EXPECT_NE(svg.find("fill=\"" + diverging_color(0.0) + "\""), std::string::npos);  // 1x is white
  EXPECT_NE(svg.find("fill=\"#d9d9d9\""), std::string::npos);                       // the missing cell
  EXPECT_NE(svg.find("fill=\"" + diverging_color(1.0) + "\""), std::string::npos);  // 4x is full red
  EXPECT_EQ(diverging_color(0.0), "#f7f7f7");
  EXPECT_NE(sequential_color(0.0), sequential_color(1.0));
}

// A routing with a known answer: letters -> expert 0, digits -> expert 1, everything else -> 2.
TEST(Specialization, CountsSharesAndLifts) {
  const std::string text = "ab1 c2\nd34 efg";
  std::vector<int32_t> tokens(text.begin(), text.end());
  const int64_t count = int64_t(tokens.size());
  SpecializationMap map({1, 3}, 3, /*window=*/8, /*position_buckets=*/2);
  const size_t length = tokens.size();
  std::vector<int32_t> ids(length), two_choices(2 * length), token_k(length, 2);
  for (int64_t index = 0; index < count; ++index) {
    const int byte_class = byte_class_of(tokens[size_t(index)]);
    ids[size_t(index)] = byte_class == kClassLower ? 0 : byte_class == kClassDigit ? 1 : 2;
    two_choices[size_t(2 * index)] = ids[size_t(index)];
    two_choices[size_t(2 * index + 1)] = -1;  // an empty second choice is not counted
  }
  map.add_text(tokens.data(), count);
  map.add_routing(0, tokens.data(), count, ids.data(), 1, nullptr);
  map.add_routing(1, tokens.data(), count, two_choices.data(), 2, token_k.data());
  EXPECT_EQ(map.text().count, count);
  EXPECT_EQ(map.text().by_class[kClassLower], 7);
  EXPECT_EQ(map.text().by_class[kClassDigit], 4);
  for (int layer = 0; layer < 2; ++layer) {
    const LayerSpecialization& routed = map.layers()[size_t(layer)];
    EXPECT_EQ(routed.experts[0].count, 7);
    EXPECT_EQ(routed.experts[1].count, 4);
    EXPECT_EQ(routed.experts[2].count, count - 11);
    EXPECT_DOUBLE_EQ(map.lift(layer, 1, kClassDigit), double(count) / 4.0);
    EXPECT_DOUBLE_EQ(map.lift(layer, 0, kClassDigit), 0.0);
  }
  EXPECT_EQ(map.layers()[1].block, 3);
  // Windows of 8: "ab1 c2\nd" and "34 efg"; positions 0-3 are bucket 0, 4-7 bucket 1.
  const InputProfile& digits = map.layers()[0].experts[1];
  EXPECT_EQ(digits.by_position[0], 3);               // '1' at 2, '3' at 0, '4' at 1
  EXPECT_EQ(digits.by_position[1], 1);               // '2' at 5
  EXPECT_EQ(digits.by_previous[kPreviousStart], 1);  // '3' opens the second window
  EXPECT_EQ(digits.by_previous[kClassLower], 2);     // after 'b' and 'c'
  EXPECT_EQ(digits.by_previous[kClassDigit], 1);     // '4' after '3'
  EXPECT_EQ(digits.top_bytes(2), (std::vector<int>{'1', '2'}));

  const std::string table = map.table();
  EXPECT_NE(table.find("MoE layer 1 (block 3)"), std::string::npos) << table;
  EXPECT_NE(table.find("'1' '2' '3' '4'"), std::string::npos) << table;
  const json::Value parsed = json::parse(map.json(), "specialization json");
  const json::Value& expert = parsed.find("layers")->elements()[0].find("experts")->elements()[1];
  EXPECT_EQ(expert.number_or("count", 0), 4.0);
  EXPECT_DOUBLE_EQ(expert.find("lift_by_class")->elements()[kClassDigit].number_or(-1), double(count) / 4.0);
  EXPECT_TRUE(expert.find("lift_by_class")->elements()[kClassOther].is_null());  // the text has no "other" byte
  EXPECT_THROW(map.add_routing(2, tokens.data(), count, ids.data(), 1, nullptr), Error);
  std::vector<int32_t> bad(ids);
  bad[0] = 3;
  EXPECT_THROW(map.add_routing(0, tokens.data(), count, bad.data(), 1, nullptr), Error);
}

// Metrics lines as the trainer writes them, read back.
TEST(RunHistory, ReadsCurvesLoadBinsAndRouterRecords) {
  const std::string path = temp_path("metrics.jsonl");
  std::mt19937_64 generator(5);
  std::uniform_int_distribution<int> counts(0, 50);
  std::vector<std::vector<int64_t>> totals(2, std::vector<int64_t>(3, 0));
  {
    std::ofstream out(path);
    for (int step = 1; step <= 30; ++step) {
      StepMetrics metrics;
      metrics.step = step;
      metrics.total_steps = 30;
      metrics.loss = 5.0 - 0.1 * step;
      metrics.tokens_per_s = 1000 + step;
      if (step % 10 == 0) {
        metrics.has_val_loss = true;
        metrics.val_loss = 4.0 - 0.05 * step;
        std::vector<double> sums(kNumRouterSums + 3, 0.0);
        sums[kRouterForwards] = 10;
        sums[kRouterTokens] = 100;
        sums[kNumRouterSums] = double(step);
        sums[kNumRouterSums + 1] = 1;
        metrics.router = {derive_router_stats(0, sums.data(), 3), derive_router_stats(1, sums.data(), 3)};
      }
      metrics.tokens_per_expert.resize(2);
      for (int layer = 0; layer < 2; ++layer)
        for (int expert = 0; expert < 3; ++expert) {
          const int value = counts(generator);
          metrics.tokens_per_expert[size_t(layer)].push_back(value);
          totals[size_t(layer)][size_t(expert)] += value;
        }
      out << metrics_json(metrics) << "\n";
    }
    out << "{\"step\":31,\"loss\":";  // the run died mid-line
  }
  const RunHistory history = read_run_history(path, 4);
  ASSERT_EQ(history.step.size(), 30u);
  EXPECT_EQ(history.total_steps, 30);
  EXPECT_DOUBLE_EQ(history.loss[9], 4.0);
  EXPECT_EQ(history.val_step, (std::vector<double>{10, 20, 30}));
  EXPECT_DOUBLE_EQ(history.val_loss[2], 2.5);
  ASSERT_EQ(history.notes.size(), 1u);
  ASSERT_EQ(history.load_layers, 2);
  ASSERT_EQ(history.load_experts, 3);
  EXPECT_EQ(history.bin_first_step.size(), 4u);  // 31 steps seen in pass 1 -> 8 steps per bin, 4 bins
  for (int layer = 0; layer < 2; ++layer)
    for (int expert = 0; expert < 3; ++expert) {
      double sum = 0;
      for (const auto& bin : history.load[size_t(layer)]) sum += bin[size_t(expert)];
      EXPECT_EQ(sum, double(totals[size_t(layer)][size_t(expert)]));
    }
  ASSERT_EQ(history.router.size(), 3u);
  EXPECT_EQ(history.router[1].step, 20);
  ASSERT_EQ(history.router[1].layers.size(), 2u);
  EXPECT_EQ(history.router[1].layers[1].tokens_per_expert, (std::vector<int64_t>{20, 1, 0}));
  EXPECT_NEAR(history.router[2].layers[0].load_imbalance, 30.0 / (31.0 / 3.0), 1e-6);

  {
    std::ofstream out(path);
    out << "{\"step\":1,\"loss\":2}\nnot json\n{\"step\":3,\"loss\":2}\n";
  }
  try {
    read_run_history(path, 4);
    ADD_FAILURE() << "a bad line in the middle must be rejected";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput);
    EXPECT_NE(error.message().find(":2"), std::string::npos) << error.message();
  }
  std::remove(path.c_str());
  EXPECT_THROW(read_run_history(path, 4), Error);
}

TEST(RunHistory, MovingAverageSkipsMissingValues) {
  const std::vector<double> smooth = exponential_moving_average({NAN, 2.0, NAN, 4.0}, 0.5);
  EXPECT_TRUE(std::isnan(smooth[0]));
  EXPECT_DOUBLE_EQ(smooth[1], 2.0);  // bias-corrected: the first value itself
  EXPECT_DOUBLE_EQ(smooth[2], 2.0);
  EXPECT_DOUBLE_EQ(smooth[3], (0.25 * 2.0 + 0.5 * 4.0) / 0.75);
}

TEST(Report, HtmlHasEverySectionAndNoScripts) {
  RunHistory history;
  history.path = "runs/x/metrics.jsonl";
  history.total_steps = 3;
  history.step = {1, 2, 3};
  history.loss = {3, 2.5, 2.2};
  history.lr = history.grad_norm = history.aux_loss = history.z_loss = history.dropped_fraction = {0.1, 0.2, 0.3};
  history.tokens_per_s = history.step_time_s = {1, 1, 1};
  history.mfu = {NAN, NAN, NAN};
  history.skipped = {false, false, false};
  history.load_layers = 1;
  history.load_experts = 2;
  history.bin_first_step = {1, 3};
  history.bin_last_step = {2, 3};
  history.load = {{{10, 30}, {20, 20}}};
  SpecializationMap map({1}, 2, 4, 2);
  const std::vector<int32_t> tokens = {'a', '1', ' ', 'b'};
  const std::vector<int32_t> ids = {0, 1, 1, 0};
  map.add_text(tokens.data(), 4);
  map.add_routing(0, tokens.data(), 4, ids.data(), 1, nullptr);
  ReportInputs inputs;
  inputs.title = "run <x>";
  inputs.run_dir = "runs/x";
  inputs.history = &history;
  inputs.specialization = &map;
  inputs.specialization_source = "a test text";
  const std::string html = build_report_html(inputs);
  for (const char* section : {"Training curves", "Expert load", "Router statistics", "Expert specialization",
                              "MoE layer 0: expert load over training", "By byte class", "run &lt;x&gt;"})
    EXPECT_NE(html.find(section), std::string::npos) << section;
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_GE(count_of(html, "<svg"), 10u);
  const size_t body = html.find("<body>"), body_end = html.find("</body>");
  ASSERT_NE(body_end, std::string::npos);
  EXPECT_TRUE(balanced_xml(html.substr(body, body_end + 7 - body))) << html;
  inputs.specialization = nullptr;
  inputs.specialization_missing_reason = "no weights";
  inputs.step_profile_missing_reason = "not profiled: no profile.json";
  EXPECT_NE(build_report_html(inputs).find("Not computed: no weights"), std::string::npos);
  EXPECT_NE(build_report_html(inputs).find("not profiled: no profile.json"), std::string::npos);
  inputs.step_profile = "step profile: a <table>\n";  // shown as text, escaped
  const std::string with_profile = build_report_html(inputs);
  EXPECT_NE(with_profile.find("<h2>Step time breakdown</h2>"), std::string::npos);
  EXPECT_NE(with_profile.find("<pre>step profile: a &lt;table&gt;"), std::string::npos) << with_profile;
}

// The whole analysis path on a small random model: the model reports each MoE layer's routing
// through the observer tap, and the counts cover every token of the text once per choice.
TEST(Specialization, RunsAModelOverAText) {
  const std::string yaml =
      "model: {vocab_size: 256, d_model: 16, n_layers: 4, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, "
      "compute_dtype: fp32}\nmoe: {num_experts: 4, top_k: 2, expert_d_ff: 16, segment_alignment: 4}\n"
      "training: {steps: 1}\ndata: {path: unused.bin}\n";
  const Config config = parse_config_string(yaml, "test.yaml");
  TransformerOptions options;
  Transformer model(config.model, config.moe, options);
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f32, DType::f32);
  const ExecContext context{DeviceKind::cpu, nullptr};
  parameters.initialize(context, 77);
  const std::string weights_path = temp_path("model.weights");
  save_final_weights(context, weights_path, config_to_yaml(config), parameters, nullptr, true);
  const WeightsFile weights = read_weights_file(weights_path);
  std::remove(weights_path.c_str());

  const std::string text_path = temp_path("text.txt");
  {
    std::ofstream out(text_path, std::ios::binary);
    out << "The 3 quick brown foxes jumped over 12 lazy dogs.\nAnd then? They slept.";
  }
  SpecializationOptions analysis;
  analysis.batch = 2;
  const std::vector<int32_t> tokens = load_analysis_tokens(text_path, 256, 60);  // 3 windows of 16 + a tail of 12
  std::remove(text_path.c_str());
  ASSERT_EQ(tokens.size(), 60u);
  EXPECT_EQ(tokens[0], 'T');
  const SpecializationMap map = run_specialization(weights, weights_path, tokens, analysis);
  ASSERT_EQ(map.layers().size(), 2u);
  EXPECT_EQ(map.layers()[0].block, 1);
  EXPECT_EQ(map.layers()[1].block, 3);
  EXPECT_EQ(map.text().count, 60);
  for (const LayerSpecialization& layer : map.layers()) {
    int64_t routed = 0, used = 0;
    for (const InputProfile& expert : layer.experts) {
      routed += expert.count;
      used += expert.count > 0;
    }
    EXPECT_EQ(routed, 120) << "top-2, dropless: two choices per token";
    EXPECT_GE(used, 2);
  }
  EXPECT_EQ(map.text().by_previous[kPreviousStart], 4);  // four windows start
}

}  // namespace
