// Run-time choice of the instruction set, threading, and denormal handling for the kernels of simd_math.h.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

#include "simd_math.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define ZR_X86_64 1
#endif

namespace zrecipe_native::kernels {
namespace {

struct KernelSet {
  const char* name;
  void (*exp)(const float*, float*, size_t);
  void (*silu)(const float*, float*, size_t);
  void (*silu_grad)(const float*, const float*, float*, size_t);
  void (*softmax)(const float*, float*, size_t, size_t);
  void (*softmax_grad)(const float*, const float*, float*, size_t, size_t);
  void (*exp_rows_max)(float*, size_t, size_t, float*, float*);
  void (*exp_rows_shift)(float*, const float*, size_t, size_t);
  void (*softmax_grad_rows_given)(const float*, float*, const float*, size_t, size_t);
  void (*affine_rows)(const float*, float*, size_t, size_t, const float*, const float*, bool);
};

// One kernel set: entry points compiled for the instruction set named by ATTR, W floats per vector.
#define ZR_KERNEL_SET(NAME, ATTR, W)                                                                 \
  ATTR void NAME##_exp(const float* x, float* o, size_t n) {                                         \
    map1<W>(x, o, n, ExpOp{});                                                                       \
  }                                                                                                  \
  ATTR void NAME##_silu(const float* x, float* o, size_t n) {                                        \
    map1<W>(x, o, n, SiluOp{});                                                                      \
  }                                                                                                  \
  ATTR void NAME##_silu_grad(const float* x, const float* g, float* o, size_t n) {                   \
    map2<W>(x, g, o, n, SiluGradOp{});                                                               \
  }                                                                                                  \
  ATTR void NAME##_softmax(const float* x, float* o, size_t rows, size_t cols) {                     \
    softmax_rows<W>(x, o, rows, cols);                                                               \
  }                                                                                                  \
  ATTR void NAME##_softmax_grad(const float* p, const float* g, float* o, size_t rows, size_t cols) { \
    softmax_grad_rows<W>(p, g, o, rows, cols);                                                       \
  }                                                                                                  \
  ATTR void NAME##_exp_rows_max(float* x, size_t rows, size_t cols, float* m, float* l) {            \
    zrecipe_native::exp_rows_max<W>(x, rows, cols, m, l);                                            \
  }                                                                                                  \
  ATTR void NAME##_exp_rows_shift(float* x, const float* shift, size_t rows, size_t cols) {          \
    zrecipe_native::exp_rows_shift<W>(x, shift, rows, cols);                                         \
  }                                                                                                  \
  ATTR void NAME##_softmax_grad_rows_given(const float* p, float* d, const float* t, size_t rows,     \
                                           size_t cols) {                                            \
    zrecipe_native::softmax_grad_rows_given<W>(p, d, t, rows, cols);                                 \
  }                                                                                                  \
  ATTR void NAME##_affine_rows(const float* x, float* o, size_t pixels, size_t channels, const float* s, \
                               const float* t, bool act) {                                           \
    zrecipe_native::affine_rows<W>(x, o, pixels, channels, s, t, act);                               \
  }                                                                                                  \
  const KernelSet NAME##_set = {#NAME,                                                               \
                                NAME##_exp,                                                          \
                                NAME##_silu,                                                         \
                                NAME##_silu_grad,                                                    \
                                NAME##_softmax,                                                      \
                                NAME##_softmax_grad,                                                 \
                                NAME##_exp_rows_max,                                                 \
                                NAME##_exp_rows_shift,                                               \
                                NAME##_softmax_grad_rows_given,                                      \
                                NAME##_affine_rows};

#if defined(ZR_X86_64)
ZR_KERNEL_SET(avx512, __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), 16)
ZR_KERNEL_SET(avx2, __attribute__((target("avx2,fma"))), 8)
ZR_KERNEL_SET(sse2, , 4)
#elif defined(__aarch64__)
ZR_KERNEL_SET(neon, , 4)
#else
ZR_KERNEL_SET(generic, , 4)
#endif

std::vector<const KernelSet*> supported_sets() {
  std::vector<const KernelSet*> out;
#if defined(ZR_X86_64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    out.push_back(&avx512_set);
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&avx2_set);
  out.push_back(&sse2_set);
#elif defined(__aarch64__)
  out.push_back(&neon_set);
#else
  out.push_back(&generic_set);
#endif
  return out;
}

const KernelSet* find_set(const std::string& name) {
  for (auto* s : supported_sets()) {
    if (name == s->name) return s;
  }
  return nullptr;
}

const KernelSet* initial_set() {
  const char* env = std::getenv("ZRECIPE_NATIVE_ISA");
  if (env && *env) {
    if (auto* s = find_set(env)) return s;
  }
  return supported_sets().front();
}

std::atomic<const KernelSet*> g_set{initial_set()};

int cpu_count() {
#if defined(__linux__)
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) return std::max(1, CPU_COUNT(&mask));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

