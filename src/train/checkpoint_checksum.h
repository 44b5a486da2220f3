// Checksums of checkpoint data.
//
// XXH64 (xxHash, 64-bit, seed 0; https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
// guards every checkpoint tensor and, through the COMPLETE marker, the manifest: it catches
// truncation, flipped bytes and swapped or stale files at several GB/s per core, so verifying a
// checkpoint costs little next to reading it. (It is not meant to resist deliberate tampering.)
// FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3, one byte at a time, well under
// 1 GB/s) is the checksum of the older final.weights format (src/train/weights_file.h).
// Both are written as 16 lower-case hex digits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace switchyard {

uint64_t xxh64(const void* data, size_t bytes, uint64_t seed = 0);

// FNV-1a 64, incrementally.
class Fnv1a64 {
 public:
  void update(const void* data, size_t bytes);
  uint64_t value() const { return hash_; }

 private:
  uint64_t hash_ = 14695981039346656037ull;
};
uint64_t fnv1a64(const void* data, size_t bytes);

std::string checksum_hex(uint64_t checksum);  // 16 lower-case hex digits
bool parse_checksum_hex(const std::string& text, uint64_t* checksum);

}  // namespace switchyard
