#include "primitives.h"

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "layout.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"

namespace zrecipe_native {

namespace {

mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::cpu) {
    throw std::invalid_argument(std::string("[zrecipe.native.") + op + "] runs on the CPU only.");
  }
  return stream;
}

void check_float32(const mx::array& a, const char* op) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string("[zrecipe.native.") + op + "] takes float32 arrays only.");
  }
}

}  // namespace

void gather(const float* src, const mx::Shape& shape, const mx::Strides& strides, float* dst) {
  const int nd = static_cast<int>(shape.size());
  if (nd == 0) {
    dst[0] = src[0];
    return;
  }
  const size_t total = element_count(shape);
  if (total == 0) return;
  const int64_t inner = shape[nd - 1], inner_stride = strides[nd - 1];
  std::vector<int64_t> index(nd, 0);
  int64_t offset = 0;
  for (size_t o = 0; o < total; o += inner) {
    for (int64_t j = 0; j < inner; ++j) dst[o + j] = src[offset + j * inner_stride];
    for (int d = nd - 2; d >= 0; --d) {
      offset += strides[d];
      if (++index[d] < shape[d]) break;
      offset -= strides[d] * shape[d];
      index[d] = 0;
    }
  }
}

namespace {

// Output buffer for a row-major result: the buffer of a row-contiguous input that nothing else holds
// (the kernels may write in place of their first input), else a new one.
void row_major_output(const std::vector<mx::array>& inputs, mx::array& out) {
  for (const auto& in : inputs) {
    if (in.flags().row_contiguous && mx::is_donatable(in, out)) {
      out.copy_shared_buffer(in);
      return;
    }
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// One input, elementwise. A dense input in any order is processed in its own layout; anything else is
// gathered into a row-major output and processed there.
template <class Kernel>
void eval_elementwise(const mx::array& in, mx::array& out, mx::Stream stream, Kernel kernel) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  encoder.set_input_array(in);
  encoder.set_output_array(out);
  if (in.flags().contiguous) {
    if (mx::is_donatable(in, out)) {
      out.copy_shared_buffer(in);
    } else {
      out.set_data(mx::allocator::malloc(in.data_size() * out.itemsize()), in.data_size(), in.strides(),
                   in.flags());
    }
    encoder.dispatch(
        [src = in.data<float>(), dst = out.data<float>(), n = in.data_size(), kernel] { kernel(src, dst, n); });
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.dispatch([src = Layout(in), dst = out.data<float>(), n = out.size(), kernel] {
      gather(src.data, src.shape, src.strides, dst);
      kernel(dst, dst, n);
    });
  }
}

// Several same-shape inputs, row-major output; kernel(row-major input pointers..., out, size, last dim).
template <class Kernel>
void eval_rows(const std::vector<mx::array>& inputs, mx::array& out, mx::Stream stream, Kernel kernel) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  const size_t n = out.size();
  const size_t cols = out.ndim() > 0 ? static_cast<size_t>(out.shape(-1)) : 1;
  std::vector<Layout> layouts;
  for (const auto& in : inputs) layouts.emplace_back(in);
  row_major_output(inputs, out);
  encoder.dispatch([layouts = std::move(layouts), dst = out.data<float>(), n, cols, kernel] {
    if (n == 0) return;
    std::unique_ptr<float[]> keep[2];
    const float* a = layouts[0].rows(keep[0]);
    const float* b = layouts.size() > 1 ? layouts[1].rows(keep[1]) : nullptr;
    kernel(a, b, dst, n, cols);
  });
}

mx::array make(std::shared_ptr<mx::Primitive> p, std::vector<mx::array> inputs) {
  mx::Shape shape = inputs[0].shape();
  return mx::array(std::move(shape), mx::float32, std::move(p), std::move(inputs));
}

// Two operands broadcast to one shape (a cotangent may arrive broadcast), both float32.
std::vector<mx::array> same_shape(const mx::array& a, const mx::array& b, mx::Stream s, const char* op) {
  check_float32(a, op);
  check_float32(b, op);
  return mx::broadcast_arrays({a, b}, s);
}

// sigmoid(x) = 1 / (1 + e^-x) through the native exp, and SiLU's second derivative s(1−s)(2 + x(1−2s)).
mx::array silu_second_derivative(const mx::array& x, mx::Stream s) {
  auto one = mx::array(1.0f);
  auto sig = mx::reciprocal(mx::add(one, zrecipe_native::exp(mx::negative(x, s), s), s), s);
  auto one_minus = mx::subtract(one, sig, s);
  auto curve = mx::add(mx::array(2.0f), mx::multiply(x, mx::subtract(one_minus, sig, s), s), s);
  return mx::multiply(mx::multiply(sig, one_minus, s), curve, s);
}

mx::array row_sum(const mx::array& a, mx::Stream s) {
  return mx::sum(a, -1, /* keepdims = */ true, s);
}

}  // namespace

