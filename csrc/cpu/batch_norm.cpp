// CPU kernel of BatchNorm's double backward: the gradients (d_dy, d_x, d_w) of
//   S = sum(ggx * dx) + ggw . dw + ggb . db
// where (dx, dw, db) is BatchNorm's backward (formulas: the BatchNorm section of qgrad/reference.py).
//
// Per channel the work is two passes over its elements:
//   1. five sums: sum(ggx), sum(ggx * xc), sum(ggx * dy), sum(dy), sum(dy * xc), with xc = x - mean (the
//      last two are skipped when the first backward kept them);
//   2. from those, seven per-channel coefficients, and then, elementwise,
//        d_dy = a1 * ggx + b1 * xc + c1
//        d_x  = a2 * ggx + b2 * xc + d2 * dy + c2
//      (eval mode is the same with the coefficients of constant statistics).
// x is a contiguous (N, C, S) array; three task shapes (in the first two a task owns whole channels and runs both
// passes on them, so pass 2 finds the channel's data in cache when it fits there):
//   * segments (S >= kSmallInner): one channel per task; the innermost loops run over a contiguous segment of S
//     elements, with sums kept in kLanes independent float lanes folded into double every kFoldElems elements;
//   * columns (1 < S < kSmallInner): a task is a block of channels, i.e. a contiguous span of columns of each
//     row, with per-column float sums folded into double every kFoldRows rows;
//   * rows (S = 1: (N, C) inputs, and channels-last tensors passed as their (N * H * W, C) view): tasks are
//     chunks of rows times blocks of channels; see run_rows.
// Task boundaries depend on the shape only, and each channel is reduced in a fixed order, so the results are
// identical for any number of threads. float64 inputs accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../batch_norm.h"
#include "op_math.h"

namespace qgrad {
namespace {

constexpr int64_t kSmallInner = 16;  // trailing extents below this use the column tasks
constexpr int64_t kColumnSpan = 4096;  // columns (channels x S) per column task
constexpr int64_t kFoldRows = 64;      // rows summed in float before folding into double (column tasks)
constexpr int64_t kFoldElems = 8192;   // elements summed in float lanes before folding into double (segments)
constexpr int kLanes = 16;             // independent accumulators of a segment
constexpr int64_t kRowChunk = 512;     // rows per row task
constexpr int64_t kRowBlockCols = 512; // channels per row task

// Per-channel sums of pass 1, in the order of the header comment.
enum { kG = 0, kGX, kGDY, kDY, kDYX, kNumSums };

// Per-channel coefficients of pass 2.
struct Coef {
  double a1 = 0, b1 = 0, c1 = 0, a2 = 0, b2 = 0, c2 = 0, d2 = 0;
};

struct Channel {
  // inputs (per channel, float64)
  double mean, invstd, w, gw, gb;
  // precomputed sums of the first backward, when given
  bool have_dy_sums;
  double sum_dy, sum_dy_xhat;
};

// From the sums of pass 1 to the coefficients of pass 2 and the weight gradient (see qgrad/reference.py).
Coef coefficients(const Channel& ch, const double* s, int64_t m, bool training, bool has_ggx, double& d_w) {
  const double r = ch.invstd, g = ch.w * r, gw = ch.gw, gb = ch.gb;
  Coef k;
  if (!training) {
    k.a1 = g;
    k.b1 = gw * r;
    k.c1 = gb;
    k.d2 = gw * r;
    d_w = has_ggx ? r * s[kGDY] : 0.0;
    return k;
  }
  const double md = static_cast<double>(m);
  const double m_g = has_ggx ? s[kG] / md : 0.0;
  const double m_gx = has_ggx ? s[kGX] * r / md : 0.0;
  const double m_dy = (ch.have_dy_sums ? ch.sum_dy : s[kDY]) / md;
  const double a = ch.have_dy_sums ? ch.sum_dy_xhat / md : s[kDYX] * r / md;  // mean(dy * xhat)
  const double q = has_ggx ? s[kGDY] : 0.0;
  const double big_q = q - md * (m_dy * m_g + a * m_gx);  // sum(ggx * P(dy))
  const double bcoef = gw - g * m_gx;
  const double mean_u = bcoef * m_dy - g * a * m_g;
  const double mean_ux = bcoef * a - g * a * m_gx;
  k.a1 = g;
  k.b1 = bcoef * r;
  k.c1 = gb - g * m_g;
  k.a2 = -r * g * a;
  k.b2 = -(r * r) * (mean_ux + g * big_q / md);
  k.c2 = -r * mean_u;
  k.d2 = r * bcoef;
  d_w = r * big_q;
  return k;
}

template <typename T>
struct Data {
  const T* ggx;  // nullptr when ggx is zero
  const T* dy;
  const T* x;
  T* d_dy;  // nullptr when not requested
  T* d_x;
};

// Float lanes of pass 1 for one channel, kept across its segments and folded into double every kFoldElems
// elements: short segments (S = 64 in a late ResNet stage) would otherwise pay a fold per segment.
template <typename A>
struct Lanes {
  A acc[kNumSums][kLanes] = {};
  int64_t pending = 0;  // elements added since the last fold

