#include "flash_attention.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "layout.h"
#include "mlx/backend/cpu/encoder.h"
#include "tasks.h"

namespace zrecipe_native {

namespace {

// Query rows per tile: a (rows, keys) float32 tile of about this many elements (2 MiB), rows a multiple
// of 16 in [16, 512]. Measured on the CPU (benchmarks/bench_attention.py): smaller tiles make the
// rank-`rows` updates of dK and dV slow, larger ones fall out of the cache.
constexpr size_t kTileElements = size_t{1} << 19;

size_t tile_rows(size_t queries, size_t keys) {
  size_t rows = kTileElements / std::max<size_t>(keys, 1) / 16 * 16;
  return std::min(queries, std::clamp<size_t>(rows, 16, 512));
}

// Scratch floats one thread needs: the forward's score tile with its row maxima and sums; the backward's
// probabilities and their gradients with two per-row terms.
size_t floats_per_thread(int64_t rows, int64_t keys, bool backward) {
  return static_cast<size_t>((backward ? 2 : 1) * rows * keys + 2 * rows);
}

int64_t rows_per_tile(int rows, int64_t queries, int64_t keys) {
  return rows > 0 ? std::min<int64_t>(rows, queries) : static_cast<int64_t>(tile_rows(queries, keys));
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("[zrecipe.native.flash_attention] " + what);
}

// A 4-D float32 operand as the kernels read it: the rows of its last axis at a fixed stride (what BLAS
// takes as a leading dimension), each (batch, head) matrix at its own offset. An array that is not laid
// out that way (a transposed last axis, a broadcast row) is read from a row-major copy.
struct Operand {
  const float* data;
  mx::Shape shape;
  mx::Strides strides;

  explicit Operand(const mx::array& a) : data(a.data<float>()), shape(a.shape()), strides(a.strides()) {}

  // Make the rows readable by BLAS, copying into `keep` when they are not.
  void prepare(std::unique_ptr<float[]>& keep) {
    const bool unit_last = shape[3] == 1 || strides[3] == 1;
    const bool row_stride = shape[2] == 1 || strides[2] >= shape[3];
    if (unit_last && row_stride) return;
    size_t n = static_cast<size_t>(shape[0]) * shape[1] * shape[2] * shape[3];
    keep.reset(new float[std::max<size_t>(n, 1)]);
    gather(data, shape, strides, keep.get());
    data = keep.get();
    strides = {shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1};
  }
  // The (b, h) matrix (axes of length 1 broadcast).
  const float* at(int64_t b, int64_t h) const {
    return data + (shape[0] == 1 ? 0 : b * strides[0]) + (shape[1] == 1 ? 0 : h * strides[1]);
  }
  int ld() const {
    return static_cast<int>(shape[2] == 1 ? std::max<int64_t>(shape[3], 1) : strides[2]);
  }
  // Element (b, h, i, 0), for the (B, H, L, 1) per-row vectors (log-sum-exp and its cotangent).
  float row_value(int64_t b, int64_t h, int64_t i) const {
    return at(b, h)[shape[2] == 1 ? 0 : i * strides[2]];
  }
};

// The boolean mask (True = attend), broadcast along any axis.
struct MaskView {
  const bool* data = nullptr;
  mx::Shape shape;
  mx::Strides strides;

  MaskView() = default;
  explicit MaskView(const mx::array& a) : data(a.data<bool>()), shape(a.shape()), strides(a.strides()) {}

  const bool* row(int64_t b, int64_t h, int64_t i) const {
    return data + (shape[0] == 1 ? 0 : b * strides[0]) + (shape[1] == 1 ? 0 : h * strides[1]) +
           (shape[2] == 1 ? 0 : i * strides[2]);
  }
  int64_t key_stride() const {
    return shape[3] == 1 ? 0 : strides[3];
  }
};

// Masked scores of one (batch, head) tile: float32's lowest value where the mask is False. When every
// query row shares one mask row (a key-padding mask), its masked keys are listed once per (batch, head).
struct TileMask {
  const MaskView* mask = nullptr;
  int64_t b = 0, h = 0, keys = 0;
  std::vector<int64_t> shared;  // masked key indices, when the mask does not vary along the queries
  bool per_row = false;

  TileMask(const MaskView* m, int64_t b_, int64_t h_, int64_t keys_) : mask(m), b(b_), h(h_), keys(keys_) {
    if (!mask) return;
    per_row = mask->shape[2] != 1 && mask->strides[2] != 0;
    if (!per_row) shared = masked_keys(mask->row(b, h, 0));
  }
  std::vector<int64_t> masked_keys(const bool* row) const {
    std::vector<int64_t> out;
    const int64_t step = mask->key_stride();
    for (int64_t j = 0; j < keys; ++j) {
      if (!row[j * step]) out.push_back(j);
    }
    return out;
  }
  void apply(float* scores, int64_t first_row, int64_t rows) const {
    if (!mask) return;
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * keys;
      if (per_row) {
        const bool* m = mask->row(b, h, first_row + r);
        const int64_t step = mask->key_stride();
        for (int64_t j = 0; j < keys; ++j) {
          if (!m[j * step]) s[j] = -FLT_MAX;
        }
      } else {
        for (int64_t j : shared) s[j] = -FLT_MAX;
      }
    }
  }
};

void alloc_all(std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
}

}  // namespace

