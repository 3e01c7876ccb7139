// The float32 CPU kernels behind the primitives: one set per instruction set, chosen at run time, run on
// a few threads when the array is large enough to pay for them.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace zrecipe_native::kernels {

// Instruction sets this build has kernels for and this CPU runs, best first ("avx512", "avx2", "sse2"
// on x86-64; "neon" on arm64; "generic" elsewhere).
std::vector<std::string> supported_isas();
// The set in use: the best supported one, or ZRECIPE_NATIVE_ISA when that names a supported one.
std::string active_isa();
// Switch sets (tests run every supported one); throws std::invalid_argument for an unsupported name.
void select_isa(const std::string& name);

// Threads a kernel may use (ZRECIPE_NATIVE_THREADS, else the CPU count capped at 4; ≥ 1).
int threads();
void set_threads(int n);

// Contiguous float32 buffers; `out` may alias the first input.
void exp(const float* x, float* out, size_t n);
void silu(const float* x, float* out, size_t n);
void silu_grad(const float* x, const float* g, float* out, size_t n);
void softmax(const float* x, float* out, size_t rows, size_t cols);
void softmax_grad(const float* p, const float* g, float* out, size_t rows, size_t cols);

// out[p, c] = x[p, c] · scale[c] + shift[c] for `pixels` rows of `channels`, then SiLU when `act` (threaded).
void affine_rows(const float* x, float* out, size_t pixels, size_t channels, const float* scale, const float* shift,
                 bool act);

// Row kernels for code already running on a thread of its own (flash_attention.cpp): one thread each.
// exp_rows_max: in place x ← exp(x − row max), with each row's max and sum of exponentials.
void exp_rows_max(float* x, size_t rows, size_t cols, float* row_max, float* row_sum);
// exp_rows_shift: in place x ← exp(x − shift[row]).
void exp_rows_shift(float* x, const float* shift, size_t rows, size_t cols);
// softmax_grad_rows_given: in place d ← p · (d − term[row]).
void softmax_grad_rows_given(const float* p, float* d, const float* term, size_t rows, size_t cols);

// Threads for compute-bound kernels (attention): ZRECIPE_NATIVE_THREADS, else every CPU this process may
// run on (the elementwise kernels stop at 4: memory bandwidth bounds them). Settable like the BLAS's
// thread count (zrecipe.backend.blas_threads shares both out between concurrent CPU streams).
int compute_threads();
void set_compute_threads(int n);

// body(begin, end) over [0, n) in up to `max_threads` contiguous chunks of at least `grain` items, with
// denormals flushed to zero while it runs.
void parallel(size_t n, size_t grain, int max_threads, const std::function<void(size_t, size_t)>& body);

}  // namespace zrecipe_native::kernels
