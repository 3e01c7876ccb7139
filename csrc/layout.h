// Reading MLX arrays whose memory is not row-major (transposed, sliced or broadcast views).
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>

#include "mlx/array.h"

namespace zrecipe_native {

inline size_t element_count(const mlx::core::Shape& shape) {
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  return n;
}

// Row-major copy of a strided float array (shape and strides in elements, `src` at its first element).
void gather(const float* src, const mlx::core::Shape& shape, const mlx::core::Strides& strides, float* dst);

// The row-major view a kernel reads: the array's own buffer when it is row-contiguous, else a gathered
// copy owned by `keep`. Made in eval_cpu, `rows` called inside the dispatched task (the data exists only then).
struct Layout {
  const float* data;
  mlx::core::Shape shape;
  mlx::core::Strides strides;
  bool row_contiguous;

  explicit Layout(const mlx::core::array& a)
      : data(a.data<float>()), shape(a.shape()), strides(a.strides()), row_contiguous(a.flags().row_contiguous) {}

  const float* rows(std::unique_ptr<float[]>& keep) const {
    if (row_contiguous) return data;
    keep.reset(new float[std::max<size_t>(element_count(shape), 1)]);
    gather(data, shape, strides, keep.get());
    return keep.get();
  }
};

}  // namespace zrecipe_native