// -- operation ----------------------------------------------------------------------------------------

size_t flash_attention_scratch_bytes(int64_t batch, int64_t heads, int64_t queries, int64_t keys, bool backward) {
  const int64_t pairs = batch * heads;
  return sizeof(float) * task_threads(pairs) * floats_per_thread(rows_per_tile(0, queries, keys), keys, backward);
}

std::vector<mx::array> flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                                       const std::optional<mx::array>& mask, int rows, mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  check(stream.device.type == mx::Device::cpu, "runs on the CPU only.");
  for (const auto* a : {&q, &k, &v}) {
    check(a->ndim() == 4, "takes (batch, heads, tokens, head dim) arrays.");
    check(a->dtype() == mx::float32, "takes float32 q, k and v.");
  }
  check(k.shape() == v.shape(), "k and v must have one shape.");
  check(k.shape(2) > 0 && k.shape(3) > 0, "needs at least one key and a head dim of at least 1.");
  check(q.shape(0) == k.shape(0) && q.shape(1) == k.shape(1) && q.shape(3) == k.shape(3),
        "q and k must agree in batch, heads and head dim (repeat grouped kv heads first).");
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) {
    check(mask->ndim() == 4 && mask->dtype() == mx::bool_, "takes a boolean mask with four axes.");
    const mx::Shape want = {q.shape(0), q.shape(1), q.shape(2), k.shape(2)};
    for (int i = 0; i < 4; ++i) {
      check(mask->shape(i) == 1 || mask->shape(i) == want[i], "the mask does not broadcast to the scores.");
    }
    inputs.push_back(*mask);
  }
  auto primitive = std::make_shared<FlashAttention>(stream, scale, mask.has_value(), rows);
  return mx::array::make_arrays(primitive->output_shapes(inputs), {mx::float32, mx::float32}, primitive, inputs);
}

// -- forward ------------------------------------------------------------------------------------------

std::vector<mx::Shape> FlashAttention::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& q = inputs[0];
  return {q.shape(), {q.shape(0), q.shape(1), q.shape(2)}};
}

bool FlashAttention::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const FlashAttention*>(&other);
  return o && o->scale_ == scale_ && o->masked_ == masked_ && o->rows_ == rows_;
}

void FlashAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ZrecipeFlashAttention] has no GPU implementation.");
}

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  alloc_all(outputs);
  for (auto& out : outputs) encoder.set_output_array(out);
  Operand q(inputs[0]), k(inputs[1]), v(inputs[2]);
  MaskView mask = masked_ ? MaskView(inputs[3]) : MaskView();
  const int64_t B = q.shape[0], H = q.shape[1], L = q.shape[2], D = q.shape[3], S = k.shape[2];
  const int64_t R = rows_per_tile(rows_, L, S);
  encoder.dispatch([=, masked = masked_, scale = scale_, o = outputs[0].data<float>(),
                    lse = outputs[1].data<float>()]() mutable {
    TaskRunner runner(B * H, floats_per_thread(R, S, false));
    std::unique_ptr<float[]> keep[3];
    q.prepare(keep[0]);
    k.prepare(keep[1]);
    v.prepare(keep[2]);
    runner.run([&](int64_t u, float* scratch) {
      const int64_t b = u / H, h = u % H;
      const float *Q = q.at(b, h), *K = k.at(b, h), *V = v.at(b, h);
      float* O = o + u * L * D;
      float* lse_u = lse + u * L;
      TileMask tile_mask(masked ? &mask : nullptr, b, h, S);
      float *scores = scratch, *row_max = scores + R * S, *row_sum = row_max + R;
      for (int64_t r0 = 0; r0 < L; r0 += R) {
        const int64_t rows = std::min(R, L - r0);
        sgemm(false, true, rows, S, D, scale, Q + r0 * q.ld(), q.ld(), K, k.ld(), 0.0f, scores, S);
        tile_mask.apply(scores, r0, rows);
        kernels::exp_rows_max(scores, rows, S, row_max, row_sum);
        // Normalise the (rows, D) output rather than the (rows, keys) probabilities: fewer multiplies.
        sgemm(false, false, rows, D, S, 1.0f, scores, S, V, v.ld(), 0.0f, O + r0 * D, D);
        for (int64_t r = 0; r < rows; ++r) {
          const float inv = 1.0f / row_sum[r];
          for (int64_t d = 0; d < D; ++d) O[(r0 + r) * D + d] *= inv;
          lse_u[r0 + r] = row_max[r] + std::log(row_sum[r]);
        }
      }
    });
  });
}

