// The report's views of the modern balancing options (src/report/router_balance.h): a synthetic
// metrics file with the keys the trainer writes for them ("seq_aux_loss", "global_aux_loss" per
// step; per router layer the same two and "bias", "bias_min", "bias_max", "bias_std") is read back
// with the right numbers and shown (bias over training, bias and load per expert at the last
// logged step, the losses in the router-loss chart and the router table); a history without those
// keys reads and renders as before; the signed heatmap scale.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "src/report/report.h"
#include "src/report/router_balance.h"
#include "src/report/run_history.h"
#include "src/report/svg_plot.h"
#include "src/train/config.h"

using namespace switchyard;

namespace {

size_t count_of(const std::string& text, const std::string& needle) {
  size_t count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) ++count;
  return count;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("switchyard_test_router_bias_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

std::string write_file(const std::string& name, const std::string& text) {
  const std::string path = temp_path(name);
  std::ofstream(path) << text;
  return path;
}

// Two MoE layers of 4 experts, 4 steps, router statistics at steps 2 and 4. Layer 0 logs the bias
// with its summary numbers; layer 1 logs the vector alone (the reader derives min, max and std).
std::string router_layer(int layer, const std::string& counts, double imbalance, const std::string& bias,
                         const std::string& summary, double seq, double global) {
  char head[256];
  std::snprintf(head, sizeof(head),
                "{\"layer\":%d,\"forwards\":2,\"tokens\":100,\"load_imbalance\":%g,\"experts_used\":1,"
                "\"dropped_fraction\":0,\"mean_gate\":0.5,\"entropy\":1.2,\"entropy_normalized\":0.9,"
                "\"aux_loss\":0,\"z_loss\":0.001,\"seq_aux_loss\":%g,\"global_aux_loss\":%g,",
                layer, imbalance, seq, global);
  return head + std::string("\"tokens_per_expert\":[") + counts + "],\"bias\":[" + bias + "]" + summary + "}";
}

std::string modern_history() {
  std::string text;
  for (int step = 1; step <= 4; ++step) {
    char line[512];
    std::snprintf(line, sizeof(line),
                  "{\"step\":%d,\"total_steps\":4,\"loss\":%g,\"lr\":0.001,\"grad_norm\":1,\"skipped\":false,"
                  "\"aux_loss\":0,\"z_loss\":0.002,\"seq_aux_loss\":%g,\"global_aux_loss\":%g,"
                  "\"dropped_fraction\":0,\"tokens\":100,\"step_time_s\":0.1,\"tokens_per_s\":1000,"
                  "\"tokens_per_expert\":[[10,40,20,30],[25,25,25,25]]",
                  step, 5.0 - 0.5 * step, 0.0125 + 0.001 * step, 0.0375 + 0.001 * step);
    text += line;
    if (step == 2)
      text += ",\"router\":[" +
              router_layer(0, "20,80,40,60", 1.6, "0.001,-0.001,0,0",
                           ",\"bias_min\":-0.001,\"bias_max\":0.001,\"bias_std\":0.000707107", 0.0061, 0.0181) +
              "," + router_layer(1, "50,50,50,50", 1.0, "0,0,0,0", "", 0.0062, 0.0182) + "]";
    if (step == 4)
      text += ",\"router\":[" +
              router_layer(0, "20,80,40,60", 1.6, "0.003,-0.002,0.001,-0.002",
                           ",\"bias_min\":-0.002,\"bias_max\":0.003,\"bias_std\":0.00212132", 0.0071, 0.0191) +
              "," + router_layer(1, "50,50,50,50", 1.0, "0.001,0.001,-0.001,-0.001", "", 0.0072, 0.0192) + "]";
    text += "}\n";
  }
  return text;
}

// Metrics lines as the trainer wrote them before the modern options (no seq_aux_loss,
// global_aux_loss or bias keys); with `zeros`, as it writes them for a run whose balance-loss
// weights are 0 and that has no router bias (both losses present and 0).
std::string classic_history(bool zeros) {
  const std::string losses = zeros ? ",\"seq_aux_loss\":0,\"global_aux_loss\":0" : "";
  std::string text;
  for (int step = 1; step <= 4; ++step) {
    text += "{\"step\":" + std::to_string(step) + ",\"total_steps\":4,\"loss\":" + std::to_string(5.0 - 0.5 * step) +
            ",\"lr\":0.001,\"grad_norm\":1,\"loss_scale\":1,\"skipped\":false,\"aux_loss\":0.01,\"z_loss\":0" +
            losses + ",\"dropped_fraction\":0,\"tokens\":100,\"tokens_per_expert\":[[10,40,20,30]]";
    if (step % 2 == 0)
      text += ",\"router\":[{\"layer\":0,\"forwards\":2,\"tokens\":100,\"load_imbalance\":1.6,\"experts_used\":1,"
              "\"dropped_fraction\":0,\"mean_gate\":0.5,\"entropy\":1.2,\"entropy_normalized\":0.9,\"aux_loss\":0.01,"
              "\"z_loss\":0,\"tokens_per_expert\":[20,80,40,60]" + losses + "}],\"router_first_step\":" +
              std::to_string(step - 1);
    text += "}\n";
  }
  return text;
}

ReportInputs inputs_for(const RunHistory& history) {
  ReportInputs inputs;
  inputs.title = "bias run";
  inputs.run_dir = "runs/bias";
  inputs.history = &history;
  inputs.specialization_missing_reason = "not asked";
  return inputs;
}

TEST(RouterBiasHistory, ReadsBalanceLossesAndBias) {
  const std::string path = write_file("modern.jsonl", modern_history());
  const RunHistory history = read_run_history(path, 4);
  std::remove(path.c_str());
  ASSERT_EQ(history.step.size(), 4u);
  ASSERT_EQ(history.seq_aux_loss.size(), 4u);
  EXPECT_DOUBLE_EQ(history.seq_aux_loss[1], 0.0145);
  EXPECT_DOUBLE_EQ(history.global_aux_loss[3], 0.0415);
  ASSERT_EQ(history.router.size(), 2u);
  const RouterRecord& last = history.router[1];
  EXPECT_EQ(last.step, 4);
  ASSERT_EQ(last.balance.size(), 2u);
  EXPECT_EQ(last.balance[0].bias, (std::vector<double>{0.003, -0.002, 0.001, -0.002}));
  EXPECT_DOUBLE_EQ(last.balance[0].bias_min, -0.002);
  EXPECT_DOUBLE_EQ(last.balance[0].bias_max, 0.003);
  EXPECT_DOUBLE_EQ(last.balance[0].bias_std, 0.00212132);  // as logged
  EXPECT_DOUBLE_EQ(last.balance[0].seq_aux_loss, 0.0071);
  EXPECT_DOUBLE_EQ(last.balance[1].global_aux_loss, 0.0192);
  // Layer 1 logged the vector alone: min, max and the population standard deviation from it.
  EXPECT_DOUBLE_EQ(last.balance[1].bias_min, -0.001);
  EXPECT_DOUBLE_EQ(last.balance[1].bias_max, 0.001);
  EXPECT_NEAR(last.balance[1].bias_std, 0.001, 1e-15);
  EXPECT_DOUBLE_EQ(history.router[0].balance[1].bias_std, 0.0);
  EXPECT_TRUE(history_has_router_bias(history));
  EXPECT_TRUE(history_has_seq_aux_loss(history));
  EXPECT_TRUE(history_has_global_aux_loss(history));
}

TEST(RouterBiasReport, ShowsBiasOverTrainingAndPerExpert) {
  const std::string path = write_file("modern_report.jsonl", modern_history());
  const RunHistory history = read_run_history(path, 4);
  std::remove(path.c_str());
  const std::string html = build_report_html(inputs_for(history));
  for (const char* text :
       {"<h2>Router bias (aux-loss-free balancing)</h2>", "Router bias: largest entry", "Router bias: smallest entry",
        "Router bias: spread over the experts", "Per expert at step 4", "Router bias at step 4",
        "Expert load, window ending at step 4",
        // the hover text of a cell: layer 0's expert 1 got 80 of 200 choices (1.6x even) and the lowest bias
        "layer 0, expert 1: bias -0.002, load 1.60x even", "layer 0, expert 1: 1.60x even (80 of 200 choices)",
        "layer 1, expert 2: bias -0.001, load 1.00x even",
        // the table of the last step: min, max, std of each layer and which expert is highest / lowest
        "<tr><td>0</td><td>-0.002</td><td>0.003</td><td>0.002121</td><td>0</td><td>1</td><td>1.600</td></tr>",
        "<tr><td>1</td><td>-0.001</td><td>0.001</td><td>0.001</td><td>0</td><td>2</td><td>1.000</td></tr>",
        // the balance losses: curves and the router table's columns
        "sequence-level (balance)", "global-batch (balance)", "<th>seq aux loss</th><th>global aux loss</th>",
        "<td>0.0071</td><td>0.0191</td></tr>", "<td>0.0072</td><td>0.0192</td></tr>"})
    EXPECT_NE(html.find(text), std::string::npos) << text;
  // The bias section sits after the expert load and before the router statistics.
  const size_t load = html.find("<h2>Expert load</h2>"), bias = html.find("<h2>Router bias"),
               router = html.find("<h2>Router statistics</h2>");
  EXPECT_LT(load, bias);
  EXPECT_LT(bias, router);
  // The largest |bias| of the strip (0.003) is full red, the most negative entry (-0.002) two thirds blue.
  EXPECT_NE(html.find("fill=\"" + diverging_color(1.0) + "\"><title>layer 0, expert 0: bias 0.003"),
            std::string::npos);
  EXPECT_NE(html.find("fill=\"" + diverging_color(-0.002 / 0.003) + "\"><title>layer 0, expert 1: bias -0.002"),
            std::string::npos);
}

TEST(RouterBiasReport, SummaryNumbersWithoutTheVectorGetTheTableOnly) {
  RunHistory history;
  history.path = "m.jsonl";
  history.step = {1};
  history.loss = {3};
  RouterRecord record;
  record.step = 1;
  record.layers.resize(1);
  record.layers[0].load_imbalance = 1.25;
  record.balance.resize(1);
  record.balance[0].bias_min = -0.5;
  record.balance[0].bias_max = 0.25;
  record.balance[0].bias_std = 0.125;
  history.router.push_back(record);
  const std::string html = build_report_html(inputs_for(history));
  EXPECT_NE(html.find("<h3>At step 1</h3>"), std::string::npos);
  EXPECT_NE(html.find("<tr><td>0</td><td>-0.5</td><td>0.25</td><td>0.125</td><td>-</td><td>-</td><td>1.250</td>"),
            std::string::npos)
      << html;
  EXPECT_EQ(html.find("Router bias at step"), std::string::npos);
}

TEST(RouterBiasReport, HistoriesWithoutTheKeysAreUnchanged) {
  for (const bool zeros : {false, true}) {
    SCOPED_TRACE(zeros ? "balance losses logged as 0, no bias" : "a history from before the modern options");
    const std::string path = write_file("classic.jsonl", classic_history(zeros));
    const RunHistory history = read_run_history(path, 4);
    std::remove(path.c_str());
    ASSERT_EQ(history.step.size(), 4u);
    ASSERT_EQ(history.router.size(), 2u);
    ASSERT_EQ(history.router[1].balance.size(), 1u);
    EXPECT_FALSE(history.router[1].balance[0].has_bias());
    EXPECT_EQ(std::isnan(history.router[1].balance[0].seq_aux_loss), !zeros);
    EXPECT_EQ(std::isnan(history.global_aux_loss[0]), !zeros);
    EXPECT_FALSE(history_has_router_bias(history));
    EXPECT_FALSE(history_has_seq_aux_loss(history));
    EXPECT_FALSE(history_has_global_aux_loss(history));
    EXPECT_TRUE(balance_loss_series(history).empty());
    const std::string html = build_report_html(inputs_for(history));
    for (const char* absent : {"Router bias", "sequence-level", "global-batch", "seq aux loss", "global aux loss"})
      EXPECT_EQ(html.find(absent), std::string::npos) << absent;
    for (const char* present : {"MoE layer 0: expert load over training", "Router statistics", "aux (load balance)",
                                "<th>z loss</th></tr>", "<td>1.600</td>"})
      EXPECT_NE(html.find(present), std::string::npos) << present;
    EXPECT_NE(router_bias_section(history).find("no router bias"), std::string::npos);
  }

  // A RunHistory built by hand (RouterRecord without `balance`, no balance-loss vectors) renders too.
  const std::string path = write_file("manual.jsonl", classic_history(false));
  RunHistory manual = read_run_history(path, 4);
  std::remove(path.c_str());
  for (RouterRecord& record : manual.router) record.balance.clear();
  manual.seq_aux_loss.clear();
  manual.global_aux_loss.clear();
  const std::string html = build_report_html(inputs_for(manual));
  EXPECT_NE(html.find("<td>1.600</td>"), std::string::npos);
  EXPECT_EQ(html.find("Router bias"), std::string::npos);
}

TEST(RouterBiasReport, RunTableNamesTheRoutingOptions) {
  const std::string yaml =
      "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16}\nmoe: {num_experts: 8, top_k: 2}\n"
      "training: {steps: 1}\ndata: {path: unused.bin}\n";
  Config config = parse_config_string(yaml, "test.yaml");
  RunHistory history;
  history.path = "m.jsonl";
  ReportInputs inputs = inputs_for(history);
  inputs.config = &config;
  EXPECT_NE(build_report_html(inputs).find("token choice, softmax scores, capacity factor 1.25, aux weight 0.01, "
                                           "z weight 0.001"),
            std::string::npos);
  config.moe.score_function = ScoreFunction::sigmoid;
  config.moe.routed_scaling_factor = 2.5;
  config.moe.num_groups = 4;
  config.moe.topk_groups = 2;
  config.moe.dropless = true;
  config.moe.aux_loss_weight = 0.0;
  config.moe.seq_aux_loss_weight = 1e-4;
  config.moe.bias_update_rate = 1e-3;
  const std::string html = build_report_html(inputs);
  EXPECT_NE(html.find("token choice, sigmoid scores x 2.5, top-2 of 4 groups, dropless, aux weight 0, seq aux "
                      "weight 0.0001, bias rate 0.001, z weight 0.001"),
            std::string::npos)
      << html.substr(html.find("routing"), 300);
}

TEST(SvgPlot, SignedHeatmapIsSymmetricAboutZero) {
  HeatmapOptions options;
  options.scale = HeatmapScale::diverging_signed;
  options.value_format = "%.3g";
  const std::string svg = svg_heatmap({{-0.5, 0.0, 0.25, NAN}}, options);
  EXPECT_NE(svg.find("fill=\"" + diverging_color(-1.0) + "\""), std::string::npos);  // -0.5: the largest |value|
  EXPECT_NE(svg.find("fill=\"" + diverging_color(0.0) + "\""), std::string::npos);   // 0 is white
  EXPECT_NE(svg.find("fill=\"" + diverging_color(0.5) + "\""), std::string::npos);
  EXPECT_NE(svg.find("fill=\"#d9d9d9\""), std::string::npos);
  EXPECT_NE(svg.find(">-0.5</text>"), std::string::npos);  // colour bar ticks from -0.5 ...
  EXPECT_NE(svg.find(">0.5</text>"), std::string::npos);   // ... to 0.5
  EXPECT_EQ(count_of(svg, "<title>"), 4u);
  options.high = 2.0;  // a fixed range
  EXPECT_NE(svg_heatmap({{1.0}}, options).find("fill=\"" + diverging_color(0.5) + "\""), std::string::npos);
  // All zeros: no division by zero, white cells.
  options.high = 0.0;
  const std::string zeros = svg_heatmap({{0.0, 0.0}}, options);
  EXPECT_EQ(count_of(zeros, "fill=\"" + diverging_color(0.0) + "\"><title>"), 2u) << zeros;
}

}  // namespace
