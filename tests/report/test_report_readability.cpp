// What keeps the report readable: the robust y range of line charts (one spike must not flatten
// the rest of training) and the edge markers for the points beyond it, SVGs that scale with the
// page, counted nouns in the right number, the trainer's warnings read back and listed, and the
// specialization map's explanation of its grey cells.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "src/report/report.h"
#include "src/report/run_history.h"
#include "src/report/specialization.h"
#include "src/report/svg_plot.h"
#include "src/train/config.h"
#include "src/train/metrics.h"

using namespace switchyard;

namespace {

size_t count_of(const std::string& text, const std::string& needle) {
  size_t count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) ++count;
  return count;
}

// A loss curve falling from 5.5 towards 2 over `steps` steps.
std::vector<double> falling_loss(int steps) {
  std::vector<double> loss;
  for (int step = 1; step <= steps; ++step) loss.push_back(2.0 + 3.5 * std::exp(-double(step) / 30.0));
  return loss;
}

TEST(RobustAxisRange, AnEarlySpikeIsClippedAndTheCurveKept) {
  std::vector<double> loss = falling_loss(200);
  AxisRange plain = robust_axis_range(loss);
  EXPECT_FALSE(plain.clipped_high);  // the start of training is data, not an outlier
  EXPECT_FALSE(plain.clipped_low);
  EXPECT_DOUBLE_EQ(plain.high, loss.front());
  EXPECT_DOUBLE_EQ(plain.low, loss.back());

  loss[20] = 9.17;  // the SOTU run's spike
  loss[21] = 7.9;
  loss[40] = NAN;   // missing values are ignored
  const AxisRange range = robust_axis_range(loss);
  EXPECT_TRUE(range.clipped_high);
  EXPECT_FALSE(range.clipped_low);
  EXPECT_LT(range.high, 7.9);
  EXPECT_GT(range.high, 5.4);  // the whole curve stays in view
  EXPECT_DOUBLE_EQ(range.low, loss.back());
}

TEST(RobustAxisRange, GradNormSpikeAndLowOutliersAndShortSeries) {
  std::vector<double> norm;
  for (int step = 0; step < 100; ++step) norm.push_back(1.0 + 0.3 * std::sin(double(step)));
  norm[21] = 113.0;
  AxisRange range = robust_axis_range(norm);
  EXPECT_TRUE(range.clipped_high);
  EXPECT_LT(range.high, 2.0);
  // Bulk 2nd..98th percentile [0.7, 1.3] of the unspiked values: the axis ends half its width out.
  EXPECT_NEAR(range.high, 1.3 + 0.5 * 0.6, 0.02);

  std::vector<double> throughput(50, 1000.0);
  for (size_t index = 0; index < throughput.size(); ++index) throughput[index] += double(index % 7) * 10;
  throughput[0] = 3.0;  // the first step pays for warm-up
  range = robust_axis_range(throughput);
  EXPECT_TRUE(range.clipped_low);
  EXPECT_FALSE(range.clipped_high);
  EXPECT_GT(range.low, 900.0);

  // Fewer than 20 values: nothing is called an outlier.
  range = robust_axis_range({1, 1, 1, 1, 1, 1, 1, 1, 1, 100});
  EXPECT_FALSE(range.clipped_high);
  EXPECT_DOUBLE_EQ(range.high, 100.0);
  range = robust_axis_range({NAN, NAN});
  EXPECT_TRUE(std::isnan(range.low));
}

TEST(SvgPlot, PointsBeyondTheAxisGetEdgeMarkersWithTheirValue) {
  PlotSeries loss;
  loss.name = "loss";
  const std::vector<double> values = falling_loss(200);
  for (int step = 1; step <= 200; ++step) {
    loss.x.push_back(step);
    loss.y.push_back(step == 21 ? 9.17 : step == 22 ? 8.9 : step == 150 ? 8.5 : values[size_t(step - 1)]);
  }
  LineChartOptions options;
  options.title = "Loss";
  const std::string svg = svg_line_chart({loss}, options);
  // Steps 21 and 22 are neighbours: one marker lists both; step 150 has its own.
  EXPECT_EQ(count_of(svg, "class=\"off-scale\""), 2u) << svg;
  EXPECT_NE(svg.find("<title>loss at 21: 9.17; 22: 8.9 (above the axis)</title>"), std::string::npos) << svg;
  EXPECT_NE(svg.find("<title>loss at 150: 8.5 (above the axis)</title>"), std::string::npos);
  EXPECT_NE(svg.find("3 points off the scale (max 9.17)"), std::string::npos);
  // The y axis ends below the spike: no tick label reaches 9.
  EXPECT_EQ(svg.find(">9</text>"), std::string::npos);
  EXPECT_NE(svg.find(">8</text>"), std::string::npos) << "the bulk (up to 5.4) and its slack end at 8";

  options.clip_outliers = false;
  const std::string full = svg_line_chart({loss}, options);
  EXPECT_EQ(count_of(full, "class=\"off-scale\""), 0u);
  EXPECT_EQ(full.find("off the scale"), std::string::npos);
  EXPECT_NE(full.find(">10</text>"), std::string::npos);  // the axis now covers the spike
}

