#pragma once
// Every SWITCHYARD_* switch, parsed once per process into one struct. Configs hold everything that
// changes results; these switch implementations (for comparisons and for machines where a default
// does not fit). `switchyard` parses them before it runs any subcommand (src/cli/main.cpp), so a
// bad value ends the run at once with exit 2, naming the variable, the value and the choices; the
// layers read fields of switches(), never the environment. Unset and empty mean the default.
//
//   variable                       values (default first)     field: what it does
//   SWITCHYARD_ATTENTION           auto | cudnn |             attention: auto: cuDNN fused attention (its backward
//                                  cudnn-nondeterministic |   deterministic as parallel.deterministic says) where it
//                                  cublas                     can run, else the cuBLAS + softmax path; cudnn: cuDNN or
//                                                             an error; cudnn-nondeterministic: as cudnn with the
//                                                             atomic dQ backward always; cublas: never cuDNN
//                                                             (src/ops/cuda/attention_cudnn.h)
//   SWITCHYARD_GROUPED_GEMM        auto | cublas              grouped_gemm: cublas forces the per-expert cuBLAS loop
//                                                             instead of the sm_90a grouped GEMM (src/ops/moe_ops.h)
//   SWITCHYARD_FUSED_ACTIVATION    1 | 0                      fused_activation: the expert activation runs in the
//                                                             sm_90a grouped GEMM epilogues; 0: separate kernels
//   SWITCHYARD_SM90_GEMM           pipelined | basic          sm90_gemm: variant of the sm_90a grouped GEMM
//   SWITCHYARD_SM90_STORE          warps | tma | direct       sm90_store: epilogue stores of the pipelined kernels
//   SWITCHYARD_SM90_SCHEDULE       auto | cooperative |       sm90_schedule: how the two consumer warpgroups of the
//                                  pingpong                   forward kernels share work
//   SWITCHYARD_SM90_MULTICAST      auto | off | pair          sm90_multicast: weight-grad CTA pairs sharing A by TMA
//                                                             multicast
//   SWITCHYARD_SM90_SKIP_PADDING   1 | 0                      sm90_skip_padding: the MoE layer passes its padding
//                                                             marks, so the kernels skip rows that are only padding
//                 (the four SWITCHYARD_SM90_* enums: src/ops/cuda/sm90/grouped_gemm_sm90.h, Options)
//   SWITCHYARD_NCCL_BLOCKING       1 | 0                      nccl_blocking: blocking NCCL communicators, every
//                                                             connection made at creation under a watchdog; 0:
//                                                             non-blocking (~75 us more per collective;
//                                                             src/comm/nccl_comm.h)
//   SWITCHYARD_SMALL_BATCH_TOKENS  8 | any integer N >= 0     small_batch_tokens: inference forwards of at most N
//                                                             tokens take the small-batch expert kernels; 0: off
//                                                             (src/model/moe_layer.h)
//   SWITCHYARD_SHARED_EXPERT_STREAM 1 | 0                     shared_expert_stream: CUDA runs the shared experts on a
//                                                             second stream, overlapping the routed layer; 0: in
//                                                             sequence on the compute stream (src/model/transformer.h)
//
// Not here: SWITCHYARD_INJECT_FAULT=<rank>:<point>[:hang|sigterm|sigusr1], a testing aid for the
// whole-program failure tests (src/comm/bootstrap.h, inject_fault_point). It is read and checked
// at each fault point, not at start-up, because tests set and change it within one process
// between calls (tests/comm/mpi/test_groups.cpp); it changes no computation.
#include <cstdint>
#include <string>

namespace switchyard {

enum class AttentionPath { automatic, cudnn, cudnn_nondeterministic, cublas };
enum class GroupedGemmPath : uint8_t { automatic, cublas };
// What each value does: src/ops/cuda/sm90/grouped_gemm_sm90.h (Variant, Store, Schedule, Multicast).
enum class Sm90Variant : uint8_t { pipelined, basic };
enum class Sm90Store : uint8_t { tma, direct, warps };
enum class Sm90Schedule : uint8_t { automatic, cooperative, pingpong };
enum class Sm90Multicast : uint8_t { automatic, off, pair };

// The defaults are those of an unset environment (a constant expression: Switches{}.field).
struct Switches {
  AttentionPath attention = AttentionPath::automatic;         // SWITCHYARD_ATTENTION
  GroupedGemmPath grouped_gemm = GroupedGemmPath::automatic;  // SWITCHYARD_GROUPED_GEMM
  bool fused_activation = true;                               // SWITCHYARD_FUSED_ACTIVATION
  Sm90Variant sm90_gemm = Sm90Variant::pipelined;             // SWITCHYARD_SM90_GEMM
  Sm90Store sm90_store = Sm90Store::warps;                    // SWITCHYARD_SM90_STORE
  Sm90Schedule sm90_schedule = Sm90Schedule::automatic;       // SWITCHYARD_SM90_SCHEDULE
  Sm90Multicast sm90_multicast = Sm90Multicast::automatic;    // SWITCHYARD_SM90_MULTICAST
  bool sm90_skip_padding = true;                              // SWITCHYARD_SM90_SKIP_PADDING
  bool nccl_blocking = true;                                  // SWITCHYARD_NCCL_BLOCKING
  int64_t small_batch_tokens = 8;                             // SWITCHYARD_SMALL_BATCH_TOKENS
  bool shared_expert_stream = true;                           // SWITCHYARD_SHARED_EXPERT_STREAM
};

// The switches as the environment sets them now; a bad value throws bad input (exit 2) naming the
// variable, the value and the choices.
Switches parse_switches();

// The process-wide switches: parse_switches() on the first call (src/cli/main.cpp makes that call
// at start-up), the same values after, unless a ScopedSwitches is alive. A field read after the
// first call: cheap enough for every kernel launch.
const Switches& switches();

// Makes switches() return `replacement` while it lives, for tests and benchmarks that need several
// values of a switch in one process (a later setenv does not reach switches()). Scopes nest and
// must end in reverse order; not for use while other threads read the switches.
//   Switches cublas = switches();
//   cublas.grouped_gemm = GroupedGemmPath::cublas;
//   ScopedSwitches scope(cublas);
class ScopedSwitches {
 public:
  explicit ScopedSwitches(const Switches& replacement);
  ~ScopedSwitches();
  ScopedSwitches(const ScopedSwitches&) = delete;
  ScopedSwitches& operator=(const ScopedSwitches&) = delete;

 private:
  Switches replacement_;
  const Switches* previous_;
};

// One line for run headers: "switches: SWITCHYARD_ATTENTION=auto SWITCHYARD_GROUPED_GEMM=auto ..."
// with every switch's value as the environment spells it.
std::string describe_switches(const Switches& values = switches());

// Each value as the environment spells it ("auto", "cudnn-nondeterministic", "warps", ...).
const char* switch_text(AttentionPath value);
const char* switch_text(GroupedGemmPath value);
const char* switch_text(Sm90Variant value);
const char* switch_text(Sm90Store value);
const char* switch_text(Sm90Schedule value);
const char* switch_text(Sm90Multicast value);

// SWITCHYARD_ATTENTION's value for `text` as parse_switches reads it (empty: auto); anything else
// is bad input naming the variable and the choices.
AttentionPath attention_path_from_text(const std::string& text);

}  // namespace switchyard
