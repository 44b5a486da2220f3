// Process bootstrap, parallel groups, the guarded error path and fault injection (bootstrap.h).
//
// Group membership comes from ParallelLayout (src/comm/parallel_layout.h): each group is an
// MPI_Comm_split of the world with the group's index as color and the world rank as key, so that
// ranks keep their world order inside a group.
// MPI is initialised with MPI_THREAD_SERIALIZED: switchyard calls MPI from one thread at a time.
#include "src/comm/bootstrap.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "src/comm/comm_factory.h"
#include "src/comm/gpu_pick.h"
#include "src/comm/mpi_comm.h"
#include "src/core/device.h"
#include "src/core/environment.h"
#include "src/core/mpi_check.h"

namespace switchyard {

namespace {
ProcessContext g_context;
bool g_bootstrapped = false;
bool g_we_initialized_mpi = false;
// The collective timeout of the last create_parallel_groups; also bounds the barrier at exit.
double g_collective_timeout_s = 0;

std::mutex g_registry_mutex;
std::vector<Communicator*>& registry() {
  static std::vector<Communicator*>* communicators = new std::vector<Communicator*>();  // outlives statics
  return *communicators;
}

// Seconds the error path may take (abort NCCL, MPI_Abort) before the watchdog ends the process.
constexpr int kErrorPathWatchdogSeconds = 20;

std::string detect_launcher() {
  if (environment_value("OMPI_COMM_WORLD_SIZE")) return "mpirun";
  if (environment_value("SLURM_JOB_ID") && (environment_value("SLURM_PROCID") || environment_value("PMIX_RANK")))
    return "srun";
  return "single";
}

// The number of processes the launcher says it started, or -1 when it does not say.
int launcher_world_size(const std::string& launcher) {
  const char* value = nullptr;
  if (launcher == "mpirun") value = environment_value("OMPI_COMM_WORLD_SIZE");
  if (launcher == "srun") value = environment_value("SLURM_STEP_NUM_TASKS");
  return value ? std::atoi(value) : -1;
}

// The world rank before (or without) MPI: from the launcher's environment, -1 if unknown.
int rank_from_environment() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"})
    if (const char* value = environment_value(name)) return std::atoi(value);
  return -1;
}

int current_rank() {
  int rank = process_rank();
  return rank >= 0 ? rank : rank_from_environment();
}

std::string rank_text(int rank) { return rank >= 0 ? std::to_string(rank) : std::string("?"); }

// "src/comm/bootstrap.cpp" rather than the absolute path the compiler put into __FILE__.
std::string project_relative(const std::string& path) {
  size_t best = std::string::npos;
  for (const char* root : {"/src/", "/tests/"}) {
    size_t found = path.rfind(root);
    if (found != std::string::npos && (best == std::string::npos || found > best)) best = found;
  }
  return best == std::string::npos ? path : path.substr(best + 1);
}

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

void start_error_path_watchdog(int code) {
  try {
    std::thread([code] {
      std::this_thread::sleep_for(std::chrono::seconds(kErrorPathWatchdogSeconds));
      std::fprintf(stderr, "switchyard: error path did not finish within %d s on rank %s; exiting\n",
                   kErrorPathWatchdogSeconds, rank_text(current_rank()).c_str());
      std::fflush(stderr);
      std::_Exit(code);
    }).detach();
  } catch (...) {  // no thread: go on without the safety net
  }
}

// A barrier on MPI_COMM_WORLD that throws the standard timeout Error instead of waiting forever.
void world_barrier_with_timeout(const char* collective, double timeout_seconds) {
  std::vector<MPI_Request> arrival(1, MPI_REQUEST_NULL);
  MPI_CHECK(MPI_Ibarrier(MPI_COMM_WORLD, &arrival[0]));
  if (!mpi_wait_until(arrival, timeout_seconds)) {
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    SY_THROW(collective_timeout_message(collective, "world", rank, size, timeout_seconds));
  }
}

// Frees MPI communicators that were not handed to a Communicator (error in between).
struct PendingComms {
  std::vector<MPI_Comm*> comms;
  ~PendingComms() {
    if (!mpi_running()) return;
    for (MPI_Comm* comm : comms)
      if (*comm != MPI_COMM_NULL) MPI_Comm_free(comm);
  }
};
}  // namespace