  void fold(double* s) {
    for (int k = 0; k < kNumSums; ++k) {
      double t = 0.0;
      for (int l = 0; l < kLanes; ++l) {
        t += acc[k][l];
        acc[k][l] = A(0);
      }
      s[k] += t;
    }
    pending = 0;
  }
};

// Pass 1 over one contiguous segment of one channel: adds its terms to the lanes (folding into s as needed).
template <typename T, bool HasG>
void sums_segment(const Data<T>& p, int64_t off, int64_t n, typename OpMath<T>::type mu,
                  Lanes<typename OpMath<T>::type>& lanes, double* s) {
  using A = typename OpMath<T>::type;
  const T* gp = HasG ? p.ggx + off : nullptr;
  const T* dp = p.dy + off;
  const T* xp = p.x + off;
  auto& acc = lanes.acc;
  auto body = [&](int64_t i, int l) {
    const A xc = static_cast<A>(xp[i]) - mu;
    const A d = static_cast<A>(dp[i]);
    acc[kDY][l] += d;
    acc[kDYX][l] += d * xc;
    if (HasG) {
      const A g = static_cast<A>(gp[i]);
      acc[kG][l] += g;
      acc[kGX][l] += g * xc;
      acc[kGDY][l] += g * d;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) body(i + l, l);
  }
  for (int l = 0; i + l < n; ++l) body(i + l, l);
  lanes.pending += n;
  if (lanes.pending >= kFoldElems) lanes.fold(s);
}

// Pass 2 over one contiguous segment, with per-column coefficients (arrays indexed like the segment) or one
// channel's scalars, so that both task shapes share it. One loop writes both outputs when both are requested.
template <typename T, bool HasG, bool PerColumn, bool WantDy, bool WantX>
void write_loop(const Data<T>& p, int64_t off, int64_t n, const typename OpMath<T>::type* mu,
                const typename OpMath<T>::type* const* k) {
  using A = typename OpMath<T>::type;
  const T* gp = HasG ? p.ggx + off : nullptr;
  const T* dp = p.dy + off;
  const T* xp = p.x + off;
  T* out_dy = WantDy ? p.d_dy + off : nullptr;
  T* out_x = WantX ? p.d_x + off : nullptr;
  const A *a1 = k[0], *b1 = k[1], *c1 = k[2], *a2 = k[3], *b2 = k[4], *c2 = k[5], *d2 = k[6];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = PerColumn ? i : 0;
    const A xc = static_cast<A>(xp[i]) - mu[j];
    const A g = HasG ? static_cast<A>(gp[i]) : A(0);
    if (WantDy) out_dy[i] = static_cast<T>(a1[j] * g + b1[j] * xc + c1[j]);
    if (WantX) out_x[i] = static_cast<T>(a2[j] * g + b2[j] * xc + d2[j] * static_cast<A>(dp[i]) + c2[j]);
  }
}

template <typename T, bool HasG, bool PerColumn>
void write_segment(const Data<T>& p, int64_t off, int64_t n, const typename OpMath<T>::type* mu,
                   const typename OpMath<T>::type* const* k) {
  if (p.d_dy != nullptr && p.d_x != nullptr) {
    write_loop<T, HasG, PerColumn, true, true>(p, off, n, mu, k);
  } else if (p.d_dy != nullptr) {
    write_loop<T, HasG, PerColumn, true, false>(p, off, n, mu, k);
  } else if (p.d_x != nullptr) {
    write_loop<T, HasG, PerColumn, false, true>(p, off, n, mu, k);
  }
}

struct Shape {
  int64_t n, c, s;
};

// Pass 1 of the row tasks over rows [r0, r1) (at most kFoldRows) of columns [c0, c0 + W): the five sums per
// column, in float registers, added into the double sums s[k * C + c] of this row chunk at the end.
template <typename T, bool HasG, int W>
void sums_tile(const Data<T>& p, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
               const typename OpMath<T>::type* __restrict__ mu, double* __restrict__ s) {
  using A = typename OpMath<T>::type;
  A acc[kNumSums][W] = {};
  A m[W];
  for (int j = 0; j < W; ++j) m[j] = mu[c0 + j];
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ xr = p.x + r * cols + c0;
    const T* __restrict__ dr = p.dy + r * cols + c0;
    const T* __restrict__ gr = HasG ? p.ggx + r * cols + c0 : nullptr;
    for (int j = 0; j < W; ++j) {
      const A xc = static_cast<A>(xr[j]) - m[j];
      const A d = static_cast<A>(dr[j]);
      acc[kDY][j] += d;
      acc[kDYX][j] += d * xc;
      if (HasG) {
        const A g = static_cast<A>(gr[j]);
        acc[kG][j] += g;
        acc[kGX][j] += g * xc;
        acc[kGDY][j] += g * d;
      }
    }
  }
  for (int k = 0; k < kNumSums; ++k) {
    for (int j = 0; j < W; ++j) s[k * cols + c0 + j] += static_cast<double>(acc[k][j]);
  }
}