// -- operations ---------------------------------------------------------------------------------------

mx::array exp(const mx::array& x, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "exp");
  check_float32(x, "exp");
  return make(std::make_shared<Exp>(stream), {x});
}

mx::array silu(const mx::array& x, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "silu");
  check_float32(x, "silu");
  return make(std::make_shared<Silu>(stream), {x});
}

mx::array silu_grad(const mx::array& x, const mx::array& g, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "silu_grad");
  return make(std::make_shared<SiluGrad>(stream), same_shape(x, g, stream, "silu_grad"));
}

mx::array softmax(const mx::array& x, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "softmax");
  check_float32(x, "softmax");
  if (x.ndim() == 0) throw std::invalid_argument("[zrecipe.native.softmax] needs at least one axis.");
  return make(std::make_shared<Softmax>(stream), {x});
}

mx::array softmax_grad(const mx::array& p, const mx::array& g, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "softmax_grad");
  if (p.ndim() == 0) throw std::invalid_argument("[zrecipe.native.softmax_grad] needs at least one axis.");
  return make(std::make_shared<SoftmaxGrad>(stream), same_shape(p, g, stream, "softmax_grad"));
}

// -- shared primitive parts ---------------------------------------------------------------------------

void NativePrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string("[") + name() + "] has no GPU implementation.");
}

// Batch axis to the front of every input (inputs without one gain a broadcast length-1 axis), then the
// same operation; the result's batch axis is 0. Moving the batch axis first also keeps softmax's
// reduction on the real last axis.
std::pair<std::vector<mx::array>, std::vector<int>> NativePrimitive::vmap(const std::vector<mx::array>& inputs,
                                                                          const std::vector<int>& axes) {
  std::vector<mx::array> moved;
  for (size_t i = 0; i < inputs.size(); ++i) {
    moved.push_back(axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], 0, stream())
                                 : mx::expand_dims(inputs[i], 0, stream()));
  }
  return {{apply(moved)}, {0}};
}

// -- Exp ----------------------------------------------------------------------------------------------

void Exp::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_elementwise(inputs[0], out, stream(), [](const float* x, float* o, size_t n) { kernels::exp(x, o, n); });
}

std::vector<mx::array> Exp::vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                                const std::vector<int>&, const std::vector<mx::array>& outputs) {
  return {mx::multiply(cotangents[0], outputs[0], stream())};
}

std::vector<mx::array> Exp::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                const std::vector<int>&) {
  return {mx::multiply(tangents[0], zrecipe_native::exp(primals[0], stream()), stream())};
}

mx::array Exp::apply(const std::vector<mx::array>& inputs) {
  return zrecipe_native::exp(inputs[0], stream());
}

// -- Silu ---------------------------------------------------------------------------------------------

void Silu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_elementwise(inputs[0], out, stream(),
                   [](const float* x, float* o, size_t n) { kernels::silu(x, o, n); });
}

std::vector<mx::array> Silu::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>&, const std::vector<mx::array>&) {
  return {zrecipe_native::silu_grad(primals[0], cotangents[0], stream())};
}

std::vector<mx::array> Silu::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                 const std::vector<int>&) {
  return {zrecipe_native::silu_grad(primals[0], tangents[0], stream())};
}

mx::array Silu::apply(const std::vector<mx::array>& inputs) {
  return zrecipe_native::silu(inputs[0], stream());
}

// -- SiluGrad: out = g · silu'(x) ---------------------------------------------------------------------

void SiluGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_rows(inputs, out, stream(), [](const float* x, const float* g, float* o, size_t n, size_t) {
    kernels::silu_grad(x, g, o, n);
  });
}

