// Shape checks shared by MoeLayer and MoeEpLayer: one message format for both.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "src/model/moe_router.h"

namespace switchyard {

// Throws "<owner>: <what> must be <dtype>[dims] on <device>, got ..." unless `tensor` matches
// (data may be null only when it holds no elements).
void expect_moe_tensor(const char* owner, const char* what, const Tensor& tensor, DType dtype, DeviceKind device,
                       std::initializer_list<int64_t> dims);

// A forward's context, x and y: the context on the layer's device, x and y [T, D] in the
// activation dtype with 1 <= T <= max_tokens. Returns T.
int64_t expect_moe_forward_io(const char* owner, const ExecContext& context, DeviceKind device, const Tensor& x,
                              const Tensor& y, int64_t d_model, DType dtype, int64_t max_tokens);

// `<what>.router` [D, E], `<what>.w1` [experts_held, D, w1 columns], `<what>.w2` [experts_held, F, D]:
// experts_held is E for a layer holding every expert, the local shard size for an EP layer.
void expect_moe_weights(const char* owner, const MoeLayerConfig& config, int64_t experts_held,
                        const MoeWeights& weights, DType dtype, DeviceKind device, const char* what);

}  // namespace switchyard
