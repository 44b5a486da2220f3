// MpiCommunicator: non-blocking MPI collectives completed under a deadline (see mpi_comm.h).
//
// all_to_all_v always goes through MPI_Ialltoallw: every rank must call the same collective, and
// each rank alone cannot know whether some other pair of ranks needs the large-count path. With
// alltoallw each peer's (count, byte displacement, datatype) triple is chosen locally: the plain
// element type when both fit in an int, otherwise one derived datatype that carries the offset
// and count in MPI_Aint; type signatures still match the peer's, which is all MPI requires.
#include "src/comm/mpi_comm.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <thread>

#include "src/core/mpi_check.h"

namespace switchyard {

namespace {
int64_t g_int_limit = INT_MAX;
int64_t g_chunk_elements = int64_t(1) << 30;

// Element-wise sums for the 16-bit float types: add in fp32, round back to nearest even.
void sum_bf16(void* input, void* inout, int* length, MPI_Datatype*) {
  const uint16_t* in = static_cast<const uint16_t*>(input);
  uint16_t* accumulator = static_cast<uint16_t*>(inout);
  for (int index = 0; index < *length; ++index) {
    float total = bits_float(uint32_t(in[index]) << 16) + bits_float(uint32_t(accumulator[index]) << 16);
    accumulator[index] = Bf16::from_float(total);
  }
}
void sum_f16(void* input, void* inout, int* length, MPI_Datatype*) {
  const uint16_t* in = static_cast<const uint16_t*>(input);
  uint16_t* accumulator = static_cast<uint16_t*>(inout);
  for (int index = 0; index < *length; ++index)
    accumulator[index] = Half::from_float(Half::to_float(in[index]) + Half::to_float(accumulator[index]));
}

MPI_Op sum_op(DType dtype) {
  // Created once, on first use; MPI_Finalize frees them.
  static MPI_Op bf16_sum = MPI_OP_NULL, f16_sum = MPI_OP_NULL;
  if (dtype == DType::bf16) {
    if (bf16_sum == MPI_OP_NULL) MPI_CHECK(MPI_Op_create(&sum_bf16, /*commute=*/1, &bf16_sum));
    return bf16_sum;
  }
  if (dtype == DType::f16) {
    if (f16_sum == MPI_OP_NULL) MPI_CHECK(MPI_Op_create(&sum_f16, /*commute=*/1, &f16_sum));
    return f16_sum;
  }
  return MPI_SUM;
}

bool fits_int(int64_t value) { return value >= 0 && value <= g_int_limit; }

// `count` elements of `base` starting `byte_offset` bytes into a buffer, as one datatype whose
// extent is exactly the data (so it also works as an all_gather block). Built as
// [chunk x quotient][base x remainder] so every int argument stays small.
MPI_Datatype make_large_block(int64_t count, DType dtype, int64_t byte_offset) {
  MPI_Datatype base = mpi_datatype(dtype);
  const int64_t element_bytes = int64_t(dtype_size(dtype));
  const int64_t quotient = count / g_chunk_elements, remainder = count % g_chunk_elements;
  SY_CHECK(quotient <= INT_MAX, "message of ", count, " elements is too large even for chunked datatypes");
  MPI_Datatype chunk = MPI_DATATYPE_NULL;
  MPI_CHECK(MPI_Type_contiguous(int(g_chunk_elements), base, &chunk));
  int block_lengths[2];
  MPI_Aint displacements[2];
  MPI_Datatype types[2];
  int blocks = 0;
  if (quotient > 0) {
    block_lengths[blocks] = int(quotient);
    displacements[blocks] = MPI_Aint(byte_offset);
    types[blocks++] = chunk;
  }
  if (remainder > 0) {
    block_lengths[blocks] = int(remainder);
    displacements[blocks] = MPI_Aint(byte_offset + quotient * g_chunk_elements * element_bytes);
    types[blocks++] = base;
  }
  MPI_Datatype structured = MPI_DATATYPE_NULL, block = MPI_DATATYPE_NULL;
  MPI_CHECK(MPI_Type_create_struct(blocks, block_lengths, displacements, types, &structured));
  // Pin lower bound and extent so alignment padding can never shift a neighbouring block.
  MPI_CHECK(MPI_Type_create_resized(structured, MPI_Aint(byte_offset), MPI_Aint(count * element_bytes), &block));
  MPI_CHECK(MPI_Type_commit(&block));
  MPI_CHECK(MPI_Type_free(&structured));
  MPI_CHECK(MPI_Type_free(&chunk));
  return block;
}

// Frees the derived datatypes of one call; MPI keeps them alive for operations still pending.
struct DerivedTypes {
  std::vector<MPI_Datatype> types;
  ~DerivedTypes() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (MPI_Datatype& type : types) MPI_Type_free(&type);
  }
};

void check_counts(const char* what, const std::vector<int64_t>& counts, const std::vector<int64_t>& offsets,
                  int size, const void* buffer) {
  SY_CHECK(int(counts.size()) == size && int(offsets.size()) == size, "all_to_all_v: ", what, " counts (",
           counts.size(), ") and offsets (", offsets.size(), ") must have one entry per rank (", size, ")");
  for (int peer = 0; peer < size; ++peer) {
    SY_CHECK(counts[peer] >= 0 && offsets[peer] >= 0, "all_to_all_v: negative ", what, " count ", counts[peer],
             " or offset ", offsets[peer], " for peer ", peer);
    SY_CHECK(counts[peer] == 0 || buffer != nullptr, "all_to_all_v: null ", what, " buffer with ", counts[peer],
             " elements for peer ", peer);
  }
}
}  // namespace

