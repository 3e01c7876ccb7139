// The float32 CPU kernels behind the primitives: one set per instruction set, chosen at run time, run on
// a few threads when the array is large enough to pay for them.
#pragma once

#include <cstddef>
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

}  // namespace zrecipe_native::kernels