namespace {
// Ranks that each see one GPU may still see the same one (mpirun -np 2 on a one-GPU machine);
// only the GPUs' PCI bus ids tell: every rank of the node compares its own with the others'.
void check_one_rank_per_gpu(int device) {
  constexpr int kBusIdBytes = 32;
  char own[kBusIdBytes] = {};
  const std::string bus_id = cuda_device_pci_bus_id(device);
  std::strncpy(own, bus_id.c_str(), kBusIdBytes - 1);
  MPI_Comm node_comm = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_context.world_rank, MPI_INFO_NULL,
                                &node_comm));
  std::vector<char> all(size_t(g_context.local_size) * kBusIdBytes);
  const int gathered = MPI_Allgather(own, kBusIdBytes, MPI_CHAR, all.data(), kBusIdBytes, MPI_CHAR, node_comm);
  MPI_Comm_free(&node_comm);
  MPI_CHECK(gathered);
  for (int other = 0; other < g_context.local_size; ++other) {
    if (other == g_context.local_rank || std::strncmp(all.data() + size_t(other) * kBusIdBytes, own, kBusIdBytes) != 0)
      continue;
    SY_BAD_INPUT("on ", process_host(), ": local ranks ", std::min(other, g_context.local_rank), " and ",
                 std::max(other, g_context.local_rank), " would share GPU ", bus_id, " (", g_context.local_size,
                 " ranks on this host, each seeing one GPU, but not each its own); NCCL needs one GPU per rank: start "
                 "at most as many ranks per host as it has GPUs, or give each its own (srun --gpus-per-task=1, "
                 "CUDA_VISIBLE_DEVICES)");
  }
}
}  // namespace

const ProcessContext& bootstrap_process(DeviceKind requested) {
  if (!g_bootstrapped) {
    ProcessContext context;
    context.launcher = detect_launcher();  // before MPI_Init, which may add OMPI_* variables
    int initialized = 0, finalized = 0;
    MPI_CHECK(MPI_Initialized(&initialized));
    MPI_CHECK(MPI_Finalized(&finalized));
    SY_CHECK(!finalized, "bootstrap_process called after MPI_Finalize");
    if (!initialized) {
      int provided = 0;
      MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
      g_we_initialized_mpi = true;
    }
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &context.world_rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &context.world_size));
    set_process_rank(context.world_rank);

    const int expected = launcher_world_size(context.launcher);
    if (expected > 0 && expected != context.world_size)
      SY_THROW("the launcher (", context.launcher, ") started ", expected, " processes but MPI sees a world of ",
               context.world_size, ": switchyard's MPI library does not match the launcher (an mpirun from another "
               "MPI installation, or srun without --mpi=pmix)");

    MPI_Comm node_comm = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, context.world_rank, MPI_INFO_NULL,
                                  &node_comm));
    MPI_CHECK(MPI_Comm_rank(node_comm, &context.local_rank));
    MPI_CHECK(MPI_Comm_size(node_comm, &context.local_size));
    MPI_CHECK(MPI_Comm_free(&node_comm));
    g_context = context;
    g_bootstrapped = true;
  }
  if (requested == DeviceKind::cuda && g_context.device != DeviceKind::cuda) {
    const int device_count = cuda_device_count();
    if (device_count == 0) {
#if defined(SWITCHYARD_WITH_CUDA)
      const char* visible = environment_value("CUDA_VISIBLE_DEVICES");
      SY_BAD_INPUT("device cuda was requested but no CUDA device is visible on ", process_host(),
                   " (CUDA_VISIBLE_DEVICES=", visible ? visible : "<unset>", "); use device: cpu");
#else
      SY_BAD_INPUT("device cuda was requested but this build of switchyard has no CUDA backend; use device: cpu");
#endif
    }
    const GpuPick pick = pick_gpu(g_context.local_rank, g_context.local_size, device_count);
    if (pick.device < 0) SY_BAD_INPUT("on ", process_host(), ": ", pick.problem);
    cuda_set_device(pick.device);
    check_one_rank_per_gpu(pick.device);
    g_context.gpu = pick.device;
    g_context.device = DeviceKind::cuda;
  }
  return g_context;
}

bool process_bootstrapped() { return g_bootstrapped; }