MPI_Datatype mpi_datatype(DType dtype) {
  switch (dtype) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::bf16:
    case DType::f16: return MPI_UINT16_T;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    case DType::u8: return MPI_UINT8_T;
  }
  SY_THROW("no MPI datatype for dtype ", int(dtype));
}

bool mpi_wait_until(std::vector<MPI_Request>& requests, double timeout_seconds) {
  if (requests.empty()) return true;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  // Spin for the first polls (small collectives finish in microseconds), then yield so that
  // oversubscribed ranks let their peers run. MPI makes progress only inside MPI_Test here.
  constexpr int64_t kSpinPolls = 2000;
  for (int64_t poll = 0;; ++poll) {
    int done = 0;
    MPI_CHECK(MPI_Testall(int(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE));
    if (done) return true;
    if (timeout_seconds > 0 && std::chrono::duration<double>(Clock::now() - start).count() > timeout_seconds)
      return false;
    if (poll >= kSpinPolls) std::this_thread::yield();
  }
}

std::string collective_timeout_message(const char* collective, const std::string& communicator_name,
                                       int group_rank, int group_size, double timeout_seconds) {
  return detail::concat("collective ", collective, " on communicator '", communicator_name, "' timed out after ",
                        timeout_seconds, " s at world rank ", process_rank(), " (rank ", group_rank, " of ",
                        group_size, " in '", communicator_name,
                        "'): a peer rank has probably failed or hung (parallel.collective_timeout_s sets the "
                        "limit)");
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds)
    : comm_(comm), name_(std::move(name)), timeout_seconds_(timeout_seconds) {
  SY_CHECK(comm_ != MPI_COMM_NULL, "MpiCommunicator '", name_, "' given MPI_COMM_NULL");
  MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized || comm_ == MPI_COMM_NULL) return;
  if (!abandoned_.empty()) {
    int done = 0;  // a timed-out collective may have finished meanwhile; nothing more can be done
    MPI_Testall(int(abandoned_.size()), abandoned_.data(), &done, MPI_STATUSES_IGNORE);
  }
  if (comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_SELF) MPI_Comm_free(&comm_);
}

void MpiCommunicator::abort() { aborted_ = true; }

void MpiCommunicator::check_usable(const char* collective) const {
  if (aborted_)
    SY_THROW("collective ", collective, " on communicator '", name_,
             "' refused: the communicator was aborted after an earlier failure or timeout");
}

void MpiCommunicator::wait(std::vector<MPI_Request>& requests, const char* collective) {
  if (mpi_wait_until(requests, timeout_seconds_)) return;
  for (MPI_Request request : requests)
    if (request != MPI_REQUEST_NULL) abandoned_.push_back(request);
  aborted_ = true;
  SY_THROW(collective_timeout_message(collective, name_, rank_, size_, timeout_seconds_));
}

void MpiCommunicator::all_to_all_v(const void* send, const std::vector<int64_t>& send_counts,
                                   const std::vector<int64_t>& send_offsets, void* recv,
                                   const std::vector<int64_t>& recv_counts,
                                   const std::vector<int64_t>& recv_offsets, DType dtype) {
  check_usable("all_to_all_v");
  check_counts("send", send_counts, send_offsets, size_, send);
  check_counts("recv", recv_counts, recv_offsets, size_, recv);
  const int64_t element_bytes = int64_t(dtype_size(dtype));
  const MPI_Datatype base = mpi_datatype(dtype);
  std::vector<int> counts[2], displacements[2];
  std::vector<MPI_Datatype> types[2];
  DerivedTypes derived;
  const std::vector<int64_t>* all_counts[2] = {&send_counts, &recv_counts};
  const std::vector<int64_t>* all_offsets[2] = {&send_offsets, &recv_offsets};
  for (int side = 0; side < 2; ++side) {
    counts[side].resize(size_);
    displacements[side].resize(size_);
    types[side].resize(size_);
    for (int peer = 0; peer < size_; ++peer) {
      const int64_t count = (*all_counts[side])[peer];
      const int64_t byte_offset = (*all_offsets[side])[peer] * element_bytes;
      if (fits_int(count) && fits_int(byte_offset)) {
        counts[side][peer] = int(count);
        displacements[side][peer] = count ? int(byte_offset) : 0;
        types[side][peer] = base;
      } else if (count == 0) {
        counts[side][peer] = 0;
        displacements[side][peer] = 0;
        types[side][peer] = base;
      } else {  // the offset travels inside the datatype, in MPI_Aint
        types[side][peer] = make_large_block(count, dtype, byte_offset);
        derived.types.push_back(types[side][peer]);
        counts[side][peer] = 1;
        displacements[side][peer] = 0;
      }
    }
  }
  std::vector<MPI_Request> requests(1, MPI_REQUEST_NULL);
  MPI_CHECK(MPI_Ialltoallw(send, counts[0].data(), displacements[0].data(), types[0].data(), recv,
                           counts[1].data(), displacements[1].data(), types[1].data(), comm_, &requests[0]));
  wait(requests, "all_to_all_v");
}

