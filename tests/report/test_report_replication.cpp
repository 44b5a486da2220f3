// The report's view of hot-expert replication: the keys the trainer writes per step with
// parallel.max_replicas_per_rank > 0 ("replicated_experts", "replicated_rows",
// "ep_max_load_before", "ep_max_load_after") are read back per line and drawn as two charts; a
// history without them has neither.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "src/report/report.h"
#include "src/report/run_history.h"

using namespace switchyard;

namespace {

std::string write_metrics(const std::string& name, bool with_replication) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("switchyard_test_replication_" + std::to_string(::getpid()) + "_" + name))
                               .string();
  std::ofstream out(path);
  for (int step = 1; step <= 3; ++step) {
    char line[512];
    std::snprintf(line, sizeof(line),
                  "{\"step\":%d,\"total_steps\":3,\"loss\":%g,\"lr\":0.001,\"grad_norm\":1,\"skipped\":false,"
                  "\"aux_loss\":0.01,\"z_loss\":0.001,\"dropped_fraction\":0,\"tokens\":100,\"step_time_s\":0.1,"
                  "\"tokens_per_s\":1000",
                  step, 4.0 - 0.5 * step);
    out << line;
    if (with_replication)  // step 2 replicated nothing
      out << ",\"replicated_experts\":" << (step == 2 ? 0 : step) << ",\"replicated_rows\":" << (step == 2 ? 0 : 100 * step)
          << ",\"ep_max_load_before\":" << 1000 + step << ",\"ep_max_load_after\":" << (step == 2 ? 1002 : 600 + step);
    out << "}\n";
  }
  return path;
}

ReportInputs inputs_for(const RunHistory& history) {
  ReportInputs inputs;
  inputs.title = "replication run";
  inputs.run_dir = "runs/replication";
  inputs.history = &history;
  inputs.specialization_missing_reason = "not asked";
  return inputs;
}

TEST(ReplicationReport, ReadsTheStepsReplicationAndDrawsIt) {
  const std::string path = write_metrics("on.jsonl", true);
  const RunHistory history = read_run_history(path, 4);
  std::remove(path.c_str());
  ASSERT_EQ(history.ep_max_load_before.size(), 3u);
  EXPECT_TRUE(history_has_replication(history));
  EXPECT_DOUBLE_EQ(history.replicated_experts[0], 1.0);
  EXPECT_DOUBLE_EQ(history.replicated_experts[1], 0.0);
  EXPECT_DOUBLE_EQ(history.replicated_rows[2], 300.0);
  EXPECT_DOUBLE_EQ(history.ep_max_load_before[2], 1003.0);
  EXPECT_DOUBLE_EQ(history.ep_max_load_after[0], 601.0);
  EXPECT_DOUBLE_EQ(history.ep_max_load_after[1], 1002.0);
  const std::string html = build_report_html(inputs_for(history));
  for (const char* text : {"Hot-expert replication: the busiest EP rank", "without replicas", "with replicas",
                           "rows computed by replicas", "Hot-expert replicas"})
    EXPECT_NE(html.find(text), std::string::npos) << text;
}

TEST(ReplicationReport, AHistoryWithoutTheKeysHasNoReplicationCharts) {
  const std::string path = write_metrics("off.jsonl", false);
  const RunHistory history = read_run_history(path, 4);
  std::remove(path.c_str());
  ASSERT_EQ(history.ep_max_load_before.size(), 3u);
  EXPECT_TRUE(std::isnan(history.ep_max_load_before[0]));
  EXPECT_FALSE(history_has_replication(history));
  const std::string html = build_report_html(inputs_for(history));
  EXPECT_EQ(html.find("Hot-expert replica"), std::string::npos);
}

}  // namespace