ParallelGroups create_parallel_groups(const ProcessContext& context, const ParallelLayout& layout,
                                      double collective_timeout_s, int ep_sm_budget) {
  SY_CHECK_INPUT(ep_sm_budget >= 0, "parallel.ep_sm_budget must be >= 0, got ", ep_sm_budget);
  SY_CHECK(g_bootstrapped, "create_parallel_groups before bootstrap_process");
  SY_CHECK(layout.world_size() == context.world_size, "create_parallel_groups: a layout of ", layout.world_size(),
           " ranks for a world of ", context.world_size);
  const RankPlacement placement = layout.placement(context.world_rank);
  if (context.device == DeviceKind::cuda) {
    // One GPU per rank was checked when bootstrap_process picked it (src/comm/gpu_pick.h).
    SY_CHECK(context.gpu >= 0, "create_parallel_groups on cuda without a selected GPU (call bootstrap_process(cuda))");
  }

  // Everyone must arrive before the (untimed) communicator constructors: a rank that crashed or
  // hangs before this point turns into a timeout here.
  g_collective_timeout_s = collective_timeout_s;
  world_barrier_with_timeout("barrier", collective_timeout_s);

  MPI_Comm world = MPI_COMM_NULL, expert_parallel = MPI_COMM_NULL, expert_data_parallel = MPI_COMM_NULL;
  PendingComms pending{{&world, &expert_parallel, &expert_data_parallel}};
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world));
  MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, placement.ep_group, context.world_rank, &expert_parallel));
  MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, placement.expert_dp_group, context.world_rank, &expert_data_parallel));

  ParallelGroups groups;
  groups.ep_size = layout.ep_size();
  // create_communicator owns the MPI communicator from the call on, whatever happens.
  auto take = [](MPI_Comm& comm) {
    MPI_Comm taken = comm;
    comm = MPI_COMM_NULL;
    return taken;
  };
  groups.world = create_communicator(context.device, take(world), "world", collective_timeout_s);
  groups.expert_parallel = create_communicator(context.device, take(expert_parallel), "expert_parallel",
                                               collective_timeout_s, ep_sm_budget);
  groups.expert_data_parallel =
      create_communicator(context.device, take(expert_data_parallel), "expert_data_parallel", collective_timeout_s);
  SY_CHECK(groups.expert_parallel->size() == layout.ep_size() && groups.expert_parallel->rank() == placement.ep_rank &&
               groups.expert_data_parallel->size() == layout.expert_dp_size() &&
               groups.expert_data_parallel->rank() == placement.expert_dp_rank,
           "parallel groups do not have the expected layout");
  if (layout.hierarchical()) {
    // Node groups: R consecutive ranks of the group; rails: one rank per node, at the same place.
    const int per_node = layout.ep_ranks_per_node();
    const int node = context.world_rank / per_node;
    const int rail = placement.ep_group * per_node + placement.ep_rank % per_node;
    MPI_Comm node_comm = MPI_COMM_NULL, rail_comm = MPI_COMM_NULL;
    PendingComms pending_levels{{&node_comm, &rail_comm}};
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, node, context.world_rank, &node_comm));
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, rail, context.world_rank, &rail_comm));
    groups.expert_parallel_node = create_communicator(context.device, take(node_comm), "expert_parallel_node",
                                                      collective_timeout_s, ep_sm_budget);
    groups.expert_parallel_rail = create_communicator(context.device, take(rail_comm), "expert_parallel_rail",
                                                      collective_timeout_s, ep_sm_budget);
    SY_CHECK(groups.expert_parallel_node->size() == per_node &&
                 groups.expert_parallel_rail->size() == layout.ep_nodes(),
             "hierarchical groups do not have the expected layout");
  }
  return groups;
}

ParallelGroups create_parallel_groups(const ProcessContext& context, int ep_size, double collective_timeout_s) {
  return create_parallel_groups(context, ParallelLayout(context.world_size, ep_size, /*num_experts=*/0),
                                collective_timeout_s);
}