std::vector<mx::array> FlashAttention::vjp(const std::vector<mx::array>& primals,
                                           const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                           const std::vector<mx::array>& outputs) {
  auto s = stream();
  const auto &q = primals[0], &k = primals[1], &v = primals[2];
  const mx::Shape rows = {q.shape(0), q.shape(1), q.shape(2), 1};
  auto d_o = mx::astype(cotangents[0], mx::float32, s);
  auto d_lse = cotangents.size() > 1 ? mx::astype(cotangents[1], mx::float32, s) : mx::zeros_like(outputs[1], s);
  std::vector<mx::array> inputs = {q, k, v};
  if (masked_) inputs.push_back(primals[3]);
  inputs.push_back(outputs[0]);
  inputs.push_back(mx::reshape(outputs[1], rows, s));
  inputs.push_back(d_o);
  inputs.push_back(mx::reshape(d_lse, rows, s));
  auto primitive = std::make_shared<FlashAttentionGrad>(s, scale_, masked_, rows_);
  auto grads = mx::array::make_arrays(primitive->output_shapes(inputs), {mx::float32, mx::float32, mx::float32},
                                      primitive, inputs);
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(arg < 3 ? grads[arg] : mx::zeros_like(primals[arg], s));
  return out;
}

// -- backward -----------------------------------------------------------------------------------------

std::vector<mx::Shape> FlashAttentionGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape(), inputs[1].shape(), inputs[2].shape()};
}

bool FlashAttentionGrad::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const FlashAttentionGrad*>(&other);
  return o && o->scale_ == scale_ && o->masked_ == masked_ && o->rows_ == rows_;
}

void FlashAttentionGrad::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ZrecipeFlashAttentionGrad] has no GPU implementation.");
}

void FlashAttentionGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  alloc_all(outputs);
  for (auto& out : outputs) encoder.set_output_array(out);
  const size_t at = masked_ ? 4 : 3;
  Operand q(inputs[0]), k(inputs[1]), v(inputs[2]), o(inputs[at]), lse(inputs[at + 1]), d_o(inputs[at + 2]),
      d_lse(inputs[at + 3]);
  MaskView mask = masked_ ? MaskView(inputs[3]) : MaskView();
  const int64_t B = q.shape[0], H = q.shape[1], L = q.shape[2], D = q.shape[3], S = k.shape[2];
  const int64_t R = rows_per_tile(rows_, L, S);
  encoder.dispatch([=, masked = masked_, scale = scale_, d_q = outputs[0].data<float>(),
                    d_k = outputs[1].data<float>(), d_v = outputs[2].data<float>()]() mutable {
    TaskRunner runner(B * H, floats_per_thread(R, S, true));
    std::unique_ptr<float[]> keep[5];
    q.prepare(keep[0]);
    k.prepare(keep[1]);
    v.prepare(keep[2]);
    o.prepare(keep[3]);
    d_o.prepare(keep[4]);
    runner.run([&](int64_t u, float* scratch) {
      const int64_t b = u / H, h = u % H;
      const float *Q = q.at(b, h), *K = k.at(b, h), *V = v.at(b, h), *O = o.at(b, h), *dO = d_o.at(b, h);
      float *dQ = d_q + u * L * D, *dK = d_k + u * S * D, *dV = d_v + u * S * D;
      std::memset(dK, 0, sizeof(float) * S * D);
      std::memset(dV, 0, sizeof(float) * S * D);
      TileMask tile_mask(masked ? &mask : nullptr, b, h, S);
      float *p = scratch, *d_s = p + R * S, *shift = d_s + R * S, *term = shift + R;
      for (int64_t r0 = 0; r0 < L; r0 += R) {
        const int64_t rows = std::min(R, L - r0);
        const float *Q_r = Q + r0 * q.ld(), *dO_r = dO + r0 * d_o.ld();
        // The forward's probabilities, recomputed from the scores and the saved log-sum-exp.
        sgemm(false, true, rows, S, D, scale, Q_r, q.ld(), K, k.ld(), 0.0f, p, S);
        tile_mask.apply(p, r0, rows);
        for (int64_t r = 0; r < rows; ++r) {
          shift[r] = lse.row_value(b, h, r0 + r);
          // Σ_j p·dP = dO·O; the log-sum-exp's own cotangent adds p·d_lse to each score's gradient.
          const float *o_row = O + (r0 + r) * o.ld(), *g_row = dO_r + r * d_o.ld();
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += o_row[d] * g_row[d];
          term[r] = dot - d_lse.row_value(b, h, r0 + r);
        }
        kernels::exp_rows_shift(p, shift, rows, S);
        sgemm(true, false, S, D, rows, 1.0f, p, S, dO_r, d_o.ld(), 1.0f, dV, D);       // dV += Pᵀ dO
        sgemm(false, true, rows, S, D, 1.0f, dO_r, d_o.ld(), V, v.ld(), 0.0f, d_s, S);  // dP = dO Vᵀ
        kernels::softmax_grad_rows_given(p, d_s, term, rows, S);           // dS
        sgemm(false, false, rows, D, S, scale, d_s, S, K, k.ld(), 0.0f, dQ + r0 * D, D);
        sgemm(true, false, S, D, rows, scale, d_s, S, Q_r, q.ld(), 1.0f, dK, D);  // dK += dSᵀ Q
      }
    });
  });
}

}  // namespace zrecipe_native
