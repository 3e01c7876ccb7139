#include "conv2d.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "layout.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"
#include "tasks.h"

namespace zrecipe_native {

namespace {

// Output pixels per tile: an unfolded (pixels, KH·KW·C) tile of about this many floats (1 MiB), at least
// 256 pixels so that BLAS's packing of the weights (once per call) is small next to the tile's products.
constexpr size_t kTileFloats = size_t{1} << 18;

int64_t tile_pixels(int64_t out_pixels, int64_t k) {
  const int64_t pixels = std::clamp<int64_t>(static_cast<int64_t>(kTileFloats) / std::max<int64_t>(k, 1), 256, 4096);
  return std::min(out_pixels, pixels / 16 * 16);
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("[zrecipe.native.conv2d] " + what);
}

int64_t out_size(int64_t in, int64_t kernel, int stride, int padding) {
  return (in + 2 * padding - kernel) / stride + 1;
}

}  // namespace

size_t conv2d_scratch_bytes(int64_t out_pixels, int kernel_h, int kernel_w, int channels) {
  const int64_t k = static_cast<int64_t>(kernel_h) * kernel_w * channels;
  const int64_t rows = tile_pixels(out_pixels, k);
  const int64_t tiles = (out_pixels + rows - 1) / std::max<int64_t>(rows, 1);
  return sizeof(float) * task_threads(tiles) * rows * k;
}

mx::array conv2d(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias, int stride,
                 int padding, mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  check(stream.device.type == mx::Device::cpu, "runs on the CPU only.");
  check(x.ndim() == 4 && weight.ndim() == 4, "takes (batch, height, width, channels) maps and OHWI weights.");
  check(x.dtype() == mx::float32 && weight.dtype() == mx::float32, "takes float32 arrays.");
  check(weight.shape(3) == x.shape(3), "the weights' input channels must match the map's.");
  check(stride >= 1 && padding >= 0, "stride must be ≥ 1 and padding ≥ 0.");
  check(x.shape(1) + 2 * padding >= weight.shape(1) && x.shape(2) + 2 * padding >= weight.shape(2),
        "the kernel is larger than the padded map.");
  std::vector<mx::array> inputs = {x, weight};
  if (bias) {
    check(bias->dtype() == mx::float32 && bias->ndim() == 1 && bias->shape(0) == weight.shape(0),
          "the bias must be float32 with one value per output channel.");
    inputs.push_back(*bias);
  }
  auto primitive = std::make_shared<Conv2d>(stream, stride, padding);
  return mx::array(primitive->output_shapes(inputs)[0], mx::float32, primitive, inputs);
}

std::vector<mx::Shape> Conv2d::output_shapes(const std::vector<mx::array>& inputs) {
  const auto &x = inputs[0], &w = inputs[1];
  return {{x.shape(0), static_cast<int>(out_size(x.shape(1), w.shape(1), stride_, padding_)),
           static_cast<int>(out_size(x.shape(2), w.shape(2), stride_, padding_)), w.shape(0)}};
}

bool Conv2d::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const Conv2d*>(&other);
  return o && o->stride_ == stride_ && o->padding_ == padding_;
}

void Conv2d::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[ZrecipeConv2d] has no GPU implementation.");
}

void Conv2d::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  encoder.set_output_array(out);
  std::vector<Layout> views(inputs.begin(), inputs.end());
  encoder.dispatch([views, dst = out.data<float>(), stride = stride_, pad = padding_, oshape = out.shape()] {
    std::unique_ptr<float[]> keep[3];
    const float* src[3] = {nullptr, nullptr, nullptr};
    for (size_t i = 0; i < views.size(); ++i) src[i] = views[i].rows(keep[i]);
    const auto& xs = views[0].shape;
    const auto& ws = views[1].shape;
    const int64_t H = xs[1], W = xs[2], C = xs[3];
    const int64_t O = ws[0], KH = ws[1], KW = ws[2], K = KH * KW * C;
    const int64_t Ho = oshape[1], Wo = oshape[2];
    const int64_t per_item = Ho * Wo, pixels = oshape[0] * per_item;
    if (pixels == 0 || O == 0) return;
    const float* bias = src[2];
    if (K == 0) {
      for (int64_t p = 0; p < pixels; ++p) {
        for (int64_t o = 0; o < O; ++o) dst[p * O + o] = bias ? bias[o] : 0.0f;
      }
      return;
    }
    const int64_t R = tile_pixels(pixels, K);
    const int64_t tiles = (pixels + R - 1) / R;
    const float* x = src[0];
    const float* w = src[1];  // (O, K) row-major: each output channel's KH·KW·C taps in the unfold's order
    TaskRunner runner(tiles, static_cast<size_t>(R * K));
    runner.run([&](int64_t tile, float* patch) {
      const int64_t p0 = tile * R, rows = std::min(R, pixels - p0);
      // Unfold: row r holds output pixel p0 + r's receptive field, (kh, kw, c) with c fastest, zeros where
      // the field leaves the map.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = p0 + r, b = p / per_item, oy = (p % per_item) / Wo, ox = p % Wo;
        float* row = patch + r * K;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t iy = oy * stride - pad + kh;
          float* taps = row + kh * KW * C;
          if (iy < 0 || iy >= H) {
            std::memset(taps, 0, sizeof(float) * KW * C);
            continue;
          }
          const int64_t ix0 = ox * stride - pad;
          const float* line = x + ((b * H + iy) * W) * C;
          if (ix0 >= 0 && ix0 + KW <= W) {  // the whole row of taps inside: one copy
            std::memcpy(taps, line + ix0 * C, sizeof(float) * KW * C);
            continue;
          }
          for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t ix = ix0 + kw;
            if (ix < 0 || ix >= W) {
              std::memset(taps + kw * C, 0, sizeof(float) * C);
            } else {
              std::memcpy(taps + kw * C, line + ix * C, sizeof(float) * C);
            }
          }
        }
      }
      float* out_rows = dst + p0 * O;
      if (bias) {
        for (int64_t r = 0; r < rows; ++r) std::memcpy(out_rows + r * O, bias, sizeof(float) * O);
      }
      sgemm(false, true, static_cast<int>(rows), static_cast<int>(O), static_cast<int>(K), 1.0f, patch,
            static_cast<int>(K), w, static_cast<int>(K), bias ? 1.0f : 0.0f, out_rows, static_cast<int>(O));
    });
  });
}

std::vector<mx::array> Conv2d::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                   const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto s = stream();
  auto fn = [this, s](const std::vector<mx::array>& in) {
    auto y = mx::conv2d(in[0], in[1], {stride_, stride_}, {padding_, padding_}, {1, 1}, 1, s);
    return std::vector<mx::array>{in.size() > 2 ? mx::add(y, in[2], s) : y};
  };
  auto grads = mx::vjp(fn, primals, cotangents).second;
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(grads[arg]);
  return out;
}

}  // namespace zrecipe_native