int contiguous_ranks_per_node(const ProcessContext& context) {
  SY_CHECK(g_bootstrapped, "contiguous_ranks_per_node before bootstrap_process");
  const int block = context.world_rank % context.local_size == context.local_rank ? 1 : 0;
  int all_blocks = 0, smallest = 0, largest = 0;
  MPI_CHECK(MPI_Allreduce(&block, &all_blocks, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  MPI_CHECK(MPI_Allreduce(&context.local_size, &smallest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  MPI_CHECK(MPI_Allreduce(&context.local_size, &largest, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  return all_blocks == 1 && smallest == largest ? context.local_size : 0;
}

void register_for_abort(Communicator* communicator) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  registry().push_back(communicator);
}

void unregister_for_abort(Communicator* communicator) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto& communicators = registry();
  communicators.erase(std::remove(communicators.begin(), communicators.end(), communicator), communicators.end());
}

void abort_registered_communicators() noexcept {
  std::vector<Communicator*> communicators;
  {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    communicators = registry();
  }
  for (Communicator* communicator : communicators) {
    try {
      communicator->abort();
    } catch (...) {  // keep aborting the others
    }
  }
}

int run_guarded(const std::function<int()>& body) {
  int code = kExitFailure;
  std::string line;
  try {
    const int result = body();
    if (g_we_initialized_mpi && mpi_running()) {
      // MPI_Finalize waits for every rank without a limit; this barrier has one, so a rank that
      // hangs or never finishes fails the job instead of holding the others at exit forever.
      world_barrier_with_timeout("barrier (at exit, before MPI_Finalize)", g_collective_timeout_s);
      MPI_Finalize();
    }
    return result;
  } catch (const Error& error) {
    code = error.exit_code();
    line = detail::concat("[rank ", rank_text(error.rank() >= 0 ? error.rank() : rank_from_environment()), " on ",
                          error.host(), ", ", project_relative(error.file()), ":", error.line(), "] ",
                          error.message());
  } catch (const std::exception& error) {
    line = detail::concat("[rank ", rank_text(current_rank()), " on ", process_host(), "] ", error.what());
  } catch (...) {
    line = detail::concat("[rank ", rank_text(current_rank()), " on ", process_host(), "] unknown exception");
  }
  if (code == kExitOk) code = kExitFailure;  // an Error must never look like success
  std::fprintf(stderr, "switchyard: error: %s\n", line.c_str());
  std::fflush(stderr);
  start_error_path_watchdog(code);
  abort_registered_communicators();
  if (mpi_running()) {
    int world_size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (world_size > 1) MPI_Abort(MPI_COMM_WORLD, code);  // ends every rank of the job
    if (g_we_initialized_mpi) MPI_Finalize();
  }
  return code;
}

void inject_fault_point(const char* point) {
  // Read here at each point, not parsed into switches() at start-up: a per-call test hook that
  // tests change between calls (src/core/switches.h says why).
  const char* spec = environment_value("SWITCHYARD_INJECT_FAULT");
  if (!spec) return;
  std::vector<std::string> fields;
  std::string field;
  for (const char* cursor = spec;; ++cursor) {
    if (*cursor == ':' || *cursor == '\0') {
      fields.push_back(field);
      field.clear();
      if (*cursor == '\0') break;
    } else {
      field += *cursor;
    }
  }
  const bool rank_ok = fields.size() >= 2 && (fields[0] == "*" || (!fields[0].empty() &&
                       fields[0].find_first_not_of("0123456789") == std::string::npos));
  const bool action_ok =
      fields.size() < 3 || fields[2] == "hang" || fields[2] == "sigterm" || fields[2] == "sigusr1";
  if (!rank_ok || fields.size() > 3 || fields[1].empty() || !action_ok)
    SY_BAD_INPUT("SWITCHYARD_INJECT_FAULT='", spec,
                 "': expected <rank>:<point> or <rank>:<point>:hang|sigterm|sigusr1");
  if (fields[1] != point) return;
  const int rank = current_rank();
  if (fields[0] != "*" && std::atoi(fields[0].c_str()) != rank) return;
  if (fields.size() == 3 && fields[2] != "hang") {  // a preemption signal to itself, at a known point
    std::raise(fields[2] == "sigterm" ? SIGTERM : SIGUSR1);
    return;
  }
  if (fields.size() == 3) {
    std::fprintf(stderr, "switchyard: rank %s stops participating at %s (SWITCHYARD_INJECT_FAULT=%s)\n",
                 rank_text(rank).c_str(), point, spec);
    std::fflush(stderr);
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));  // until the job is killed
  }
  SY_THROW("injected fault at ", point, " (SWITCHYARD_INJECT_FAULT=", spec, ")");
}

}  // namespace switchyard
