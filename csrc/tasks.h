// Compute-bound work split into independent tasks (flash attention's (batch, head) pairs, a convolution's
// pixel tiles), each task running single-threaded BLAS calls on scratch of its own.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels.h"
#include "mlx/allocator.h"

// The process's CBLAS (undefined here, bound at load time as libmlx's own is) and, where the BLAS is
// OpenBLAS, its thread control (weak: null with any other BLAS).
extern "C" {
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
int openblas_get_num_threads(void) __attribute__((weak));
void openblas_set_num_threads(int) __attribute__((weak));
}

namespace zrecipe_native {

namespace mx = mlx::core;

// Row-major C = alpha · op(A) · op(B) + beta · C.
inline void sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c,
              ldc);
}

// While tasks run on several threads, each BLAS call runs on its own thread (OpenBLAS would otherwise
// start its whole pool inside every call). Restores OpenBLAS's thread count afterwards.
struct SerialBlas {
  int saved = 0;
  explicit SerialBlas(bool on) {
    if (on && openblas_get_num_threads && openblas_set_num_threads) {
      saved = openblas_get_num_threads();
      if (saved > 1) openblas_set_num_threads(1);
    }
  }
  ~SerialBlas() {
    if (saved > 1) openblas_set_num_threads(saved);
  }
};

// Threads for `tasks` independent tasks: compute_threads(), at most one per task.
inline int task_threads(int64_t tasks) {
  return static_cast<int>(std::min<int64_t>(kernels::compute_threads(), std::max<int64_t>(tasks, 1)));
}

// body(task, scratch) for every task in [0, tasks); tasks are dealt round-robin to up to task_threads()
// threads, each with its own `floats_per_thread` of scratch, each BLAS call single-threaded. The scratch
// comes from MLX's allocator, so that MLX's memory counters include it, and is taken inside the stream's
// task: tasks of a stream run one after another, so two calls' scratch is never alive at once.
class TaskRunner {
 public:
  TaskRunner(int64_t tasks, size_t floats_per_thread)
      : tasks_(tasks),
        threads_(task_threads(tasks)),
        per_thread_(floats_per_thread),
        scratch_(mx::allocator::malloc(sizeof(float) * std::max<size_t>(per_thread_ * threads_, 1))) {}

  template <class Body>
  void run(const Body& body) const {
    // Serial even on one thread: a BLAS call's own threads would split its rows differently, and edge
    // rows go through other micro-kernels, so results would depend on the thread count.
    SerialBlas serial(true);
    float* base = static_cast<float*>(scratch_.buffer().raw_ptr());
    kernels::parallel(threads_, 1, threads_, [&](size_t first, size_t last) {
      for (size_t t = first; t < last; ++t) {
        for (int64_t u = static_cast<int64_t>(t); u < tasks_; u += threads_) body(u, base + t * per_thread_);
      }
    });
  }

 private:
  int64_t tasks_;
  int threads_;
  size_t per_thread_;
  mx::allocator::Data scratch_;  // freed with the runner
};

}  // namespace zrecipe_native
