// CPU kernels of fake-quantization: forward, and a backward that writes dx and the partial sums of the scale
// and zero-point gradients in one pass over x and dy.
//
// Work decomposition. x is a contiguous (outer, C, inner) array (see fake_quant.h). It is cut into tiles whose
// sizes depend on the shape only, never on the number of threads, and each tile writes its own slots of a
// partial-sum buffer. The buffer is then reduced per channel in a fixed order, so the gradients are identical
// from run to run and for any OpenMP thread count. Two tilings:
//   * segments (inner >= kSmallInner; per-tensor is outer = C = 1): a tile is ob outer rows x cb channels x
//     ib inner elements; the innermost loop runs over a contiguous segment with one (scale, zero_point);
//   * columns (inner < kSmallInner, e.g. per-channel along the last axis): x is viewed as (outer, M = C*inner)
//     and the parameters are expanded to length M, so the innermost loop again runs over contiguous memory;
//     a tile is ob rows x cb columns, and each column keeps its own partial sum over the tile's rows.
// Inner loops are written so that GCC / Clang vectorize them at -O3: float math, selects instead of branches,
// and sums kept in kLanes independent float lanes (a fixed order, unlike a compiler-reassociated reduction),
// folded into double once per segment.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../fake_quant.h"

namespace qgrad {
namespace {

constexpr int64_t kTile = 16384;         // target elements per task
constexpr int64_t kSmallInner = 16;      // inner extents below this use the column tiling
constexpr int64_t kColumnTile = 2048;    // columns per task in the column tiling
constexpr int64_t kMinPerPartial = 64;   // elements folded into one partial sum at least (bounds the buffer)
constexpr int kLanes = 16;               // independent float accumulators of a segment

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Round half to even for the default rounding mode, written with adds so that it vectorizes without SSE4.1:
// for 0 <= |v| < 2^23, |v| + 2^23 lies in [2^23, 2^24) where float spacing is 1, so the addition itself rounds
// |v| to an integer, half to even; subtracting 2^23 is exact. |v| >= 2^23 is already an integer (or inf), and
// NaN fails the comparison and passes through. copysign keeps -0.0 for v in (-0.5, 0], as nearbyint does.
inline float round_half_even(float v) {
  constexpr float kMagic = 8388608.0f;  // 2^23
  const float a = std::fabs(v);
  const float r = std::copysign((a + kMagic) - kMagic, v);
  return a < kMagic ? r : v;
}

inline float fq_forward(float x, float s, float zp, float qmin, float qmax) {
  // True division, as in the reference: x * (1 / s) differs in the last bit for some inputs.
  const float q = round_half_even(x / s) + zp;
  // Written as selects so that a NaN passes through, like torch.clamp.
  const float lo = q < qmin ? qmin : q;
  const float qc = lo > qmax ? qmax : lo;
  return (qc - zp) * s;
}

// dx and the two gradient summands of one element: g * e_s (scale) and g * [outside] (zero point, to be
// multiplied by -s later). The range test uses the unrounded v = x / s + zp, both ends inclusive.
inline void fq_backward(float g, float x, float s, float zp, float qmin, float qmax, float& dx, float& g_es,
                        float& g_out) {
  const float xs = x / s;
  const float v = xs + zp;
  const bool inside = (v >= qmin) & (v <= qmax);
  // Every candidate is computed unconditionally and then selected: with the default -ftrapping-math the
  // compiler would not if-convert (and so not vectorize) floating-point work done under a branch.
  const float e_below = qmin - zp;
  const float e_above = qmax - zp;
  const float e_inside = round_half_even(xs) - xs;
  const float e_outside = v < qmin ? e_below : e_above;
  const float e_s = inside ? e_inside : e_outside;
  dx = inside ? g : 0.0f;
  g_es = g * e_s;
  g_out = g * (inside ? 0.0f : 1.0f);
}

template <typename T>
inline float load(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T store(float v) {
  return static_cast<T>(v);  // round to nearest even for Half / BFloat16, as Tensor.to does
}

template <typename T>
void fwd_segment(const T* __restrict x, T* __restrict y, int64_t n, float s, float zp, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>(fq_forward(load(x[i]), s, zp, qmin, qmax));
}

template <typename T>
void fwd_columns(const T* __restrict x, T* __restrict y, int64_t n, const float* __restrict s,
                 const float* __restrict zp, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>(fq_forward(load(x[i]), s[i], zp[i], qmin, qmax));
}

template <typename T>
void bwd_segment_dx(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n, float s, float zp,
                    float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = load(dy[i]);
    const float v = load(x[i]) / s + zp;
    dx[i] = store<T>((v >= qmin) & (v <= qmax) ? g : 0.0f);
  }
}

template <typename T>
void bwd_columns_dx(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n,
                    const float* __restrict s, const float* __restrict zp, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = load(dy[i]);
    const float v = load(x[i]) / s[i] + zp[i];
    dx[i] = store<T>((v >= qmin) & (v <= qmax) ? g : 0.0f);
  }
}

// Adds this segment's sums of g * e_s and g * [outside] to sum_es / sum_out.
template <typename T>
void bwd_segment(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n, float s, float zp,
                 float qmin, float qmax, double& sum_es, double& sum_out) {
  float acc_es[kLanes] = {};
  float acc_out[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float d, g_es, g_out;
      fq_backward(load(dy[i + l]), load(x[i + l]), s, zp, qmin, qmax, d, g_es, g_out);
      dx[i + l] = store<T>(d);
      acc_es[l] += g_es;
      acc_out[l] += g_out;
    }
  }
  for (int l = 0; i + l < n; ++l) {
    float d, g_es, g_out;
    fq_backward(load(dy[i + l]), load(x[i + l]), s, zp, qmin, qmax, d, g_es, g_out);
    dx[i + l] = store<T>(d);
    acc_es[l] += g_es;
    acc_out[l] += g_out;
  }
  double t_es = 0.0, t_out = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    t_es += acc_es[l];
    t_out += acc_out[l];
  }
  sum_es += t_es;
  sum_out += t_out;
}

