// Fused softmax attention for MLX's CPU backend with O(N) memory in training (FlashAttention's recipe).
//
// The forward computes, per (batch, head) and per block of query rows, the block's scores against every
// key (one sgemm), their exponentials with the vectorised exp, and the output (a second sgemm); it keeps
// only the output and each row's log-sum-exp. The backward recomputes each block's probabilities from
// the log-sum-exp and forms dQ, dK and dV with four more sgemms. Memory beyond inputs and outputs is
// two (rows, keys) tiles per thread, never a (heads, queries, keys) matrix.
//
// Matrix products go to the process's BLAS (`cblas_sgemm`, resolved at load time like libmlx's own:
// OpenBLAS where zrecipe loaded it). (batch, head) pairs run on the kernels' threads, each with a
// single-threaded BLAS call, so that threads are not started per tile.
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace zrecipe_native {

namespace mx = mlx::core;

// q (B, H, L, D), k and v (B, H, S, D), float32, equal head counts (repeat GQA heads first); `mask`:
// boolean, True = attend, broadcastable to (B, H, L, S) and given with four axes. Returns the output
// (B, H, L, D) and the per-row log-sum-exp of the scaled scores (B, H, L). Masked scores count as
// float32's lowest value (as MLX's own masked attention), so a row whose keys are all masked averages them.
// `rows`: query rows per tile (0: chosen from the key count; tests set it to get several tiles).
std::vector<mx::array> flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                                       const std::optional<mx::array>& mask, int rows = 0,
                                       mx::StreamOrDevice s = {});

// Bytes of scratch one call takes while it runs (MLX's allocator; freed at its end), for the memory model.
size_t flash_attention_scratch_bytes(int64_t batch, int64_t heads, int64_t queries, int64_t keys, bool backward);

class FlashAttention : public mx::Primitive {
 public:
  FlashAttention(mx::Stream stream, float scale, bool masked, int rows)
      : mx::Primitive(stream), scale_(scale), masked_(masked), rows_(rows) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "ZrecipeFlashAttention";
  }

 private:
  float scale_;
  bool masked_;
  int rows_;
};

// Inputs q, k, v, [mask], o, lse, d_o, d_lse → d_q, d_k, d_v (float32, the shapes of q, k, v).
class FlashAttentionGrad : public mx::Primitive {
 public:
  FlashAttentionGrad(mx::Stream stream, float scale, bool masked, int rows)
      : mx::Primitive(stream), scale_(scale), masked_(masked), rows_(rows) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "ZrecipeFlashAttentionGrad";
  }

 private:
  float scale_;
  bool masked_;
  int rows_;
};

}  // namespace zrecipe_native
