// Vectorised float32 exp, SiLU and row softmax, written once with GCC/Clang vector extensions.
//
// The same templates are compiled for every instruction set the dispatcher in kernels.cpp offers: the
// x86-64 baseline (SSE2), AVX2+FMA and AVX-512 (through `target` attributes, chosen at run time), and NEON
// on arm64. A vector of W floats is one register where the ISA has W lanes and a few registers elsewhere;
// the compiler does that split. Everything here is `always_inline` so that it takes on the instruction set
// of the dispatcher entry point it is inlined into.
//
// exp follows zrecipe's `exp_poly` contract: x = n·ln2 + r (Cody–Waite, |r| ≤ ln2/2), e^r by its degree-7
// Taylor polynomial, 2^n written into the exponent bits; exactly 0 below −87 (no denormals), clamped at
// 88 (no inf), NaN in → NaN out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#define ZR_INLINE inline __attribute__((always_inline))

namespace zrecipe_native {

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(W * 4)));
  typedef int32_t i __attribute__((vector_size(W * 4)));
};

template <int W>
ZR_INLINE typename Vec<W>::f load(const float* p) {
  typename Vec<W>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
ZR_INLINE void store(float* p, typename Vec<W>::f v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int W>
ZR_INLINE typename Vec<W>::f splat(float s) {
  return typename Vec<W>::f{} + s;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 in few enough bits that n·kLn2Hi is exact
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kExpLow = -87.0f;  // below: exactly 0 (e^-87 ≈ 1.6e-38, the last normal floats)
constexpr float kExpHigh = 88.0f;  // above: e^88 ≈ 1.65e38 (float32's max is 3.4e38)
constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer held in the low bits

template <int W>
ZR_INLINE typename Vec<W>::f exp_vec(typename Vec<W>::f x) {
  using F = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  // Comparisons are false for NaN, so a NaN passes both clamps and the final select unchanged.
  F xc = x < kExpLow ? splat<W>(kExpLow) : x;
  xc = xc > kExpHigh ? splat<W>(kExpHigh) : xc;
  F t = xc * kLog2e + kRound;  // n + 1.5·2^23 with n = round(x·log2 e), |n| ≤ 127
  F n = t - kRound;
  F r = (xc - n * kLn2Hi) - n * kLn2Lo;
  F p = splat<W>(1.0f / 5040.0f);
  p = p * r + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits = ((I)t - (I)splat<W>(kRound) + 127) << 23;  // the integer n, moved into the exponent field
  F y = p * (F)bits;
  return x < kExpLow ? splat<W>(0.0f) : y;
}

template <int W>
ZR_INLINE typename Vec<W>::f sigmoid_vec(typename Vec<W>::f x) {
  return 1.0f / (1.0f + exp_vec<W>(-x));
}

template <int W>
ZR_INLINE typename Vec<W>::f max_vec(typename Vec<W>::f a, typename Vec<W>::f b) {
  return a > b ? a : b;
}

template <int W>
ZR_INLINE float hsum(typename Vec<W>::f v) {
  float lanes[W];
  std::memcpy(lanes, &v, sizeof(v));
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += lanes[i];
  return s;
}

template <int W>
ZR_INLINE float hmax(typename Vec<W>::f v) {
  float lanes[W];
  std::memcpy(lanes, &v, sizeof(v));
  float m = lanes[0];
  for (int i = 1; i < W; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}

// Elementwise kernels over n contiguous floats (in and out may be the same buffer). The tail (n % W) goes
// through the same vector code on a zero-padded copy, so every element gets bit-identical arithmetic.
template <int W, class Op>
ZR_INLINE void map1(const float* x, float* out, size_t n, Op op) {
  size_t i = 0;
  for (; i + W <= n; i += W) store<W>(out + i, op(load<W>(x + i)));
  if (i < n) {
    float bx[W] = {};
    std::memcpy(bx, x + i, (n - i) * 4);
    float bo[W];
    store<W>(bo, op(load<W>(bx)));
    std::memcpy(out + i, bo, (n - i) * 4);
  }
}

template <int W, class Op>
ZR_INLINE void map2(const float* x, const float* g, float* out, size_t n, Op op) {
  size_t i = 0;
  for (; i + W <= n; i += W) store<W>(out + i, op(load<W>(x + i), load<W>(g + i)));
  if (i < n) {
    float bx[W] = {}, bg[W] = {};
    std::memcpy(bx, x + i, (n - i) * 4);
    std::memcpy(bg, g + i, (n - i) * 4);
    float bo[W];
    store<W>(bo, op(load<W>(bx), load<W>(bg)));
    std::memcpy(out + i, bo, (n - i) * 4);
  }
}

struct ExpOp {
  template <class F>
  ZR_INLINE F operator()(F v) const {
    return exp_vec<sizeof(F) / 4>(v);
  }
};

struct SiluOp {
  template <class F>
  ZR_INLINE F operator()(F v) const {
    return v / (1.0f + exp_vec<sizeof(F) / 4>(-v));
  }
};

// d silu / dx = s·(1 + x·(1 − s)) with s = sigmoid(x); times the cotangent g.
struct SiluGradOp {
  template <class F>
  ZR_INLINE F operator()(F v, F g) const {
    F s = sigmoid_vec<sizeof(F) / 4>(v);
    return g * s * (1.0f + v * (1.0f - s));
  }
};

// One row's exp(x − max) into `out` (may be x), returning the row's sum and writing its max to `row_max`.
// The tail goes through the vector exp on a copy padded with −inf (whose exp, 0, adds nothing).
template <int W>
ZR_INLINE float exp_row_minus_max(const float* x, float* out, size_t cols, float* row_max) {
  using F = typename Vec<W>::f;
  const size_t body = cols - cols % W;
  float m = -__builtin_inff();
  if (body) {
    F mv = load<W>(x);
    for (size_t i = W; i < body; i += W) mv = max_vec<W>(mv, load<W>(x + i));
    m = hmax<W>(mv);
  }
  for (size_t i = body; i < cols; ++i) m = x[i] > m ? x[i] : m;
  const F mv = splat<W>(m);
  F sv = splat<W>(0.0f);
  for (size_t i = 0; i < body; i += W) {
    F e = exp_vec<W>(load<W>(x + i) - mv);
    store<W>(out + i, e);
    sv += e;
  }
  float sum = hsum<W>(sv);
  if (body < cols) {
    float t[W];
    for (int k = 0; k < W; ++k) t[k] = -__builtin_inff();
    std::memcpy(t, x + body, (cols - body) * 4);
    F e = exp_vec<W>(load<W>(t) - mv);
    sum += hsum<W>(e);
    std::memcpy(t, &e, sizeof(e));
    std::memcpy(out + body, t, (cols - body) * 4);
  }
  *row_max = m;
  return sum;
}

// Softmax of each of `rows` rows of `cols` contiguous floats: max, exp(x − max) with its sum, scale.
// A row of a few thousand floats stays in L1/L2 between the three passes, so memory is read once.
template <int W>
ZR_INLINE void softmax_rows(const float* x, float* out, size_t rows, size_t cols) {
  const size_t body = cols - cols % W;
  for (size_t r = 0; r < rows; ++r) {
    float* orow = out + r * cols;
    float m;
    const float inv = 1.0f / exp_row_minus_max<W>(x + r * cols, orow, cols, &m);
    for (size_t i = 0; i < body; i += W) store<W>(orow + i, load<W>(orow + i) * inv);
    for (size_t i = body; i < cols; ++i) orow[i] *= inv;
  }
}

// The softmax VJP from its output p and cotangent g: p·(g − Σ g·p), per row.
template <int W>
ZR_INLINE void softmax_grad_rows(const float* p, const float* g, float* out, size_t rows, size_t cols) {
  using F = typename Vec<W>::f;
  const size_t body = cols - cols % W;
  for (size_t r = 0; r < rows; ++r) {
    const float* pr = p + r * cols;
    const float* gr = g + r * cols;
    float* orow = out + r * cols;
    F dv = splat<W>(0.0f);
    for (size_t i = 0; i < body; i += W) dv += load<W>(pr + i) * load<W>(gr + i);
    float dot = hsum<W>(dv);
    for (size_t i = body; i < cols; ++i) dot += pr[i] * gr[i];
    const F d = splat<W>(dot);
    for (size_t i = 0; i < body; i += W) store<W>(orow + i, load<W>(pr + i) * (load<W>(gr + i) - d));
    for (size_t i = body; i < cols; ++i) orow[i] = pr[i] * (gr[i] - dot);
  }
}

// -- rows of attention scores (flash_attention.cpp) -----------------------------------------------------

// exp(x − shift) of a row's last `cols − body` floats, in place, through the vector exp on a copy padded
// with −inf (whose exp is 0, so the padding adds nothing); returns the tail's sum.
template <int W>
ZR_INLINE float exp_tail(float* row, size_t body, size_t cols, typename Vec<W>::f shift) {
  using F = typename Vec<W>::f;
  if (body == cols) return 0.0f;
  float b[W];
  for (int k = 0; k < W; ++k) b[k] = -__builtin_inff();
  std::memcpy(b, row + body, (cols - body) * 4);
  F e = exp_vec<W>(load<W>(b) - shift);
  std::memcpy(b, &e, sizeof(e));
  std::memcpy(row + body, b, (cols - body) * 4);
  return hsum<W>(e);
}

// In place, per row: m = max, x ← exp(x − m), l = Σ exp(x − m) (the unnormalised softmax, its max and sum).
template <int W>
ZR_INLINE void exp_rows_max(float* x, size_t rows, size_t cols, float* row_max, float* row_sum) {
  for (size_t r = 0; r < rows; ++r) row_sum[r] = exp_row_minus_max<W>(x + r * cols, x + r * cols, cols, row_max + r);
}

// In place, per row: x ← exp(x − shift[r]) (probabilities back from scores and the log-sum-exp).
template <int W>
ZR_INLINE void exp_rows_shift(float* x, const float* shift, size_t rows, size_t cols) {
  const size_t body = cols - cols % W;
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * cols;
    const auto sv = splat<W>(shift[r]);
    for (size_t i = 0; i < body; i += W) store<W>(xr + i, exp_vec<W>(load<W>(xr + i) - sv));
    exp_tail<W>(xr, body, cols, sv);
  }
}

// In place, per row: d ← p·(d − term[r]) (the softmax VJP once Σ p·d is known: term = dO·O − d lse).
template <int W>
ZR_INLINE void softmax_grad_rows_given(const float* p, float* d, const float* term, size_t rows, size_t cols) {
  const size_t body = cols - cols % W;
  for (size_t r = 0; r < rows; ++r) {
    const float* pr = p + r * cols;
    float* dr = d + r * cols;
    const float t = term[r];
    const auto tv = splat<W>(t);
    for (size_t i = 0; i < body; i += W) store<W>(dr + i, load<W>(pr + i) * (load<W>(dr + i) - tv));
    for (size_t i = body; i < cols; ++i) dr[i] = pr[i] * (dr[i] - t);
  }
}

// -- GroupNorm's last pass (group_norm.cpp) -------------------------------------------------------------

// out[p, c] = x[p, c] · scale[c] + shift[c] over `pixels` rows of `channels` floats, then SiLU when `act`.
template <int W>
ZR_INLINE void affine_rows(const float* x, float* out, size_t pixels, size_t channels, const float* scale,
                           const float* shift, bool act) {
  const size_t body = channels - channels % W;
  for (size_t p = 0; p < pixels; ++p) {
    const float* xr = x + p * channels;
    float* orow = out + p * channels;
    for (size_t c = 0; c < body; c += W) {
      auto y = load<W>(xr + c) * load<W>(scale + c) + load<W>(shift + c);
      store<W>(orow + c, act ? SiluOp{}(y) : y);
    }
    if (body < channels) {  // the tail through the same vector code on padded copies
      float bx[W] = {}, bs[W] = {}, bt[W] = {}, bo[W];
      const size_t n = channels - body;
      std::memcpy(bx, xr + body, n * 4);
      std::memcpy(bs, scale + body, n * 4);
      std::memcpy(bt, shift + body, n * 4);
      auto y = load<W>(bx) * load<W>(bs) + load<W>(bt);
      store<W>(bo, act ? SiluOp{}(y) : y);
      std::memcpy(orow + body, bo, n * 4);
    }
  }
}

}  // namespace zrecipe_native