// One row of the column tiling: per-column parameters and per-column float accumulators.
template <typename T>
void bwd_columns(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n,
                 const float* __restrict s, const float* __restrict zp, float qmin, float qmax,
                 float* __restrict acc_es, float* __restrict acc_out) {
  for (int64_t i = 0; i < n; ++i) {
    float d, g_es, g_out;
    fq_backward(load(dy[i]), load(x[i]), s[i], zp[i], qmin, qmax, d, g_es, g_out);
    dx[i] = store<T>(d);
    acc_es[i] += g_es;
    acc_out[i] += g_out;
  }
}

struct Tiling {
  bool columns;
  int64_t outer, C, inner, M;
  int64_t ob, n_ot;  // outer rows per tile, tiles along outer
  int64_t cb, n_ct;  // channels (segments) or columns of M (columns) per tile, tiles along them
  int64_t ib, n_it;  // inner elements per tile (segments; 1 for columns), tiles along inner

  explicit Tiling(ChannelView v) : outer(v.outer), C(v.channels), inner(v.inner), M(v.channels * v.inner) {
    columns = inner < kSmallInner;
    if (!columns) {
      ib = std::min(inner, kTile);
      cb = std::min(C, std::max<int64_t>(1, kTile / ib));
      ob = std::min(outer, std::max(ceil_div(kTile, cb * ib), ceil_div(kMinPerPartial, ib)));
    } else {
      ib = 1;
      cb = std::min(M, kColumnTile);
      ob = std::min(outer, std::max(ceil_div(kTile, cb), kMinPerPartial));
    }
    n_it = ceil_div(columns ? 1 : inner, ib);
    n_ct = ceil_div(columns ? M : C, cb);
    n_ot = ceil_div(outer, ob);
  }
  int64_t tasks() const { return n_ot * n_ct * n_it; }
  // Partial sums per (ot, it, channel) for segments, per (ot, column) for columns.
  int64_t partials() const { return columns ? n_ot * M : n_ot * n_it * C; }

  template <typename F>  // f(o0, o1, c0, c1, i0, i1, ot, it); for columns c0..c1 index columns of M
  void for_each_task(F&& f) const {
    at::parallel_for(0, tasks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t ot = t / (n_ct * n_it);
        const int64_t ct = (t / n_it) % n_ct;
        const int64_t it = t % n_it;
        const int64_t o0 = ot * ob, c0 = ct * cb, i0 = it * ib;
        f(o0, std::min(outer, o0 + ob), c0, std::min(columns ? M : C, c0 + cb), i0,
          std::min(columns ? int64_t(1) : inner, i0 + ib), ot, it);
      }
    });
  }
};

// Per-channel float32 parameters, the zero point rounded half to even; expanded to one value per column of
// M = C * inner for the column tiling.
struct Params {
  std::vector<float> s, zp;
  Params(const at::Tensor& scale, const at::Tensor& zero_point, bool zp_per_channel, const Tiling& t) {
    const float* sp = scale.data_ptr<float>();
    const float* zpp = zero_point.data_ptr<float>();
    const int64_t width = t.columns ? t.inner : 1;
    s.resize(t.C * width);
    zp.resize(t.C * width);
    for (int64_t c = 0; c < t.C; ++c) {
      const float z = round_half_even(zpp[zp_per_channel ? c : 0]);
      std::fill_n(s.begin() + c * width, width, sp[c]);
      std::fill_n(zp.begin() + c * width, width, z);
    }
  }
};

template <typename F>
void dispatch_dtype(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", st);
  }
}

}  // namespace

