// HostReads (src/ops/host_reads.h).
#include "src/ops/host_reads.h"

#include <cstring>

#include "src/core/error.h"

namespace switchyard {

namespace {
constexpr size_t kAlignment = 16;
size_t aligned(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }
}  // namespace

void HostReads::add(const Tensor& source, const Tensor& destination) {
  SY_CHECK(source.device == device_, "HostReads: source ", source.describe(), " is not on ",
           device_kind_name(device_));
  SY_CHECK(destination.device == DeviceKind::cpu, "HostReads: destination ", destination.describe(),
           " is not host memory");
  SY_CHECK(source.dtype == destination.dtype && source.bytes() == destination.bytes(), "HostReads: source ",
           source.describe(), " and destination ", destination.describe(), " differ in dtype or size");
  reads_.emplace_back(source, destination);
}

void HostReads::read(const ExecContext& context) {
  // The pending list is forgotten however this ends (its destinations may not outlive a throw).
  std::vector<std::pair<Tensor, Tensor>> reads;
  reads.swap(reads_);
  SY_CHECK(context.device == device_, "HostReads::read: context is on ", device_kind_name(context.device),
           ", the reads on ", device_kind_name(device_));
  if (device_ == DeviceKind::cpu || reads.size() == 1) {
    for (auto& [source, destination] : reads) ops::copy(context, source, destination);
    return;
  }
  size_t total = 0;
  for (const auto& read : reads) total += aligned(read.first.bytes());
  if (total == 0) return;
  if (staging_.bytes() < total) staging_ = Buffer(device_, total);
  if (host_staging_.size() < total) host_staging_.resize(total);
  unsigned char* staging = static_cast<unsigned char*>(staging_.data());
  size_t at = 0;
  for (const auto& [source, destination] : reads) {  // device to device: enqueued, no wait
    Tensor part(staging + at, source.dtype, device_, {source.numel()});
    const Tensor flat(source.data, source.dtype, device_, {source.numel()});
    ops::copy(context, flat, part);
    at += aligned(source.bytes());
  }
  Tensor device_all(staging, DType::u8, device_, {int64_t(total)});
  Tensor host_all(host_staging_.data(), DType::u8, DeviceKind::cpu, {int64_t(total)});
  ops::copy(context, device_all, host_all);  // the one wait
  at = 0;
  for (auto& [source, destination] : reads) {
    std::memcpy(destination.data, host_staging_.data() + at, source.bytes());
    at += aligned(source.bytes());
  }
}

}  // namespace switchyard
