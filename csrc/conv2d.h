// 2-D convolution of channels-last feature maps as one primitive that never unfolds the whole input.
// MLX's CPU conv2d unfolds all of it (im2col: kh·kw copies of every pixel, 1.5 GB for a 512² map of
// 128 channels) and runs one matrix product over the result, which is slow where the channels are few
// (23 GFLOP/s at 32 channels). Here each thread unfolds one tile of output pixels into its own scratch and
// multiplies it by the weights with single-threaded BLAS: memory O(tile), the unfold in cache.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace zrecipe_native {

namespace mx = mlx::core;

// x (B, H, W, C) float32, weight (O, KH, KW, C) float32 (MLX's layouts), zero padding `padding` pixels on
// every side, the same `stride` along both axes; no dilation, one group; plus `bias` (O,) when given, added
// in the same pass (each tile's output starts as the bias). → (B, H', W', O).
mx::array conv2d(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias, int stride,
                 int padding, mx::StreamOrDevice s = {});

// Bytes of scratch one call takes (every thread's unfolded tile).
size_t conv2d_scratch_bytes(int64_t out_pixels, int kernel_h, int kernel_w, int channels);

class Conv2d : public mx::UnaryPrimitive {
 public:
  Conv2d(mx::Stream stream, int stride, int padding) : mx::UnaryPrimitive(stream), stride_(stride), padding_(padding) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  // Through MLX's own convolution (the VAE is not trained; this keeps it differentiable).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "ZrecipeConv2d";
  }

 private:
  int stride_;
  int padding_;
};

}  // namespace zrecipe_native
