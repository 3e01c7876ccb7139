// Reading MLX arrays whose memory is not row-major (transposed, sliced or broadcast views).
#pragma once

#include "mlx/array.h"

namespace zrecipe_native {

// Row-major copy of a strided float array (shape and strides in elements, `src` at its first element).
void gather(const float* src, const mlx::core::Shape& shape, const mlx::core::Strides& strides, float* dst);

}  // namespace zrecipe_native
