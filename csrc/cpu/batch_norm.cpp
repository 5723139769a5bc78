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
// A task owns whole channels and runs both passes on them, so pass 2 finds the channel's data in cache when it
// fits there. x is a contiguous (N, C, S) array; two task shapes:
//   * segments (S >= kSmallInner): one channel per task; the innermost loops run over a contiguous segment of S
//     elements, with sums kept in kLanes independent float lanes folded into double every kFoldElems elements;
//   * columns (S < kSmallInner, e.g. (N, C) inputs): a task is a block of channels, i.e. a contiguous span of
//     columns of each row, with per-column float sums folded into double every kFoldRows rows.
// Task boundaries depend on the shape only, and each channel is reduced by one task in a fixed order, so the
// results are identical for any number of threads. float64 inputs accumulate in double.
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

template <typename T, bool HasG>
void run(const Data<T>& p, const Shape& sh, const std::vector<Channel>& ch, bool training, bool need_sums,
         double* d_w) {
  using A = typename OpMath<T>::type;
  const int64_t m = sh.n * sh.s;
  const bool write = p.d_dy != nullptr || p.d_x != nullptr;
  // Eval mode needs sum(ggx * dy) for d_w only; training mode always needs the sums.
  const bool pass1 = training ? true : (HasG && need_sums);

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