std::vector<mx::array> SiluGrad::vjp(const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                     const std::vector<mx::array>&) {
  const auto &x = primals[0], &g = primals[1], &c = cotangents[0];
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(arg == 0 ? mx::multiply(mx::multiply(c, g, stream()), silu_second_derivative(x, stream()), stream())
                           : zrecipe_native::silu_grad(x, c, stream()));
  }
  return out;
}

std::vector<mx::array> SiluGrad::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                     const std::vector<int>& argnums) {
  const auto &x = primals[0], &g = primals[1];
  std::optional<mx::array> total;
  for (size_t i = 0; i < argnums.size(); ++i) {
    auto part = argnums[i] == 0
                    ? mx::multiply(mx::multiply(tangents[i], g, stream()), silu_second_derivative(x, stream()), stream())
                    : zrecipe_native::silu_grad(x, tangents[i], stream());
    total = total ? mx::add(*total, part, stream()) : part;
  }
  return {*total};
}

mx::array SiluGrad::apply(const std::vector<mx::array>& inputs) {
  return zrecipe_native::silu_grad(inputs[0], inputs[1], stream());
}

// -- Softmax (last axis) ------------------------------------------------------------------------------

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_rows(inputs, out, stream(), [](const float* x, const float*, float* o, size_t n, size_t cols) {
    kernels::softmax(x, o, n / cols, cols);
  });
}

// Needs only the output: the forward's input can be freed before the backward pass (like MLX's softmax).
std::vector<mx::array> Softmax::vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>&, const std::vector<mx::array>& outputs) {
  return {zrecipe_native::softmax_grad(outputs[0], cotangents[0], stream())};
}

std::vector<mx::array> Softmax::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                    const std::vector<int>&) {
  return {zrecipe_native::softmax_grad(zrecipe_native::softmax(primals[0], stream()), tangents[0], stream())};
}

mx::array Softmax::apply(const std::vector<mx::array>& inputs) {
  return zrecipe_native::softmax(inputs[0], stream());
}

// -- SoftmaxGrad: out = p · (g − Σ g·p) ---------------------------------------------------------------
//
// With S = Σ g·p, the cotangent c gives  ∂/∂p: c·(g − S) − g·Σ c·p  and  ∂/∂g: p·(c − Σ c·p).

void SoftmaxGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_rows(inputs, out, stream(), [](const float* p, const float* g, float* o, size_t n, size_t cols) {
    kernels::softmax_grad(p, g, o, n / cols, cols);
  });
}

std::vector<mx::array> SoftmaxGrad::vjp(const std::vector<mx::array>& primals,
                                        const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                        const std::vector<mx::array>&) {
  const auto &p = primals[0], &g = primals[1], &c = cotangents[0];
  auto s = stream();
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg == 0) {
      auto S = row_sum(mx::multiply(g, p, s), s);
      auto cp = row_sum(mx::multiply(c, p, s), s);
      out.push_back(mx::subtract(mx::multiply(c, mx::subtract(g, S, s), s), mx::multiply(g, cp, s), s));
    } else {
      out.push_back(zrecipe_native::softmax_grad(p, c, s));
    }
  }
  return out;
}

std::vector<mx::array> SoftmaxGrad::jvp(const std::vector<mx::array>& primals,
                                        const std::vector<mx::array>& tangents, const std::vector<int>& argnums) {
  const auto &p = primals[0], &g = primals[1];
  auto s = stream();
  std::optional<mx::array> total;
  for (size_t i = 0; i < argnums.size(); ++i) {
    const auto& t = tangents[i];
    mx::array part = argnums[i] == 0
                         ? mx::subtract(mx::multiply(t, mx::subtract(g, row_sum(mx::multiply(g, p, s), s), s), s),
                                        mx::multiply(p, row_sum(mx::multiply(g, t, s), s), s), s)
                         : zrecipe_native::softmax_grad(p, t, s);
    total = total ? mx::add(*total, part, s) : part;
  }
  return {*total};
}

mx::array SoftmaxGrad::apply(const std::vector<mx::array>& inputs) {
  return zrecipe_native::softmax_grad(inputs[0], inputs[1], stream());
}

}  // namespace zrecipe_native