TEST(SvgPlot, EverySvgHasAViewBoxAndTheReportScalesThem) {
  LineChartOptions line;
  line.width = 700;
  line.height = 300;
  PlotSeries one;
  one.x = {1, 2, 3};
  one.y = {1, 2, 3};
  EXPECT_NE(svg_line_chart({one}, line).find("viewBox=\"0 0 700 300\""), std::string::npos);
  HeatmapOptions heat;
  const std::string heatmap = svg_heatmap({{1.0, 2.0}}, heat);
  EXPECT_NE(heatmap.find("viewBox=\"0 0 "), std::string::npos);

  RunHistory history;
  history.step = {1, 2};
  history.loss = {2, 1};
  ReportInputs inputs;
  inputs.history = &history;
  const std::string html = build_report_html(inputs);
  // Fixed-size SVGs shrink to a narrow window (and keep their aspect ratio) instead of being cut off.
  EXPECT_NE(html.find("figure svg { display: block; max-width: 100%; height: auto; }"), std::string::npos);
  EXPECT_EQ(count_of(html, "<svg "), count_of(html, "viewBox=\"0 0 "));
}

TEST(Report, CountNounPluralizes) {
  EXPECT_EQ(count_noun(1, "MoE layer"), "1 MoE layer");
  EXPECT_EQ(count_noun(2, "MoE layer"), "2 MoE layers");
  EXPECT_EQ(count_noun(0, "step"), "0 steps");
  EXPECT_EQ(count_noun(1, "accumulation step"), "1 accumulation step");
  EXPECT_EQ(count_noun(3, "index", "indices"), "3 indices");
  EXPECT_EQ(count_noun(1, "index", "indices"), "1 index");

  const Config config = parse_config_string(
      "model: {vocab_size: 256, d_model: 16, n_layers: 2, n_heads: 1, seq_len: 16, d_ff: 32, moe_every: 2, "
      "compute_dtype: fp32}\nmoe: {num_experts: 4, top_k: 1, expert_d_ff: 16}\ntraining: {steps: 1}\ndata: {path: x.bin}\n",
      "test.yaml");
  RunHistory history;
  ReportInputs inputs;
  inputs.history = &history;
  inputs.config = &config;
  const std::string html = build_report_html(inputs);
  EXPECT_NE(html.find("1 MoE layer (every 2 blocks), 4 experts"), std::string::npos) << html;
  EXPECT_NE(html.find("2 blocks, 1 head,"), std::string::npos);
  EXPECT_NE(html.find("1 step, micro-batch"), std::string::npos);
  EXPECT_EQ(html.find("1 MoE layers"), std::string::npos);
}

TEST(Report, ListsTheTrainersWarnings) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("switchyard_test_warnings_" + std::to_string(::getpid()) + ".jsonl"))
                               .string();
  {
    std::ofstream out(path);
    for (int step = 1; step <= 3; ++step) {
      StepMetrics metrics;
      metrics.step = step;
      metrics.loss = 2.0;
      if (step == 2) metrics.warnings = {{"loss_spike", "loss 9 at step 2 is <4x> the median"}};
      out << metrics_json(metrics) << "\n";
    }
  }
  const RunHistory history = read_run_history(path, 4);
  std::remove(path.c_str());
  ASSERT_EQ(history.warnings.size(), 1u);
  EXPECT_EQ(history.warnings[0].step, 2);
  EXPECT_EQ(history.warnings[0].kind, "loss_spike");
  EXPECT_EQ(history.warnings[0].message, "loss 9 at step 2 is <4x> the median");
  ReportInputs inputs;
  inputs.history = &history;
  const std::string html = build_report_html(inputs);
  EXPECT_NE(html.find("1 warning during training"), std::string::npos);
  EXPECT_NE(html.find("<li>step 2: loss 9 at step 2 is &lt;4x&gt; the median</li>"), std::string::npos) << html;
  RunHistory quiet;
  inputs.history = &quiet;
  EXPECT_EQ(build_report_html(inputs).find("during training"), std::string::npos);
}

TEST(Report, SpecializationExplainsOtherAndGreyCells) {
  SpecializationMap map({1}, 2, 4, 2);
  const std::vector<int32_t> tokens = {'a', '1', ' ', 'b'};  // no newline, punctuation or other bytes
  const std::vector<int32_t> ids = {0, 1, 1, 0};
  map.add_text(tokens.data(), 4);
  map.add_routing(0, tokens.data(), 4, ids.data(), 1, nullptr);
  RunHistory history;
  ReportInputs inputs;
  inputs.history = &history;
  inputs.specialization = &map;
  const std::string html = build_report_html(inputs);
  EXPECT_NE(html.find("other (control bytes and bytes 128-255"), std::string::npos);
  EXPECT_NE(html.find("This text has no upper, newline, punct, other bytes, hence the grey columns."),
            std::string::npos)
      << html;
  EXPECT_NE(html.find("expert 0, other: no lift (the text has no other tokens)"), std::string::npos);
}

}  // namespace