// Pass 2 of the row tasks over rows [r0, r1) of columns [c0, c0 + W), the columns' coefficients held in
// registers (kc: the seven coefficient rows of length C, in the order of Coef).
template <typename T, bool HasG, int W, bool WantDy, bool WantX>
void write_tile(const Data<T>& p, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                const typename OpMath<T>::type* __restrict__ mu, const typename OpMath<T>::type* __restrict__ kc) {
  using A = typename OpMath<T>::type;
  A m[W], a1[W], b1[W], c1[W], a2[W], b2[W], c2[W], d2[W];
  for (int j = 0; j < W; ++j) {
    m[j] = mu[c0 + j];
    a1[j] = kc[0 * cols + c0 + j], b1[j] = kc[1 * cols + c0 + j], c1[j] = kc[2 * cols + c0 + j];
    a2[j] = kc[3 * cols + c0 + j], b2[j] = kc[4 * cols + c0 + j], c2[j] = kc[5 * cols + c0 + j];
    d2[j] = kc[6 * cols + c0 + j];
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * cols + c0;
    const T* __restrict__ xr = p.x + off;
    const T* __restrict__ dr = p.dy + off;
    const T* __restrict__ gr = HasG ? p.ggx + off : nullptr;
    T* __restrict__ out_dy = WantDy ? p.d_dy + off : nullptr;
    T* __restrict__ out_x = WantX ? p.d_x + off : nullptr;
    for (int j = 0; j < W; ++j) {
      const A xc = static_cast<A>(xr[j]) - m[j];
      const A g = HasG ? static_cast<A>(gr[j]) : A(0);
      if (WantDy) out_dy[j] = static_cast<T>(a1[j] * g + b1[j] * xc + c1[j]);
      if (WantX) out_x[j] = static_cast<T>(a2[j] * g + b2[j] * xc + d2[j] * static_cast<A>(dr[j]) + c2[j]);
    }
  }
}

