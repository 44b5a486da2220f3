// XXH64 and FNV-1a 64 (src/train/checkpoint_checksum.h).
//
// XXH64 in short: 32-byte stripes feed four 64-bit lanes (acc = rotl(acc + lane * P2, 31) * P1);
// the lanes merge into one value, the length is added, the tail is mixed in 8-, 4- and 1-byte
// steps, and a final avalanche spreads every bit. Input words are read little-endian.
#include "src/train/checkpoint_checksum.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace switchyard {
namespace {

constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kPrime3 = 0x165667B19E3779F9ull;
constexpr uint64_t kPrime4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kPrime5 = 0x27D4EB2F165667C5ull;

inline uint64_t rotate_left(uint64_t value, int bits) { return (value << bits) | (value >> (64 - bits)); }

// Little-endian loads (memcpy: no alignment assumption; the byte swap only on big-endian hosts).
inline uint64_t load64(const uint8_t* input) {
  uint64_t value;
  std::memcpy(&value, input, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  value = __builtin_bswap64(value);
#endif
  return value;
}
inline uint32_t load32(const uint8_t* input) {
  uint32_t value;
  std::memcpy(&value, input, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  value = __builtin_bswap32(value);
#endif
  return value;
}

inline uint64_t lane_round(uint64_t accumulator, uint64_t lane) {
  accumulator += lane * kPrime2;
  return rotate_left(accumulator, 31) * kPrime1;
}

inline uint64_t merge_round(uint64_t accumulator, uint64_t lane) {
  accumulator ^= lane_round(0, lane);
  return accumulator * kPrime1 + kPrime4;
}

}  // namespace

uint64_t xxh64(const void* data, size_t bytes, uint64_t seed) {
  const uint8_t* input = static_cast<const uint8_t*>(data);
  const uint8_t* const end = input + bytes;
  uint64_t hash;
  if (bytes >= 32) {
    uint64_t lane1 = seed + kPrime1 + kPrime2, lane2 = seed + kPrime2, lane3 = seed, lane4 = seed - kPrime1;
    const uint8_t* const last_stripe = end - 32;
    do {
      lane1 = lane_round(lane1, load64(input));
      lane2 = lane_round(lane2, load64(input + 8));
      lane3 = lane_round(lane3, load64(input + 16));
      lane4 = lane_round(lane4, load64(input + 24));
      input += 32;
    } while (input <= last_stripe);
    hash = rotate_left(lane1, 1) + rotate_left(lane2, 7) + rotate_left(lane3, 12) + rotate_left(lane4, 18);
    hash = merge_round(hash, lane1);
    hash = merge_round(hash, lane2);
    hash = merge_round(hash, lane3);
    hash = merge_round(hash, lane4);
  } else {
    hash = seed + kPrime5;
  }
  hash += uint64_t(bytes);
  for (; input + 8 <= end; input += 8) {
    hash ^= lane_round(0, load64(input));
    hash = rotate_left(hash, 27) * kPrime1 + kPrime4;
  }
  if (input + 4 <= end) {
    hash ^= uint64_t(load32(input)) * kPrime1;
    hash = rotate_left(hash, 23) * kPrime2 + kPrime3;
    input += 4;
  }
  for (; input < end; ++input) {
    hash ^= uint64_t(*input) * kPrime5;
    hash = rotate_left(hash, 11) * kPrime1;
  }
  hash ^= hash >> 33;
  hash *= kPrime2;
  hash ^= hash >> 29;
  hash *= kPrime3;
  hash ^= hash >> 32;
  return hash;
}

void Fnv1a64::update(const void* data, size_t bytes) {
  const uint8_t* input = static_cast<const uint8_t*>(data);
  uint64_t hash = hash_;
  for (size_t index = 0; index < bytes; ++index) {
    hash ^= input[index];
    hash *= 1099511628211ull;
  }
  hash_ = hash;
}

uint64_t fnv1a64(const void* data, size_t bytes) {
  Fnv1a64 hash;
  hash.update(data, bytes);
  return hash.value();
}

std::string checksum_hex(uint64_t checksum) {
  char buffer[17];
  std::snprintf(buffer, sizeof(buffer), "%016llx", static_cast<unsigned long long>(checksum));
  return buffer;
}

bool parse_checksum_hex(const std::string& text, uint64_t* checksum) {
  if (text.size() != 16 || text.find_first_not_of("0123456789abcdef") != std::string::npos) return false;
  *checksum = std::strtoull(text.c_str(), nullptr, 16);
  return true;
}

}  // namespace switchyard