int initial_threads() {
  if (const char* env = std::getenv("ZRECIPE_NATIVE_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return std::min(cpu_count(), 4);
}

std::atomic<int> g_threads{initial_threads()};

int initial_compute_threads() {
  if (const char* env = std::getenv("ZRECIPE_NATIVE_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return cpu_count();
}

std::atomic<int> g_compute_threads{initial_compute_threads()};

// Flush denormal results to zero and read denormal inputs as zero while a kernel runs (x86: ~100× slower
// arithmetic on denormals); the caller's floating-point state is restored afterwards.
struct FlushDenormals {
#if defined(ZR_X86_64)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() {
    _mm_setcsr(saved | 0x8040);
  }
  ~FlushDenormals() {
    _mm_setcsr(saved);
  }
#endif
};

// body(begin, end) over [0, n) in up to threads() contiguous chunks of at least `grain` items; the calling
// thread takes the first chunk. Results do not depend on the split (every element and every row is
// computed by the same code whatever chunk it falls in).
template <class Body>
void parallel_for(size_t n, size_t grain, const Body& body, int max_threads = g_threads.load()) {
  size_t chunks = std::min<size_t>(static_cast<size_t>(std::max(max_threads, 1)), (n + grain - 1) / grain);
  if (chunks <= 1) {
    FlushDenormals guard;
    body(size_t{0}, n);
    return;
  }
  size_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (size_t b = step; b < n; b += step) {
    size_t e = std::min(n, b + step);
    workers.emplace_back([&body, b, e] {
      FlushDenormals guard;
      body(b, e);
    });
  }
  {
    FlushDenormals guard;
    body(size_t{0}, std::min(n, step));
  }
  for (auto& w : workers) w.join();
}

// Work per thread worth a thread start (~20-50 µs): about 100 µs of single-thread kernel time.
constexpr size_t kGrainElements = size_t{1} << 17;

size_t row_grain(size_t cols) {
  return std::max<size_t>(1, kGrainElements / std::max<size_t>(cols, 1));
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (auto* s : supported_sets()) out.emplace_back(s->name);
  return out;
}

std::string active_isa() {
  return g_set.load()->name;
}

void select_isa(const std::string& name) {
  const KernelSet* s = find_set(name);
  if (!s) throw std::invalid_argument("instruction set '" + name + "' is not supported on this CPU");
  g_set.store(s);
}

int threads() {
  return g_threads.load();
}

void set_threads(int n) {
  if (n < 1) throw std::invalid_argument("the thread count must be at least 1");
  g_threads.store(n);
}

void exp(const float* x, float* out, size_t n) {
  auto* k = g_set.load();
  parallel_for(n, kGrainElements, [&](size_t b, size_t e) { k->exp(x + b, out + b, e - b); });
}

void silu(const float* x, float* out, size_t n) {
  auto* k = g_set.load();
  parallel_for(n, kGrainElements, [&](size_t b, size_t e) { k->silu(x + b, out + b, e - b); });
}

void silu_grad(const float* x, const float* g, float* out, size_t n) {
  auto* k = g_set.load();
  parallel_for(n, kGrainElements, [&](size_t b, size_t e) { k->silu_grad(x + b, g + b, out + b, e - b); });
}

void softmax(const float* x, float* out, size_t rows, size_t cols) {
  auto* k = g_set.load();
  parallel_for(rows, row_grain(cols), [&](size_t b, size_t e) {
    k->softmax(x + b * cols, out + b * cols, e - b, cols);
  });
}

void softmax_grad(const float* p, const float* g, float* out, size_t rows, size_t cols) {
  auto* k = g_set.load();
  parallel_for(rows, row_grain(cols), [&](size_t b, size_t e) {
    k->softmax_grad(p + b * cols, g + b * cols, out + b * cols, e - b, cols);
  });
}

void exp_rows_max(float* x, size_t rows, size_t cols, float* row_max, float* row_sum) {
  g_set.load()->exp_rows_max(x, rows, cols, row_max, row_sum);
}

void exp_rows_shift(float* x, const float* shift, size_t rows, size_t cols) {
  g_set.load()->exp_rows_shift(x, shift, rows, cols);
}

void softmax_grad_rows_given(const float* p, float* d, const float* term, size_t rows, size_t cols) {
  g_set.load()->softmax_grad_rows_given(p, d, term, rows, cols);
}

int compute_threads() {
  return g_compute_threads.load();
}

void set_compute_threads(int n) {
  if (n < 1) throw std::invalid_argument("the thread count must be at least 1");
  g_compute_threads.store(n);
}

void affine_rows(const float* x, float* out, size_t pixels, size_t channels, const float* scale, const float* shift,
                 bool act) {
  auto* k = g_set.load();
  parallel_for(pixels, row_grain(channels), [&](size_t b, size_t e) {
    k->affine_rows(x + b * channels, out + b * channels, e - b, channels, scale, shift, act);
  });
}

void parallel(size_t n, size_t grain, int max_threads, const std::function<void(size_t, size_t)>& body) {
  parallel_for(n, grain, body, max_threads);
}

}  // namespace zrecipe_native::kernels