// Pass 1 over rows [r0, r1) of columns [c0, c1): kFoldRows rows at a time (they stay in cache while their
// columns are visited: kLanes at a time in registers, the rest one by one), each block's float sums folded
// into the double sums s[k * C + c] of this row chunk.
template <typename T, bool HasG>
void sums_rows(const Data<T>& p, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
               const typename OpMath<T>::type* mu, double* s) {
  for (int64_t f0 = r0; f0 < r1; f0 += kFoldRows) {
    const int64_t f1 = std::min(r1, f0 + kFoldRows);
    int64_t c = c0;
    for (; c + kLanes <= c1; c += kLanes) sums_tile<T, HasG, kLanes>(p, cols, f0, f1, c, mu, s);
    for (; c < c1; ++c) sums_tile<T, HasG, 1>(p, cols, f0, f1, c, mu, s);
  }
}

// Pass 2 over rows [r0, r1), all columns, blocked like pass 1.
template <typename T, bool HasG, bool WantDy, bool WantX>
void write_rows(const Data<T>& p, int64_t cols, int64_t r0, int64_t r1, const typename OpMath<T>::type* mu,
                const typename OpMath<T>::type* kc) {
  for (int64_t f0 = r0; f0 < r1; f0 += kFoldRows) {
    const int64_t f1 = std::min(r1, f0 + kFoldRows);
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) write_tile<T, HasG, kLanes, WantDy, WantX>(p, cols, f0, f1, c, mu, kc);
    for (; c < cols; ++c) write_tile<T, HasG, 1, WantDy, WantX>(p, cols, f0, f1, c, mu, kc);
  }
}

// Row tasks, for (M, C) arrays (S = 1): (N, C) inputs, and channels-last tensors, which the caller passes as
// their (N * H * W, C) view. A task is a chunk of kRowChunk rows times a block of kRowBlockCols channels (the
// inner loops run along a row, over the block's channels, which are contiguous). Pass 1 leaves per-chunk sums,
// added per channel in chunk order; pass 2 then writes the chunks in parallel. Chunks and blocks depend on the
// shape only, so the results do not depend on the number of threads.
template <typename T, bool HasG>
void run_rows(const Data<T>& p, const Shape& sh, const std::vector<Channel>& ch, bool training, bool pass1,
              double* d_w) {
  using A = typename OpMath<T>::type;
  const int64_t rows = sh.n, cols = sh.c;
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  const int64_t blocks = (cols + kRowBlockCols - 1) / kRowBlockCols;
  std::vector<A> mu(cols);
  for (int64_t c = 0; c < cols; ++c) mu[c] = static_cast<A>(ch[c].mean);
  std::vector<double> part(pass1 ? chunks * kNumSums * cols : 0, 0.0);
  if (pass1) {
    at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t chunk = t / blocks, c0 = (t % blocks) * kRowBlockCols;
        const int64_t c1 = std::min(cols, c0 + kRowBlockCols);
        sums_rows<T, HasG>(p, cols, chunk * kRowChunk, std::min(rows, (chunk + 1) * kRowChunk), c0, c1, mu.data(),
                           part.data() + chunk * kNumSums * cols);
      }
    });
  }
  std::vector<A> kc(7 * cols);
  for (int64_t c = 0; c < cols; ++c) {
    double s[kNumSums] = {};
    for (int64_t chunk = 0; chunk < (pass1 ? chunks : 0); ++chunk) {
      for (int k = 0; k < kNumSums; ++k) s[k] += part[(chunk * kNumSums + k) * cols + c];
    }
    double dw = 0.0;
    const Coef k = coefficients(ch[c], s, rows, training, HasG, dw);
    d_w[c] = dw;
    const double kv[7] = {k.a1, k.b1, k.c1, k.a2, k.b2, k.c2, k.d2};
    for (int i = 0; i < 7; ++i) kc[i * cols + c] = static_cast<A>(kv[i]);
  }
  if (p.d_dy == nullptr && p.d_x == nullptr) return;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * kRowChunk, r1 = std::min(rows, r0 + kRowChunk);
      if (p.d_dy != nullptr && p.d_x != nullptr) {
        write_rows<T, HasG, true, true>(p, cols, r0, r1, mu.data(), kc.data());
      } else if (p.d_dy != nullptr) {
        write_rows<T, HasG, true, false>(p, cols, r0, r1, mu.data(), kc.data());
      } else {
        write_rows<T, HasG, false, true>(p, cols, r0, r1, mu.data(), kc.data());
      }
    }
  });
}

