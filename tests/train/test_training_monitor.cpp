// The training monitor's warnings: sequences of steps go in, and exactly the warnings the rules of
// src/train/training_monitor.h call for come out (spikes against the recent median after the
// warm-up, routing collapse and idle experts per layer, rate limiting), plus how the trainer's
// metrics line and progress line carry them.
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

#include "src/core/json.h"
#include "src/train/metrics.h"
#include "src/train/training_monitor.h"

using namespace switchyard;

namespace {

StepMetrics step_of(int64_t step, double loss, double grad_norm,
                    std::vector<std::vector<int64_t>> tokens_per_expert = {{8, 8, 8, 8}}) {
  StepMetrics metrics;
  metrics.step = step;
  metrics.total_steps = 1000;
  metrics.loss = loss;
  metrics.grad_norm = grad_norm;
  metrics.tokens_per_expert = std::move(tokens_per_expert);
  return metrics;
}

// Feeds steps first..last (inclusive) with the given values, collecting every warning.
struct Feed {
  TrainingMonitor monitor;
  std::vector<std::pair<int64_t, TrainingWarning>> warnings;
  explicit Feed(const MonitorRules& rules = MonitorRules()) : monitor(rules) {}
  void step(const StepMetrics& metrics) {
    for (const TrainingWarning& warning : monitor.observe(metrics)) warnings.push_back({metrics.step, warning});
  }
  size_t count(const std::string& kind) const {
    size_t count = 0;
    for (const auto& entry : warnings) count += entry.second.kind == kind ? 1 : 0;
    return count;
  }
};

TEST(TrainingMonitor, SteadyTrainingRaisesNothing) {
  Feed feed;
  // A falling loss with noise, a noisy grad norm, balanced experts: no warning in 200 steps.
  for (int64_t step = 1; step <= 200; ++step)
    feed.step(step_of(step, 5.5 / (1.0 + 0.02 * double(step)) * (step % 3 == 0 ? 1.1 : 1.0),
                      step % 4 == 0 ? 2.5 : 1.0, {{int64_t(step % 5 + 1), 7, 9, 3}}));
  EXPECT_TRUE(feed.warnings.empty()) << feed.warnings.front().second.message;
}

TEST(TrainingMonitor, LossSpikeAgainstTheMedianAfterWarmUp) {
  Feed feed;
  for (int64_t step = 1; step <= 20; ++step) feed.step(step_of(step, 3.66, 1.0));
  feed.step(step_of(21, 9.17, 1.0));  // the SOTU CPU run's spike: 2.5x
  ASSERT_EQ(feed.warnings.size(), 1u);
  EXPECT_EQ(feed.warnings[0].first, 21);
  EXPECT_EQ(feed.warnings[0].second.kind, "loss_spike");
  EXPECT_EQ(feed.warnings[0].second.message, "loss 9.17 at step 21 is 2.5x the median 3.66 of the last 20 steps");

  // Just at the threshold (1.5x) is not a spike; just above it is.
  Feed edge;
  for (int64_t step = 1; step <= 20; ++step) edge.step(step_of(step, 2.0, 1.0));
  edge.step(step_of(21, 3.0, 1.0));
  EXPECT_TRUE(edge.warnings.empty());
  edge.step(step_of(22, 3.01, 1.0));
  EXPECT_EQ(edge.count("loss_spike"), 1u);
}

TEST(TrainingMonitor, NoSpikeJudgedDuringWarmUp) {
  Feed feed;
  for (int64_t step = 1; step <= 9; ++step) feed.step(step_of(step, 1.0, 1.0));
  feed.step(step_of(10, 50.0, 500.0));  // 9 values in the window: still warming up
  EXPECT_TRUE(feed.warnings.empty());
  feed.step(step_of(11, 50.0, 500.0));  // 10 values: judged (the median is still 1)
  EXPECT_EQ(feed.count("loss_spike"), 1u);
  EXPECT_EQ(feed.count("grad_norm_spike"), 1u);
}

TEST(TrainingMonitor, GradNormSpikeIgnoresSkippedSteps) {
  Feed feed;
  for (int64_t step = 1; step <= 20; ++step) feed.step(step_of(step, 3.0, 2.0));
  StepMetrics skipped = step_of(21, 3.0, 1e30);
  skipped.skipped = true;
  feed.step(skipped);
  StepMetrics not_finite = step_of(22, 3.0, std::numeric_limits<double>::infinity());
  feed.step(not_finite);
  EXPECT_TRUE(feed.warnings.empty());
  feed.step(step_of(23, 3.0, 112.0));
  ASSERT_EQ(feed.warnings.size(), 1u);
  EXPECT_EQ(feed.warnings[0].second.kind, "grad_norm_spike");
  EXPECT_EQ(feed.warnings[0].second.message,
            "grad norm 112 at step 23 is 56x the median 2 of the last 20 steps");
}

TEST(TrainingMonitor, SpikesInTheQuietPeriodAreToldOnceAfterIt) {
  Feed feed;
  for (int64_t step = 1; step <= 20; ++step) feed.step(step_of(step, 2.0, 1.0));
  // Spikes at 21 (warned), 25 and 30 (held back: within 20 steps of 21).
  for (int64_t step = 21; step <= 45; ++step)
    feed.step(step_of(step, step == 21 || step == 25 ? 8.0 : step == 30 ? 10.0 : 2.0, 1.0));
  ASSERT_EQ(feed.warnings.size(), 2u);
  EXPECT_EQ(feed.warnings[0].first, 21);
  EXPECT_EQ(feed.warnings[1].first, 41);  // the first step after the quiet period
  EXPECT_EQ(feed.warnings[1].second.kind, "loss_spike");
  EXPECT_EQ(feed.warnings[1].second.message,
            "loss: 2 spikes after the warning at step 21 (largest 10 at step 30, 5.0x its median)");
  // A spike right at the end of the quiet period carries the held ones in its line.
  Feed joined;
  for (int64_t step = 1; step <= 20; ++step) joined.step(step_of(step, 2.0, 1.0));
  joined.step(step_of(21, 8.0, 1.0));
  joined.step(step_of(22, 8.0, 1.0));
  for (int64_t step = 23; step <= 40; ++step) joined.step(step_of(step, 2.0, 1.0));
  joined.step(step_of(41, 9.0, 1.0));
  ASSERT_EQ(joined.warnings.size(), 2u);
  EXPECT_EQ(joined.warnings[1].second.message,
            "loss 9 at step 41 is 4.5x the median 2 of the last 20 steps; and 1 spike after the warning at step 21 "
            "(largest 8 at step 22, 4.0x its median)");
}

TEST(TrainingMonitor, CollapseAndIdleExpertsNamedPerLayerOnce) {
  Feed feed;
  // Layer 0 stays balanced; layer 1 sends everything to expert 2 from step 5 on.
  for (int64_t step = 1; step <= 80; ++step) {
    const std::vector<int64_t> collapsed = step < 5 ? std::vector<int64_t>{4, 4, 4, 4} : std::vector<int64_t>{0, 0, 16, 0};
    feed.step(step_of(step, 2.0, 1.0, {{4, 4, 4, 4}, collapsed}));
  }
  ASSERT_EQ(feed.warnings.size(), 2u) << "a collapse that lasts must be named once, not every step";
  EXPECT_EQ(feed.warnings[0].first, 12);  // steps 5..12: 8 of the last 10 steps
  EXPECT_EQ(feed.warnings[0].second.kind, "routing_collapse");
  EXPECT_EQ(feed.warnings[0].second.message,
            "MoE layer 1: at 8 of the 10 steps 3-12 one expert took at least 90% of the routed choices (expert 2 "
            "every time): router collapse");
  EXPECT_EQ(feed.warnings[1].first, 24);  // steps 5..24: 20 steps without tokens
  EXPECT_EQ(feed.warnings[1].second.kind, "idle_experts");
  EXPECT_EQ(feed.warnings[1].second.message,
            "MoE layer 1: experts 0, 1 and 3 (3 of 4) received no tokens in the last 20 steps (5-24)");
}

// A SOTU CPU run (configs/tiny-cpu.yaml, steps 1-41): a loss spike at step 21 and a
// grad norm of 113 at step 22, and from step 23 on each step's tokens go to one expert, a
// different one from step to step, which the 10-step router statistics average away.
TEST(TrainingMonitor, TheSotuRunsSpikeAndRotatingCollapse) {
  struct Row {
    int64_t step;
    double loss, grad_norm;
    std::vector<int64_t> counts;
  };
  const std::vector<Row> rows = {
      {1, 5.535, 1.90, {104, 204, 108, 96}}, {2, 5.499, 2.05, {79, 198, 93, 142}},
      {3, 5.426, 2.28, {62, 220, 92, 138}},  {4, 5.335, 2.21, {2, 239, 90, 181}},
      {5, 5.216, 2.16, {0, 304, 49, 159}},   {6, 5.129, 2.10, {0, 359, 65, 88}},
      {7, 5.033, 1.98, {0, 375, 86, 51}},    {8, 4.948, 1.90, {25, 279, 181, 27}},
      {9, 4.824, 1.99, {246, 4, 221, 41}},   {10, 4.703, 2.00, {66, 0, 0, 446}},
      {11, 4.600, 1.83, {167, 0, 0, 345}},   {12, 4.427, 1.86, {380, 0, 92, 40}},
      {13, 4.292, 1.76, {0, 0, 512, 0}},     {14, 4.116, 1.78, {0, 0, 503, 9}},
      {15, 3.969, 1.66, {0, 1, 2, 509}},     {16, 3.833, 1.48, {467, 1, 0, 44}},
      {17, 3.645, 1.52, {321, 0, 0, 191}},   {18, 3.554, 1.25, {0, 425, 0, 87}},
      {19, 3.476, 1.23, {0, 459, 22, 31}},   {20, 3.662, 3.18, {17, 48, 417, 30}},
      {21, 9.171, 9.50, {286, 206, 10, 10}}, {22, 7.925, 113.23, {229, 110, 95, 78}},
      {23, 3.159, 2.32, {13, 0, 476, 23}},   {24, 3.223, 0.70, {14, 0, 494, 4}},
      {25, 3.141, 2.88, {411, 3, 1, 97}},    {26, 3.024, 0.52, {0, 0, 0, 512}},
      {27, 3.185, 0.55, {512, 0, 0, 0}},     {28, 3.039, 0.36, {512, 0, 0, 0}},
      {29, 3.077, 0.33, {0, 507, 3, 2}},     {30, 3.037, 0.46, {0, 512, 0, 0}},
      {31, 3.269, 0.75, {1, 2, 2, 507}},     {32, 3.243, 1.21, {7, 4, 0, 501}},
      {33, 3.054, 0.51, {0, 0, 377, 135}},   {34, 2.975, 0.47, {0, 1, 511, 0}},
      {35, 2.949, 0.40, {0, 512, 0, 0}},     {36, 3.014, 0.41, {0, 33, 0, 479}},
      {37, 2.991, 0.46, {512, 0, 0, 0}},     {38, 3.041, 1.21, {508, 3, 1, 0}},
      {39, 3.237, 0.57, {2, 0, 510, 0}},     {40, 2.985, 0.47, {1, 0, 511, 0}},
      {41, 2.941, 0.44, {445, 0, 32, 35}}};
  Feed feed;
  for (const Row& row : rows) feed.step(step_of(row.step, row.loss, row.grad_norm, {row.counts}));
  std::vector<std::string> seen;
  for (const auto& entry : feed.warnings) seen.push_back(std::to_string(entry.first) + " " + entry.second.kind);
  const std::vector<std::string> expected = {"21 loss_spike", "21 grad_norm_spike",
                                             "22 grad_norm_spike",  // 58x after 5x: told at once
                                             "31 routing_collapse",
                                             "41 loss_spike"};  // step 22's 1.7x, held for the quiet period
  EXPECT_EQ(seen, expected);
  ASSERT_EQ(feed.warnings.size(), expected.size());
  EXPECT_EQ(feed.warnings[0].second.message, "loss 9.171 at step 21 is 2.0x the median 4.652 of the last 20 steps");
  EXPECT_EQ(feed.warnings[2].second.message, "grad norm 113.2 at step 22 is 58x the median 1.94 of the last 20 steps");
  EXPECT_EQ(feed.warnings[3].second.message,
            "MoE layer 0: at 8 of the 10 steps 22-31 one expert took at least 90% of the routed choices (busiest: "
            "experts 0, 1, 2 and 3 in turn): router collapse");
  EXPECT_EQ(feed.warnings[4].second.message,
            "loss: 1 spike after the warning at step 21 (largest 7.925 at step 22, 1.7x its median)");
}

TEST(TrainingMonitor, CollapseWithTopKAndItsEnd) {
  MonitorRules rules;
  rules.top_k = 2;
  rules.quiet_steps = 0;
  Feed feed(rules);
  // Two experts of 6 take everything (top-2 collapse) for 10 steps, then routing spreads out for
  // 10 steps (the collapse ends), then collapses again.
  for (int64_t step = 1; step <= 40; ++step) {
    const bool collapsed = step <= 10 || step > 20;
    feed.step(step_of(step, 2.0, 1.0, {collapsed ? std::vector<int64_t>{0, 50, 0, 0, 50, 1}
                                                 : std::vector<int64_t>{20, 20, 20, 20, 10, 10}}));
  }
  ASSERT_EQ(feed.count("routing_collapse"), 2u);
  EXPECT_EQ(feed.warnings[0].first, 8);
  EXPECT_EQ(feed.warnings[0].second.message,
            "MoE layer 0: at 8 of the 8 steps 1-8 the 2 busiest experts took at least 90% of the routed choices "
            "(experts 1 and 4 every time): router collapse");
  EXPECT_EQ(feed.warnings[1].first, 28);
  // Two experts of two with top-2 always take everything: nothing to say.
  Feed all(rules);
  for (int64_t step = 1; step <= 30; ++step) all.step(step_of(step, 2.0, 1.0, {{30, 34}}));
  EXPECT_TRUE(all.warnings.empty());
}

TEST(TrainingMonitor, IdleExpertsJoiningLaterWaitForTheQuietPeriod) {
  MonitorRules rules;
  rules.idle_steps = 10;
  Feed feed(rules);
  // Expert 3 is idle from step 1, expert 1 from step 6, expert 0 from step 40.
  for (int64_t step = 1; step <= 80; ++step) {
    std::vector<int64_t> counts = {step < 40 ? 5 : 0, step < 6 ? 5 : 0, 10, 0};
    feed.step(step_of(step, 2.0, 1.0, {counts}));
  }
  std::vector<std::pair<int64_t, TrainingWarning>> idle;
  for (const auto& entry : feed.warnings)
    if (entry.second.kind == "idle_experts") idle.push_back(entry);
  ASSERT_EQ(idle.size(), 3u);
  EXPECT_EQ(idle[0].first, 10);
  EXPECT_EQ(idle[0].second.message, "MoE layer 0: expert 3 (1 of 4) received no tokens in the last 10 steps (1-10)");
  // Expert 1 is idle for 10 steps at step 15, but the layer's last warning was at step 10.
  EXPECT_EQ(idle[1].first, 30);
  EXPECT_EQ(idle[1].second.message,
            "MoE layer 0: experts 1 and 3 (2 of 4) received no tokens in the last 25 steps (6-30)");
  EXPECT_EQ(idle[2].first, 50);
  EXPECT_NE(idle[2].second.message.find("experts 0, 1 and 3 (3 of 4)"), std::string::npos);
}

TEST(TrainingMonitor, RecoveredExpertIsNamedAgainWhenIdleAgain) {
  MonitorRules rules;
  rules.idle_steps = 3;
  rules.quiet_steps = 0;
  Feed feed(rules);
  for (int64_t step = 1; step <= 12; ++step) {
    const bool served = step == 6;  // expert 2 gets tokens once, at step 6
    feed.step(step_of(step, 2.0, 1.0, {{9, 3, served ? 1 : 0}}));
  }
  ASSERT_EQ(feed.warnings.size(), 2u);
  EXPECT_EQ(feed.warnings[0].first, 3);
  EXPECT_EQ(feed.warnings[1].first, 9);
  // A layer that routed nothing at a step says nothing about its experts.
  Feed empty(rules);
  for (int64_t step = 1; step <= 12; ++step) empty.step(step_of(step, 2.0, 1.0, {{0, 0}}));
  EXPECT_TRUE(empty.warnings.empty());
}

TEST(TrainingMonitor, RejectsRulesThatCannotWork) {
  MonitorRules rules;
  rules.warmup = 30;  // more than the window holds
  EXPECT_ANY_THROW(TrainingMonitor{rules});
  rules = MonitorRules();
  rules.loss_jump = 1.0;  // every step above its median would be a spike
  EXPECT_ANY_THROW(TrainingMonitor{rules});
  rules = MonitorRules();
  rules.collapse_steps = 11;  // more than the window holds
  EXPECT_ANY_THROW(TrainingMonitor{rules});
}

TEST(TrainingMonitor, WarningsInTheMetricsLineAndWindowsInTheProgressLine) {
  StepMetrics metrics = step_of(21, 9.17, 113.0);
  metrics.dropped_fraction = 0.6875;
  metrics.last_val_loss = 3.7;
  metrics.last_val_step = 20;
  metrics.warnings = {{"loss_spike", "loss \"9.17\" at step 21"}, {"grad_norm_spike", "grad norm 113"}};
  const json::Value parsed = json::parse(metrics_json(metrics), "metrics line");
  const json::Value* warnings = parsed.find("warnings");
  ASSERT_NE(warnings, nullptr);
  ASSERT_EQ(warnings->elements().size(), 2u);
  EXPECT_EQ(warnings->elements()[0].find("kind")->as_string("kind"), "loss_spike");
  EXPECT_EQ(warnings->elements()[0].find("message")->as_string("message"), "loss \"9.17\" at step 21");
  metrics.warnings.clear();
  EXPECT_EQ(metrics_json(metrics).find("warnings"), std::string::npos);  // only when there are some

  std::string line = format_progress_line(metrics, DeviceKind::cpu);
  EXPECT_NE(line.find("| dropped 68.75% (step) |"), std::string::npos) << line;
  EXPECT_NE(line.find("| val 3.7000 (step 20) |"), std::string::npos) << line;
  metrics.step = 20;
  metrics.has_val_loss = true;
  EXPECT_NE(format_progress_line(metrics, DeviceKind::cpu).find("| val 3.7000 |"), std::string::npos);

  RouterLayerStats layer;
  layer.load_imbalance = 1.54;
  layer.router_entropy_normalized = 0.71;
  metrics.router = {layer};
  metrics.router_first_step = 11;
  line = format_progress_line(metrics, DeviceKind::cpu);
  EXPECT_NE(line.find("| load max/mean 1.54 H 0.71 (steps 11-20) |"), std::string::npos) << line;
  EXPECT_NE(metrics_json(metrics).find("\"router_first_step\":11"), std::string::npos);
  metrics.router_first_step = 20;
  EXPECT_NE(format_progress_line(metrics, DeviceKind::cpu).find("H 0.71 (step) |"), std::string::npos);
}

}  // namespace
