// Random sender routings for the hierarchical-exchange op tests (CPU and CUDA): distinct expert
// ids per token with empty choices (-1), slots of which some are at or past the capacity (drops).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "src/ops/moe_ops.h"
#include "tests/support/test_helpers.h"

namespace switchyard {
namespace testing {

struct SenderChoices {
  int64_t tokens = 0;
  int choices = 0, experts = 0;
  int32_t capacity = 0;
  HostTensor ids, slots, scalars, gates;
};

// `empty_rate`: the chance that a choice is empty; `drop_rate`: that a kept-looking choice gets a
// slot >= capacity.
inline SenderChoices random_sender_choices(std::mt19937_64& generator, int64_t tokens, int choices, int experts,
                                           double empty_rate, double drop_rate) {
  SenderChoices sender;
  sender.tokens = tokens;
  sender.choices = choices;
  sender.experts = experts;
  sender.capacity = 1 + int32_t(generator() % 50);
  sender.ids = HostTensor(DType::i32, {tokens, choices});
  sender.slots = HostTensor(DType::i32, {tokens, choices});
  sender.scalars = HostTensor(DType::i32, {kNumRoutingScalars});
  sender.gates = HostTensor(DType::f32, {tokens, choices});
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<int> all(size_t(experts), 0);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t token = 0; token < tokens; ++token) {
    std::shuffle(all.begin(), all.end(), generator);
    for (int choice = 0; choice < choices; ++choice) {
      const int64_t index = token * choices + choice;
      const bool empty = unit(generator) < empty_rate;
      sender.ids.data<int32_t>()[index] = empty ? -1 : all[size_t(choice)];
      const bool dropped = unit(generator) < drop_rate;
      sender.slots.data<int32_t>()[index] =
          empty ? -1 : dropped ? sender.capacity + int32_t(generator() % 3) : int32_t(generator() % sender.capacity);
      sender.gates.data<float>()[index] = float(unit(generator));
    }
  }
  int32_t* scalars = sender.scalars.data<int32_t>();
  scalars[kCapacity] = sender.capacity;
  scalars[kTotalChoices] = int32_t(tokens * choices);
  scalars[kDroppedChoices] = 0;
  scalars[kPaddedRows] = 0;
  return sender;
}

inline bool sender_keeps(const SenderChoices& sender, int64_t index) {
  const int32_t id = sender.ids.data<int32_t>()[index], slot = sender.slots.data<int32_t>()[index];
  return id >= 0 && slot >= 0 && slot < sender.capacity;
}

}  // namespace testing
}  // namespace switchyard
