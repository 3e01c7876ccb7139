// GroupNorm (+ SiLU) over channels-last feature maps in one primitive: the VAE's most frequent op after the
// convolutions. MLX computes it as strided reductions and a compiled elementwise chain (several passes
// at a few ns per element on the CPU); here it is two reduction passes (float64 sums per channel, in a
// fixed chunk order, so results do not depend on the thread count) and one vectorised affine (+ SiLU) pass.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace zrecipe_native {

namespace mx = mlx::core;

// x (B, H, W, C) float32, weight and bias (C,) float32; statistics per (item, group) over H, W and the
// group's C / groups channels (PyTorch's GroupNorm), then x̂ · weight + bias, then SiLU when `act`.
mx::array group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                     bool act, mx::StreamOrDevice s = {});

class GroupNorm : public mx::UnaryPrimitive {
 public:
  GroupNorm(mx::Stream stream, int groups, float eps, bool act)
      : mx::UnaryPrimitive(stream), groups_(groups), eps_(eps), act_(act) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  // Through the same computation in MLX ops (the VAE is not trained; this keeps it differentiable).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "ZrecipeGroupNorm";
  }

 private:
  int groups_;
  float eps_;
  bool act_;
};

}  // namespace zrecipe_native