at::Tensor fake_quant_fwd_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view) {
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const Tiling t(view);
  const Params p(scale, zero_point, zp_per_channel, t);
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  dispatch_dtype(x.scalar_type(), "fake_quant_fwd_cpu", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    t.for_each_task([&](int64_t o0, int64_t o1, int64_t c0, int64_t c1, int64_t i0, int64_t i1, int64_t, int64_t) {
      for (int64_t o = o0; o < o1; ++o) {
        if (t.columns) {
          const int64_t off = o * t.M + c0;
          fwd_columns(xp + off, yp + off, c1 - c0, p.s.data() + c0, p.zp.data() + c0, qmin, qmax);
          continue;
        }
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t off = (o * t.C + c) * t.inner + i0;
          fwd_segment(xp + off, yp + off, i1 - i0, p.s[c], p.zp[c], qmin, qmax);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view, double grad_scale,
    bool need_dscale, bool need_dzp) {
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dscale = need_dscale ? at::zeros_like(scale, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dzp = need_dzp ? at::zeros_like(zero_point, at::MemoryFormat::Contiguous) : at::Tensor();
  if (x.numel() == 0) return {dx, dscale, dzp};  // empty sums are zero, as in the reference

  const Tiling t(view);
  const Params p(scale, zero_point, zp_per_channel, t);
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  const bool sums = need_dscale || need_dzp;
  std::vector<double> part_es(sums ? t.partials() : 0), part_out(sums ? t.partials() : 0);

  dispatch_dtype(x.scalar_type(), "fake_quant_bwd_cpu", [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = dy.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    t.for_each_task([&](int64_t o0, int64_t o1, int64_t c0, int64_t c1, int64_t i0, int64_t i1, int64_t ot,
                        int64_t it) {
      if (!sums) {
        for (int64_t o = o0; o < o1; ++o) {
          if (t.columns) {
            const int64_t off = o * t.M + c0;
            bwd_columns_dx(dyp + off, xp + off, dxp + off, c1 - c0, p.s.data() + c0, p.zp.data() + c0, qmin,
                           qmax);
            continue;
          }
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t off = (o * t.C + c) * t.inner + i0;
            bwd_segment_dx(dyp + off, xp + off, dxp + off, i1 - i0, p.s[c], p.zp[c], qmin, qmax);
          }
        }
        return;
      }
      if (t.columns) {
        // Per-column float accumulators, folded into this tile's double partials every kMinPerPartial rows.
        const int64_t m = c1 - c0;
        std::vector<float> acc_es(m), acc_out(m);
        double* pe = part_es.data() + ot * t.M + c0;
        double* po = part_out.data() + ot * t.M + c0;
        for (int64_t r = o0; r < o1; r += kMinPerPartial) {
          std::fill(acc_es.begin(), acc_es.end(), 0.0f);
          std::fill(acc_out.begin(), acc_out.end(), 0.0f);
          for (int64_t o = r; o < std::min(o1, r + kMinPerPartial); ++o) {
            const int64_t off = o * t.M + c0;
            bwd_columns(dyp + off, xp + off, dxp + off, m, p.s.data() + c0, p.zp.data() + c0, qmin, qmax,
                        acc_es.data(), acc_out.data());
          }
          for (int64_t j = 0; j < m; ++j) {
            pe[j] += acc_es[j];
            po[j] += acc_out[j];
          }
        }
        return;
      }
      double* pe = part_es.data() + (ot * t.n_it + it) * t.C;
      double* po = part_out.data() + (ot * t.n_it + it) * t.C;
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t off = (o * t.C + c) * t.inner + i0;
          bwd_segment(dyp + off, xp + off, dxp + off, i1 - i0, p.s[c], p.zp[c], qmin, qmax, pe[c], po[c]);
        }
      }
    });
  });
  if (!sums) return {dx, dscale, dzp};

  // Fixed-order reduction of the partials of each channel: over tiles along outer, then along inner.
  std::vector<double> ch_es(t.C), ch_out(t.C);
  at::parallel_for(0, t.C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double se = 0.0, so = 0.0;
      for (int64_t ot = 0; ot < t.n_ot; ++ot) {
        if (t.columns) {
          for (int64_t i = 0; i < t.inner; ++i) {
            se += part_es[ot * t.M + c * t.inner + i];
            so += part_out[ot * t.M + c * t.inner + i];
          }
        } else {
          for (int64_t it = 0; it < t.n_it; ++it) {
            se += part_es[(ot * t.n_it + it) * t.C + c];
            so += part_out[(ot * t.n_it + it) * t.C + c];
          }
        }
      }
      ch_es[c] = se;
      ch_out[c] = so;
    }
  });

  const float* sp = scale.data_ptr<float>();
  if (need_dscale) {
    float* ds = dscale.data_ptr<float>();
    for (int64_t c = 0; c < t.C; ++c) ds[c] = static_cast<float>(ch_es[c] * grad_scale);
  }
  if (need_dzp) {
    // e_z = -s outside the grid: the sum of g * e_z over a channel is -s_c times its sum of g outside.
    float* dz = dzp.data_ptr<float>();
    if (zp_per_channel) {
      for (int64_t c = 0; c < t.C; ++c) dz[c] = static_cast<float>(-double(sp[c]) * ch_out[c] * grad_scale);
    } else {
      double total = 0.0;
      for (int64_t c = 0; c < t.C; ++c) total += -double(sp[c]) * ch_out[c];
      dz[0] = static_cast<float>(total * grad_scale);
    }
  }
  return {dx, dscale, dzp};
}

}  // namespace qgrad