template <typename T, bool HasG>
void run(const Data<T>& p, const Shape& sh, const std::vector<Channel>& ch, bool training, bool need_sums,
         double* d_w) {
  using A = typename OpMath<T>::type;
  const int64_t m = sh.n * sh.s;
  const bool write = p.d_dy != nullptr || p.d_x != nullptr;
  // Eval mode needs sum(ggx * dy) for d_w only; training mode always needs the sums.
  const bool pass1 = training ? true : (HasG && need_sums);

  if (sh.s == 1) {
    run_rows<T, HasG>(p, sh, ch, training, pass1, d_w);
    return;
  }
  if (sh.s >= kSmallInner) {
    at::parallel_for(0, sh.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s[kNumSums] = {};
        const A mu = static_cast<A>(ch[c].mean);
        if (pass1) {
          Lanes<A> lanes;
          for (int64_t r = 0; r < sh.n; ++r) sums_segment<T, HasG>(p, (r * sh.c + c) * sh.s, sh.s, mu, lanes, s);
          lanes.fold(s);
        }
        double dw = 0.0;
        const Coef k = coefficients(ch[c], s, m, training, HasG, dw);
        d_w[c] = dw;
        if (!write) continue;
        const A kv[7] = {A(k.a1), A(k.b1), A(k.c1), A(k.a2), A(k.b2), A(k.c2), A(k.d2)};
        const A* kp[7] = {kv, kv + 1, kv + 2, kv + 3, kv + 4, kv + 5, kv + 6};
        for (int64_t r = 0; r < sh.n; ++r) write_segment<T, HasG, false>(p, (r * sh.c + c) * sh.s, sh.s, &mu, kp);
      }
    });
    return;
  }

  // Column tasks: blocks of whole channels.
  const int64_t cb = std::max<int64_t>(1, kColumnSpan / sh.s);
  const int64_t blocks = (sh.c + cb - 1) / cb;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * cb, c1 = std::min(sh.c, c0 + cb);
      const int64_t span = (c1 - c0) * sh.s;
      const int64_t base = c0 * sh.s;
      std::vector<A> mu(span);
      for (int64_t j = 0; j < span; ++j) mu[j] = static_cast<A>(ch[c0 + j / sh.s].mean);
      std::vector<double> s((c1 - c0) * kNumSums, 0.0);
      if (pass1) {
        std::vector<A> acc(kNumSums * span);
        std::vector<double> col(kNumSums * span, 0.0);
        for (int64_t r0 = 0; r0 < sh.n; r0 += kFoldRows) {
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t r = r0; r < std::min(sh.n, r0 + kFoldRows); ++r) {
            const int64_t off = r * sh.c * sh.s + base;
            for (int64_t j = 0; j < span; ++j) {
              const A xc = static_cast<A>(p.x[off + j]) - mu[j];
              const A d = static_cast<A>(p.dy[off + j]);
              acc[kDY * span + j] += d;
              acc[kDYX * span + j] += d * xc;
              if (HasG) {
                const A g = static_cast<A>(p.ggx[off + j]);
                acc[kG * span + j] += g;
                acc[kGX * span + j] += g * xc;
                acc[kGDY * span + j] += g * d;
              }
            }
          }
          for (int64_t t = 0; t < kNumSums * span; ++t) col[t] += acc[t];
        }
        for (int k = 0; k < kNumSums; ++k) {
          for (int64_t j = 0; j < span; ++j) s[(j / sh.s) * kNumSums + k] += col[k * span + j];
        }
      }
      std::vector<A> kc(7 * span);
      for (int64_t c = c0; c < c1; ++c) {
        double dw = 0.0;
        const Coef k = coefficients(ch[c], s.data() + (c - c0) * kNumSums, m, training, HasG, dw);
        d_w[c] = dw;
        const double kv[7] = {k.a1, k.b1, k.c1, k.a2, k.b2, k.c2, k.d2};
        for (int i = 0; i < 7; ++i) {
          std::fill_n(kc.begin() + i * span + (c - c0) * sh.s, sh.s, static_cast<A>(kv[i]));
        }
      }
      if (!write) continue;
      const A* kp[7];
      for (int i = 0; i < 7; ++i) kp[i] = kc.data() + i * span;
      for (int64_t r = 0; r < sh.n; ++r) write_segment<T, HasG, true>(p, r * sh.c * sh.s + base, span, mu.data(), kp);
    }
  });
}

