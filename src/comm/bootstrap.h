// Process bootstrap, parallel groups and the one error path every command runs under.
//
//   int main(int argc, char** argv) {
//     return run_guarded([&] {
//       const ProcessContext& context = bootstrap_process(DeviceKind::cuda);  // MPI up, GPU picked
//       inject_fault_point("after_bootstrap");
//       const ParallelLayout layout(context.world_size, ep_size, num_experts);  // checks the split
//       ParallelGroups groups = create_parallel_groups(context, layout, timeout_seconds);
//       ...
//       return 0;
//     });
//   }
//
// Launchers: mpirun (Open MPI sets OMPI_COMM_WORLD_SIZE), srun (SLURM_PROCID or PMIX_RANK with
// SLURM_JOB_ID) or none: a plain process runs as an MPI singleton of world size 1.
#pragma once

#include <functional>
#include <string>

#include "src/comm/communicator.h"
#include "src/comm/parallel_layout.h"
#include "src/core/tensor.h"

namespace switchyard {

struct ProcessContext {
  int world_rank = 0, world_size = 1, local_rank = 0, local_size = 1;  // local = ranks on this node
  std::string launcher;  // "mpirun" | "srun" | "single"
  DeviceKind device = DeviceKind::cpu;
  int gpu = -1;  // CUDA ordinal when device == cuda
};

// Initialises MPI (MPI_Init_thread; an MPI already initialised by someone else is kept and not
// finalised by us), sets MPI_ERRORS_RETURN on MPI_COMM_WORLD, stamps Errors with the world rank,
// finds the node-local rank (MPI_Comm_split_type SHARED) and, for `requested == cuda`, selects
// its GPU by pick_gpu (src/comm/gpu_pick.h: the only visible GPU, else GPU local_rank;
// SY_BAD_INPUT when there is none or more local ranks than visible GPUs).
// Idempotent: later calls return the same context. A later call asking for cuda after a cpu one
// selects the GPU then (the context's device becomes cuda); asking for cpu never drops a GPU.
const ProcessContext& bootstrap_process(DeviceKind requested);
// True once bootstrap_process has run in this process.
bool process_bootstrapped();

// Builds the world / expert_parallel / expert_data_parallel communicators (src/comm/communicator.h)
// with the membership of `layout` (src/comm/parallel_layout.h), whose world size must be the
// context's: MPI communicators when context.device == cpu, NCCL communicators (each with its own
// stream) when it is cuda. Every rank of the world must call it. It starts with a barrier on the
// world under `collective_timeout_s` (<= 0: no limit), so a rank that never arrives (crashed or
// hung before this point) ends the job with a timeout Error naming "barrier" and "world" instead
// of hanging in communicator creation. Every collective of the returned communicators uses the
// same timeout. `ep_sm_budget` (parallel.ep_sm_budget; 0 = none): on CUDA, the expert-parallel
// communicators (expert_parallel and its node and rail groups) are created with NCCL's maxCTAs
// at that (at most NCCL's channel limit), so that their all-to-alls leave the other SMs to the
// experts' GEMMs; the others keep NCCL's defaults. MPI communicators ignore it.
ParallelGroups create_parallel_groups(const ProcessContext& context, const ParallelLayout& layout,
                                      double collective_timeout_s, int ep_sm_budget = 0);
// The same for callers that place no experts (collective benchmarks, tests): the layout of
// (context.world_size, ep_size, no experts); SY_BAD_INPUT before any communication when ep_size
// does not divide the world size.
ParallelGroups create_parallel_groups(const ProcessContext& context, int ep_size, double collective_timeout_s);

// The ranks per node when every node holds one contiguous block of world ranks and all blocks have
// the same size (mpirun's and srun's default block placement), else 0: what
// parallel.ranks_per_node = 0 means. Collective over the world (two small all-reduces).
int contiguous_ranks_per_node(const ProcessContext& context);

// Runs `body` and returns its exit code. On a switchyard::Error (its exit code), std::exception
// (exit 1) or anything else (exit 1) it prints exactly one line to stderr:
//   switchyard: error: [rank R on HOST, file:line] message
// aborts every registered communicator, and, when MPI is up with more than one rank, calls
// MPI_Abort(MPI_COMM_WORLD, code) so that one failing rank ends the whole job promptly. A
// watchdog ends the process if any of that blocks (ncclCommAbort has been known to), so the
// error path never hangs. On success, when bootstrap_process initialised MPI, all ranks meet in a
// world barrier under the last collective timeout given to create_parallel_groups (a rank that
// hangs fails the job there instead of holding the others in MPI_Finalize forever), then MPI is
// finalised.
int run_guarded(const std::function<int()>& body);

// Testing aid for whole-program failure tests. When the environment variable
// SWITCHYARD_INJECT_FAULT is "<rank>:<point>" and this process is world rank <rank> (or <rank>
// is "*") at `point`, throws an Error "injected fault at <point>"; with "<rank>:<point>:hang"
// that rank instead stops participating (sleeps until killed), which its peers must detect
// through their collective timeout. Unset: does nothing (one getenv per call).
void inject_fault_point(const char* point);

// Communicators whose peers can block the host or the GPU (NCCL) register here so that the
// error path can abort them; they unregister in their destructors. Thread-safe.
void register_for_abort(Communicator* communicator);
void unregister_for_abort(Communicator* communicator);
// Calls abort() on every registered communicator; never throws.
void abort_registered_communicators() noexcept;

}  // namespace switchyard