void MpiCommunicator::all_reduce_sum(void* data, int64_t count, DType dtype) {
  check_usable("all_reduce_sum");
  SY_CHECK(count >= 0 && (count == 0 || data), "all_reduce_sum: bad buffer (", data, ", ", count, " elements)");
  if (count == 0) return;  // every rank has the same count, so every rank returns here
  const MPI_Datatype type = mpi_datatype(dtype);
  const MPI_Op op = sum_op(dtype);
  const int64_t element_bytes = int64_t(dtype_size(dtype));
  // Reductions on derived datatypes need user ops, so large counts are split into chunks that
  // are all in flight at once (elements are independent).
  std::vector<MPI_Request> requests;
  for (int64_t begin = 0; begin < count; begin += g_int_limit) {
    const int64_t chunk = std::min<int64_t>(g_int_limit, count - begin);
    requests.push_back(MPI_REQUEST_NULL);
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, static_cast<char*>(data) + begin * element_bytes, int(chunk), type, op,
                             comm_, &requests.back()));
  }
  wait(requests, "all_reduce_sum");
}

void MpiCommunicator::all_gather(const void* send, void* recv, int64_t count_per_rank, DType dtype) {
  check_usable("all_gather");
  SY_CHECK(count_per_rank >= 0 && (count_per_rank == 0 || (send && recv)), "all_gather: bad buffers");
  if (count_per_rank == 0) return;
  const int64_t block_bytes = count_per_rank * int64_t(dtype_size(dtype));
  // The caller may pass recv's own block as send: MPI requires MPI_IN_PLACE for that.
  const void* source = send == static_cast<const char*>(recv) + rank_ * block_bytes ? MPI_IN_PLACE : send;
  std::vector<MPI_Request> requests(1, MPI_REQUEST_NULL);
  DerivedTypes derived;
  if (fits_int(count_per_rank) && fits_int(block_bytes)) {
    MPI_Datatype type = mpi_datatype(dtype);
    MPI_CHECK(MPI_Iallgather(source, int(count_per_rank), type, recv, int(count_per_rank), type, comm_,
                             &requests[0]));
  } else {
    MPI_Datatype block = make_large_block(count_per_rank, dtype, 0);
    derived.types.push_back(block);
    MPI_CHECK(MPI_Iallgather(source, 1, block, recv, 1, block, comm_, &requests[0]));
  }
  wait(requests, "all_gather");
}

void MpiCommunicator::broadcast(void* data, int64_t count, DType dtype, int root) {
  check_usable("broadcast");
  SY_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " outside communicator '", name_, "' of size ",
           size_);
  SY_CHECK(count >= 0 && (count == 0 || data), "broadcast: bad buffer");
  if (count == 0) return;
  const MPI_Datatype type = mpi_datatype(dtype);
  const int64_t element_bytes = int64_t(dtype_size(dtype));
  std::vector<MPI_Request> requests;
  for (int64_t begin = 0; begin < count; begin += g_int_limit) {
    const int64_t chunk = std::min<int64_t>(g_int_limit, count - begin);
    requests.push_back(MPI_REQUEST_NULL);
    MPI_CHECK(MPI_Ibcast(static_cast<char*>(data) + begin * element_bytes, int(chunk), type, root, comm_,
                         &requests.back()));
  }
  wait(requests, "broadcast");
}

void MpiCommunicator::barrier() {
  check_usable("barrier");
  std::vector<MPI_Request> requests(1, MPI_REQUEST_NULL);
  MPI_CHECK(MPI_Ibarrier(comm_, &requests[0]));
  wait(requests, "barrier");
}

namespace mpi_testing {
void set_large_count_limits(int64_t int_limit, int64_t chunk_elements) {
  SY_CHECK(int_limit >= 1 && int_limit <= INT_MAX && chunk_elements >= 1 && chunk_elements <= INT_MAX,
           "bad large-count limits ", int_limit, ", ", chunk_elements);
  g_int_limit = int_limit;
  g_chunk_elements = chunk_elements;
}
void reset_large_count_limits() {
  g_int_limit = INT_MAX;
  g_chunk_elements = int64_t(1) << 30;
}
}  // namespace mpi_testing

}  // namespace switchyard
