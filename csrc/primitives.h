// MLX primitives for zrecipe's CPU kernels: exp, SiLU and last-axis softmax in float32, each with a VJP
// that is itself one of these primitives (or a few MLX ops on their outputs).
//
// They are graph nodes like MLX's own: usable inside mx.compile, mx.grad / mx.vjp / mx.jvp and mx.vmap.
// CPU only: eval_gpu throws (zrecipe.native never builds them for a GPU stream).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace zrecipe_native {

namespace mx = mlx::core;

// The operations (float32 in, float32 out; anything else is rejected with std::invalid_argument).
mx::array exp(const mx::array& x, mx::StreamOrDevice s = {});
mx::array silu(const mx::array& x, mx::StreamOrDevice s = {});
// g · silu'(x): SiLU's VJP for the cotangent g (same shape as x).
mx::array silu_grad(const mx::array& x, const mx::array& g, mx::StreamOrDevice s = {});
mx::array softmax(const mx::array& x, mx::StreamOrDevice s = {});
// p · (g − Σ g·p) along the last axis: softmax's VJP from its output p and the cotangent g.
mx::array softmax_grad(const mx::array& p, const mx::array& g, mx::StreamOrDevice s = {});

// Shared by the five primitives below: no parameters, so two nodes of one type are always equivalent.
class NativePrimitive : public mx::UnaryPrimitive {
 public:
  explicit NativePrimitive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override;
  bool is_equivalent(const mx::Primitive& other) const override {
    return typeid(*this) == typeid(other);
  }

 protected:
  // The operation itself on (vmapped) inputs, for vmap.
  virtual mx::array apply(const std::vector<mx::array>& inputs) = 0;
};

#define ZR_PRIMITIVE(NAME)                                                                            \
  class NAME : public NativePrimitive {                                                               \
   public:                                                                                            \
    explicit NAME(mx::Stream stream) : NativePrimitive(stream) {}                                     \
    void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;                     \
    std::vector<mx::array> vjp(const std::vector<mx::array>& primals,                                 \
                               const std::vector<mx::array>& cotangents, const std::vector<int>& argnums, \
                               const std::vector<mx::array>& outputs) override;                       \
    std::vector<mx::array> jvp(const std::vector<mx::array>& primals,                                 \
                               const std::vector<mx::array>& tangents,                                \
                               const std::vector<int>& argnums) override;                             \
    const char* name() const override {                                                               \
      return "Zrecipe" #NAME;                                                                         \
    }                                                                                                 \
                                                                                                      \
   protected:                                                                                         \
    mx::array apply(const std::vector<mx::array>& inputs) override;                                  \
  };

ZR_PRIMITIVE(Exp)
ZR_PRIMITIVE(Silu)
ZR_PRIMITIVE(SiluGrad)
ZR_PRIMITIVE(Softmax)
ZR_PRIMITIVE(SoftmaxGrad)

#undef ZR_PRIMITIVE

}  // namespace zrecipe_native
