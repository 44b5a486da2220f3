// The SWITCHYARD_* switches (src/core/switches.h): one table of spellings per enum, shared by the
// parser and describe_switches.
#include "src/core/switches.h"

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <utility>

#include "src/core/environment.h"

namespace switchyard {
namespace {

// Default first: the bad-input message lists them in this order.
const std::pair<const char*, AttentionPath> kAttentionPaths[] = {{"auto", AttentionPath::automatic},
                                                                 {"cudnn", AttentionPath::cudnn},
                                                                 {"cudnn-nondeterministic",
                                                                  AttentionPath::cudnn_nondeterministic},
                                                                 {"cublas", AttentionPath::cublas}};
const std::pair<const char*, GroupedGemmPath> kGroupedGemmPaths[] = {{"auto", GroupedGemmPath::automatic},
                                                                     {"cublas", GroupedGemmPath::cublas}};
const std::pair<const char*, Sm90Variant> kSm90Variants[] = {{"pipelined", Sm90Variant::pipelined},
                                                             {"basic", Sm90Variant::basic}};
const std::pair<const char*, Sm90Store> kSm90Stores[] = {
    {"warps", Sm90Store::warps}, {"tma", Sm90Store::tma}, {"direct", Sm90Store::direct}};
const std::pair<const char*, Sm90Schedule> kSm90Schedules[] = {{"auto", Sm90Schedule::automatic},
                                                               {"cooperative", Sm90Schedule::cooperative},
                                                               {"pingpong", Sm90Schedule::pingpong}};
const std::pair<const char*, Sm90Multicast> kSm90Multicasts[] = {
    {"auto", Sm90Multicast::automatic}, {"off", Sm90Multicast::off}, {"pair", Sm90Multicast::pair}};
const std::pair<const char*, bool> kOneOrZero[] = {{"1", true}, {"0", false}};

template <typename Value, size_t N>
const char* spelling_of(const std::pair<const char*, Value> (&spellings)[N], Value value) {
  for (const auto& [text, choice] : spellings)
    if (choice == value) return text;
  return "?";
}

// Sets `field` from `variable` when that is set; keeps the default otherwise.
template <typename Value, size_t N>
void read_choice(const char* variable, const std::pair<const char*, Value> (&spellings)[N], Value& field) {
  if (const char* text = environment_value(variable)) field = choice_from_text<Value>(variable, text, spellings);
}

// A decimal integer >= 0 (no sign, no spaces), as SWITCHYARD_SMALL_BATCH_TOKENS takes it.
void read_count(const char* variable, int64_t& field) {
  const char* text = environment_value(variable);
  if (text == nullptr) return;
  char* end = nullptr;
  errno = 0;
  const long long parsed = std::strtoll(text, &end, 10);
  SY_CHECK_INPUT(std::isdigit(static_cast<unsigned char>(text[0])) && errno == 0 && *end == '\0',
                 variable, " must be a non-negative integer (0: off), got '", text, "'");
  field = int64_t(parsed);
}

// The ScopedSwitches in force (innermost), or nullptr for the environment's.
std::atomic<const Switches*> g_scoped_switches{nullptr};

}  // namespace

Switches parse_switches() {
  Switches parsed;
  read_choice("SWITCHYARD_ATTENTION", kAttentionPaths, parsed.attention);
  read_choice("SWITCHYARD_GROUPED_GEMM", kGroupedGemmPaths, parsed.grouped_gemm);
  read_choice("SWITCHYARD_FUSED_ACTIVATION", kOneOrZero, parsed.fused_activation);
  read_choice("SWITCHYARD_SM90_GEMM", kSm90Variants, parsed.sm90_gemm);
  read_choice("SWITCHYARD_SM90_STORE", kSm90Stores, parsed.sm90_store);
  read_choice("SWITCHYARD_SM90_SCHEDULE", kSm90Schedules, parsed.sm90_schedule);
  read_choice("SWITCHYARD_SM90_MULTICAST", kSm90Multicasts, parsed.sm90_multicast);
  read_choice("SWITCHYARD_SM90_SKIP_PADDING", kOneOrZero, parsed.sm90_skip_padding);
  read_choice("SWITCHYARD_NCCL_BLOCKING", kOneOrZero, parsed.nccl_blocking);
  read_count("SWITCHYARD_SMALL_BATCH_TOKENS", parsed.small_batch_tokens);
  read_choice("SWITCHYARD_SHARED_EXPERT_STREAM", kOneOrZero, parsed.shared_expert_stream);
  return parsed;
}

const Switches& switches() {
  if (const Switches* scoped = g_scoped_switches.load(std::memory_order_acquire)) return *scoped;
  static const Switches from_environment = parse_switches();  // a throw leaves it for the next call
  return from_environment;
}

ScopedSwitches::ScopedSwitches(const Switches& replacement)
    : replacement_(replacement), previous_(g_scoped_switches.load(std::memory_order_acquire)) {
  g_scoped_switches.store(&replacement_, std::memory_order_release);
}

ScopedSwitches::~ScopedSwitches() { g_scoped_switches.store(previous_, std::memory_order_release); }

std::string describe_switches(const Switches& values) {
  auto one_or_zero = [](bool value) { return spelling_of(kOneOrZero, value); };
  return std::string("switches:") + " SWITCHYARD_ATTENTION=" + switch_text(values.attention) +
         " SWITCHYARD_GROUPED_GEMM=" + switch_text(values.grouped_gemm) +
         " SWITCHYARD_FUSED_ACTIVATION=" + one_or_zero(values.fused_activation) +
         " SWITCHYARD_SM90_GEMM=" + switch_text(values.sm90_gemm) +
         " SWITCHYARD_SM90_STORE=" + switch_text(values.sm90_store) +
         " SWITCHYARD_SM90_SCHEDULE=" + switch_text(values.sm90_schedule) +
         " SWITCHYARD_SM90_MULTICAST=" + switch_text(values.sm90_multicast) +
         " SWITCHYARD_SM90_SKIP_PADDING=" + one_or_zero(values.sm90_skip_padding) +
         " SWITCHYARD_NCCL_BLOCKING=" + one_or_zero(values.nccl_blocking) +
         " SWITCHYARD_SMALL_BATCH_TOKENS=" + std::to_string(values.small_batch_tokens) +
         " SWITCHYARD_SHARED_EXPERT_STREAM=" + one_or_zero(values.shared_expert_stream);
}

const char* switch_text(AttentionPath value) { return spelling_of(kAttentionPaths, value); }
const char* switch_text(GroupedGemmPath value) { return spelling_of(kGroupedGemmPaths, value); }
const char* switch_text(Sm90Variant value) { return spelling_of(kSm90Variants, value); }
const char* switch_text(Sm90Store value) { return spelling_of(kSm90Stores, value); }
const char* switch_text(Sm90Schedule value) { return spelling_of(kSm90Schedules, value); }
const char* switch_text(Sm90Multicast value) { return spelling_of(kSm90Multicasts, value); }

AttentionPath attention_path_from_text(const std::string& text) {
  if (text.empty()) return Switches{}.attention;
  return choice_from_text<AttentionPath>("SWITCHYARD_ATTENTION", text.c_str(), kAttentionPaths);
}

}  // namespace switchyard