double value_or(const at::Tensor& t, int64_t c, double fallback) {
  return t.defined() ? t.data_ptr<double>()[c] : fallback;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cpu(
    const at::Tensor& ggx, const at::Tensor& ggw, const at::Tensor& ggb, const at::Tensor& dy, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xhat, bool training, bool need_dy, bool need_x, bool need_w) {
  const Shape sh{x.size(0), x.size(1), x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1))};
  at::Tensor d_dy = need_dy ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor d_x = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor d_w = at::zeros({sh.c}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) {
    if (need_dy) d_dy.zero_();
    if (need_x) d_x.zero_();
    return {d_dy, d_x, need_w ? d_w : at::Tensor()};
  }
  std::vector<Channel> ch(sh.c);
  const bool have_sums = sum_dy.defined() && sum_dy_xhat.defined();
  for (int64_t c = 0; c < sh.c; ++c) {
    ch[c] = Channel{mean.data_ptr<double>()[c], invstd.data_ptr<double>()[c], value_or(weight, c, 1.0),
                    value_or(ggw, c, 0.0),      value_or(ggb, c, 0.0),        have_sums,
                    value_or(sum_dy, c, 0.0),   value_or(sum_dy_xhat, c, 0.0)};
  }
  auto dispatch = [&](auto tag) {
    using T = decltype(tag);
    const Data<T> p{ggx.defined() ? ggx.data_ptr<T>() : nullptr, dy.data_ptr<T>(), x.data_ptr<T>(),
                    need_dy ? d_dy.data_ptr<T>() : nullptr, need_x ? d_x.data_ptr<T>() : nullptr};
    if (ggx.defined()) {
      run<T, true>(p, sh, ch, training, need_w, d_w.data_ptr<double>());
    } else {
      run<T, false>(p, sh, ch, training, need_w, d_w.data_ptr<double>());
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      dispatch(float{});
      break;
    case at::kDouble:
      dispatch(double{});
      break;
    case at::kHalf:
      dispatch(at::Half{});
      break;
    case at::kBFloat16:
      dispatch(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "batch_norm_double_backward_cpu: unsupported dtype ", x.scalar_type());
  }
  return {d_dy, d_x, need_w ? d_w : at::Tensor()};
}

}  // namespace qgrad
