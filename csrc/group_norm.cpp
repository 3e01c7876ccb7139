#include "group_norm.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "layout.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

namespace zrecipe_native {

namespace {

// Pixels per partial sum: the unit of work of the reduction passes, fixed so that the sums are added in
// the same order whatever the thread count.
constexpr size_t kChunkPixels = 1024;

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("[zrecipe.native.group_norm] " + what);
}

// Per-channel Σ f(x[p, c]) over `pixels` rows of `channels`, as float64, summed chunk by chunk in order.
template <class F>
std::vector<double> channel_sums(const float* x, size_t pixels, size_t channels, const F& f) {
  const size_t chunks = (pixels + kChunkPixels - 1) / kChunkPixels;
  std::vector<double> partial(chunks * channels, 0.0);
  kernels::parallel(chunks, 1, kernels::threads(), [&](size_t first, size_t last) {
    for (size_t k = first; k < last; ++k) {
      double* acc = partial.data() + k * channels;
      const size_t end = std::min(pixels, (k + 1) * kChunkPixels);
      for (size_t p = k * kChunkPixels; p < end; ++p) {
        const float* row = x + p * channels;
        for (size_t c = 0; c < channels; ++c) acc[c] += f(row[c], c);
      }
    }
  });
  std::vector<double> total(channels, 0.0);
  for (size_t k = 0; k < chunks; ++k) {
    for (size_t c = 0; c < channels; ++c) total[c] += partial[k * channels + c];
  }
  return total;
}

// The same computation in MLX ops, for the VJP.
mx::array group_norm_ops(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                         bool act, mx::Stream s) {
  const auto& shape = x.shape();
  const int B = shape[0], H = shape[1], W = shape[2], C = shape[3];
  auto g = mx::reshape(x, {B, H * W, groups, C / groups}, s);
  auto mean = mx::mean(g, std::vector<int>{1, 3}, true, s);
  auto centred = mx::subtract(g, mean, s);
  auto var = mx::mean(mx::square(centred, s), std::vector<int>{1, 3}, true, s);
  auto y = mx::multiply(centred, mx::rsqrt(mx::add(var, mx::array(eps), s), s), s);
  y = mx::add(mx::multiply(mx::reshape(y, shape, s), weight, s), bias, s);
  return act ? mx::multiply(y, mx::sigmoid(y, s), s) : y;
}

}  // namespace

mx::array group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                     bool act, mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  check(stream.device.type == mx::Device::cpu, "runs on the CPU only.");
  check(x.ndim() == 4, "takes (batch, height, width, channels) feature maps.");
  for (const auto* a : {&x, &weight, &bias}) check(a->dtype() == mx::float32, "takes float32 arrays.");
  check(groups > 0 && x.shape(3) % groups == 0, "the channels must split into the groups.");
  check(weight.ndim() == 1 && bias.ndim() == 1 && weight.shape(0) == x.shape(3) && bias.shape(0) == x.shape(3),
        "weight and bias must have one value per channel.");
  return mx::array(x.shape(), mx::float32, std::make_shared<GroupNorm>(stream, groups, eps, act), {x, weight, bias});
}

bool GroupNorm::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const GroupNorm*>(&other);
  return o && o->groups_ == groups_ && o->eps_ == eps_ && o->act_ == act_;
}

void GroupNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[ZrecipeGroupNorm] has no GPU implementation.");
}

void GroupNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  encoder.set_output_array(out);
  std::vector<Layout> views(inputs.begin(), inputs.end());
  encoder.dispatch([views, dst = out.data<float>(), groups = groups_, eps = eps_, act = act_] {
    std::unique_ptr<float[]> keep[3];
    const float* src[3] = {nullptr, nullptr, nullptr};
    for (size_t i = 0; i < views.size(); ++i) src[i] = views[i].rows(keep[i]);
    const auto& shape = views[0].shape;
    const size_t B = shape[0], pixels = static_cast<size_t>(shape[1]) * shape[2], C = shape[3];
    const size_t per_group = C / groups;
    const double count = static_cast<double>(pixels * per_group);
    std::vector<float> scale(C), shift(C);
    for (size_t b = 0; b < B; ++b) {
      const float* x = src[0] + b * pixels * C;
      // Two passes (mean, then the mean squared deviation), as the reference computes it.
      auto sums = channel_sums(x, pixels, C, [](float v, size_t) { return static_cast<double>(v); });
      std::vector<double> mean(C);
      for (size_t g = 0; g < static_cast<size_t>(groups); ++g) {
        double total = 0.0;
        for (size_t c = g * per_group; c < (g + 1) * per_group; ++c) total += sums[c];
        for (size_t c = g * per_group; c < (g + 1) * per_group; ++c) mean[c] = total / count;
      }
      auto squares = channel_sums(x, pixels, C, [&mean](float v, size_t c) {
        const double d = static_cast<double>(v) - mean[c];
        return d * d;
      });
      for (size_t g = 0; g < static_cast<size_t>(groups); ++g) {
        double total = 0.0;
        for (size_t c = g * per_group; c < (g + 1) * per_group; ++c) total += squares[c];
        const double rstd = 1.0 / std::sqrt(total / count + static_cast<double>(eps));
        for (size_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          const double sc = rstd * src[1][c];
          scale[c] = static_cast<float>(sc);
          shift[c] = static_cast<float>(src[2][c] - mean[c] * sc);
        }
      }
      kernels::affine_rows(x, dst + b * pixels * C, pixels, C, scale.data(), shift.data(), act);
    }
  });
}

std::vector<mx::array> GroupNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto s = stream();
  auto fn = [this, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{group_norm_ops(in[0], in[1], in[2], groups_, eps_, act_, s)};
  };
  auto grads = mx::vjp(fn, primals, cotangents).second;
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(grads[arg]);
  return out;
}

}  // namespace zrecipe_native
