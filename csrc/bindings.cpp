// zrecipe._native: the Python face of the primitives (zrecipe/native.py is the only caller).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "conv2d.h"
#include "flash_attention.h"
#include "group_norm.h"
#include "kernels.h"
#include "mlx/version.h"
#include "primitives.h"

namespace nb = nanobind;
using namespace nb::literals;

#define ZR_STR2(x) #x
#define ZR_STR(x) ZR_STR2(x)

NB_MODULE(_native, m) {
  m.doc() = "zrecipe's vectorised float32 CPU kernels as MLX primitives (exp, SiLU, last-axis softmax).";

  // The MLX headers this module was compiled against, and the libmlx it runs with: they must agree.
  m.attr("build_mlx_version") =
      ZR_STR(MLX_VERSION_MAJOR) "." ZR_STR(MLX_VERSION_MINOR) "." ZR_STR(MLX_VERSION_PATCH);
  m.def("runtime_mlx_version", [] { return std::string(mlx::core::version()); });

  m.def("exp", &zrecipe_native::exp, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "e^x in float32: exactly 0 below -87, e^88 above 88.");
  m.def("silu", &zrecipe_native::silu, "x"_a, nb::kw_only(), "stream"_a = nb::none(), "x * sigmoid(x) in float32.");
  m.def("silu_grad", &zrecipe_native::silu_grad, "x"_a, "g"_a, nb::kw_only(), "stream"_a = nb::none(),
        "g * silu'(x): SiLU's vector-Jacobian product.");
  m.def("softmax", &zrecipe_native::softmax, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Softmax over the last axis in float32.");
  m.def("softmax_grad", &zrecipe_native::softmax_grad, "p"_a, "g"_a, nb::kw_only(), "stream"_a = nb::none(),
        "p * (g - sum(g * p, -1)): softmax's vector-Jacobian product from its output p.");

  m.def("flash_attention", &zrecipe_native::flash_attention, "q"_a, "k"_a, "v"_a, "scale"_a,
        "mask"_a = nb::none(), nb::kw_only(), "rows"_a = 0, "stream"_a = nb::none(),
        "Softmax attention with O(N) memory: (output, per-row log-sum-exp); float32 (B, H, L, D) q and\n"
        "(B, H, S, D) k, v; an optional boolean mask with four axes (True = attend); rows: query rows per tile\n"
        "(0: chosen from the key count).");

  m.def("group_norm", &zrecipe_native::group_norm, "x"_a, "weight"_a, "bias"_a, "groups"_a, "eps"_a, "act"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "GroupNorm of (B, H, W, C) float32 feature maps (PyTorch's statistics), then SiLU when act.");
  m.def("conv2d", &zrecipe_native::conv2d, "x"_a, "weight"_a, "bias"_a = nb::none(), "stride"_a = 1,
        "padding"_a = 0, nb::kw_only(), "stream"_a = nb::none(),
        "Convolution of (B, H, W, C) float32 maps with (O, KH, KW, C) weights (+ bias), zero padding on\n"
        "every side, one stride for both axes; unfolds one tile of output pixels at a time.");
  m.def("conv2d_scratch_bytes", &zrecipe_native::conv2d_scratch_bytes, "out_pixels"_a, "kernel_h"_a, "kernel_w"_a,
        "channels"_a, "Bytes of scratch one conv2d call takes.");
  m.def("flash_attention_scratch_bytes", &zrecipe_native::flash_attention_scratch_bytes, "batch"_a, "heads"_a,
        "queries"_a, "keys"_a, "backward"_a, "Bytes of scratch one flash_attention call (or its backward) takes.");

  m.def("supported_isas", &zrecipe_native::kernels::supported_isas, "Instruction sets usable on this CPU, best first.");
  m.def("isa", &zrecipe_native::kernels::active_isa, "The instruction set the kernels use now.");
  m.def("set_isa", &zrecipe_native::kernels::select_isa, "name"_a, "Use another supported instruction set.");
  m.def("threads", &zrecipe_native::kernels::threads, "Threads one kernel call may use.");
  m.def("set_threads", &zrecipe_native::kernels::set_threads, "n"_a, "Set the threads one kernel call may use.");
  m.def("compute_threads", &zrecipe_native::kernels::compute_threads,
        "Threads one flash_attention call may use.");
  m.def("set_compute_threads", &zrecipe_native::kernels::set_compute_threads, "n"_a,
        "Set the threads one flash_attention call may use.");
}
