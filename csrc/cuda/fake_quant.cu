// CUDA kernels of fake-quantization: forward, and a backward that writes dx and the partial sums of the scale
// and zero-point gradients in one pass over x and dy, followed by a fixed-order reduction of those partials.
//
// The kernels use plain CUDA types only (float, __half, __nv_bfloat16; at::Half / at::BFloat16 share their
// bit layouts); the launchers use ATen / c10 for allocation, the current stream and the device guard (c10/cuda
// headers only, not ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS and cuSPARSE headers). Nothing
// synchronizes with the host: scale and zero_point are read on the device.
//
// Numerics match qgrad/reference.py bit for bit: __fdiv_rn is the IEEE division x / s (never x * (1 / s); it
// stays correctly rounded even under --use_fast_math, whose flush-to-zero of denormals would still change
// results, so the build does not pass it), rintf rounds half to even, the clamp lets NaN through like
// torch.clamp, the range test uses the unrounded v = x / s + zp, and y = (q - zp) * s is computed with explicit
// _rn operations so that no multiply-add is contracted into an FMA.
//
// Deterministic backward: launch shapes and partial-sum slots depend on the tensor shape only (not on the
// number of SMs), the partials are combined with warp shuffles and shared-memory trees of fixed shape, and no
// atomics are used, so the gradients are identical from run to run. Two layouts of x = (outer, C, inner):
//   * rows (per-tensor, or inner >= kWarpRowMin): one warp per chunk of kWarpItem elements of a row (one
//     (outer, channel) pair, contiguous, one scale), each warp writes one partial;
//   * columns (inner < kWarpRowMin, e.g. per-channel along the last axis): x is viewed as (outer, M = C * inner)
//     and one thread per column sums kColumnRows rows, coalesced across the threads of a warp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../fake_quant.h"

namespace qgrad {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kWarpItem = 2048;   // elements per warp in the rows layout (64 per lane)
constexpr int64_t kWarpRowMin = 32;   // rows shorter than a warp use the columns layout
constexpr int64_t kColumnRows = 64;   // rows summed by one thread in the columns layout

// ---------------------------------------------------------------------------------------------------------
// Device math (plain CUDA)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float fq_forward(float x, float s, float zp, float qmin, float qmax) {
  const float q = __fadd_rn(rintf(__fdiv_rn(x, s)), zp);
  const float lo = q < qmin ? qmin : q;  // selects, so that NaN passes through like torch.clamp
  const float qc = lo > qmax ? qmax : lo;
  return __fmul_rn(__fsub_rn(qc, zp), s);
}

// dx and the summands g * e_s (scale) and g * [outside] (zero point, times -s later) of one element.
__device__ __forceinline__ void fq_backward(float g, float x, float s, float zp, float qmin, float qmax, float& dx,
                                           float& g_es, float& g_out) {
  const float xs = __fdiv_rn(x, s);
  const float v = __fadd_rn(xs, zp);
  const bool inside = (v >= qmin) && (v <= qmax);
  const float e_s = inside ? __fsub_rn(rintf(xs), xs) : (v < qmin ? __fsub_rn(qmin, zp) : __fsub_rn(qmax, zp));
  dx = inside ? g : 0.0f;
  g_es = g * e_s;
  g_out = g * (inside ? 0.0f : 1.0f);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0
}

// Fixed-shape tree over the kThreads values of a block; the result is complete in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  return shared[0];
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// ---------------------------------------------------------------------------------------------------------
// Kernels

// Grid-stride forward over packs of kVec elements (16-byte loads and stores when kVec * sizeof(T) == 16),
// then the n % kVec trailing elements. Channel of element i: (i / inner) % channels.
template <typename T, typename index_t, int kVec>
__global__ void fake_quant_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, index_t n,
                                      const float* __restrict__ scale, const float* __restrict__ zero_point,
                                      bool zp_per_channel, index_t channels, index_t inner, float qmin, float qmax) {
  const float s0 = scale[0];
  const float z0 = rintf(zero_point[0]);
  const index_t start = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t packs = n / kVec;
  for (index_t p = start; p < packs; p += stride) {
    const Pack<T, kVec> in = reinterpret_cast<const Pack<T, kVec>*>(x)[p];
    Pack<T, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float s = s0, z = z0;
      if (channels > 1) {
        const index_t c = (p * kVec + k) / inner % channels;
        s = scale[c];
        if (zp_per_channel) z = rintf(zero_point[c]);
      }
      out.v[k] = from_float<T>(fq_forward(to_float(in.v[k]), s, z, qmin, qmax));
    }
    reinterpret_cast<Pack<T, kVec>*>(y)[p] = out;
  }
  for (index_t i = packs * kVec + start; i < n; i += stride) {
    float s = s0, z = z0;
    if (channels > 1) {
      const index_t c = i / inner % channels;
      s = scale[c];
      if (zp_per_channel) z = rintf(zero_point[c]);
    }
    y[i] = from_float<T>(fq_forward(to_float(x[i]), s, z, qmin, qmax));
  }
}

// Rows layout: warp w handles chunk (w % chunks) of row (w / chunks); row r = o * channels + c holds the
// `inner` contiguous elements of channel c. Writes dx and, when kSums, partial[w].
template <typename T, bool kSums>
__global__ void fake_quant_bwd_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                           const float* __restrict__ scale, const float* __restrict__ zero_point,
                                           bool zp_per_channel, int64_t channels, int64_t inner, int64_t chunks,
                                           int64_t items, float qmin, float qmax, float* __restrict__ part_es,
                                           float* __restrict__ part_out) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= items) return;  // the whole warp leaves together (kThreads is a multiple of kWarp)
  const int64_t row = w / chunks;
  const int64_t c = row % channels;
  const float s = scale[c];
  const float z = rintf(zero_point[zp_per_channel ? c : 0]);
  const int64_t begin = row * inner + (w % chunks) * kWarpItem;
  const int64_t chunk_end = (w % chunks + 1) * kWarpItem;
  const int64_t end = row * inner + (chunk_end < inner ? chunk_end : inner);
  float acc_es = 0.0f, acc_out = 0.0f;
  for (int64_t i = begin + lane; i < end; i += kWarp) {
    float d, g_es, g_out;
    fq_backward(to_float(dy[i]), to_float(x[i]), s, z, qmin, qmax, d, g_es, g_out);
    dx[i] = from_float<T>(d);
    acc_es += g_es;
    acc_out += g_out;
  }
  if (kSums) {
    acc_es = warp_sum(acc_es);
    acc_out = warp_sum(acc_out);
    if (lane == 0) {
      part_es[w] = acc_es;
      part_out[w] = acc_out;
    }
  }
}

// Columns layout: x as (outer, M); thread j of row tile t handles column j over rows
// [t * kColumnRows, (t + 1) * kColumnRows) and, when kSums, writes partial[t * M + j].
template <typename T, bool kSums>
__global__ void fake_quant_bwd_columns_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                              const float* __restrict__ scale,
                                              const float* __restrict__ zero_point, bool zp_per_channel,
                                              int64_t outer, int64_t M, int64_t inner, int64_t column_blocks,
                                              float qmin, float qmax, float* __restrict__ part_es,
                                              float* __restrict__ part_out) {
  const int64_t tile = blockIdx.x / column_blocks;
  const int64_t j = (blockIdx.x % column_blocks) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  const int64_t c = j / inner;
  const float s = scale[c];
  const float z = rintf(zero_point[zp_per_channel ? c : 0]);
  const int64_t tile_end = (tile + 1) * kColumnRows;
  const int64_t o_end = tile_end < outer ? tile_end : outer;
  float acc_es = 0.0f, acc_out = 0.0f;
  for (int64_t o = tile * kColumnRows; o < o_end; ++o) {
    const int64_t i = o * M + j;
    float d, g_es, g_out;
    fq_backward(to_float(dy[i]), to_float(x[i]), s, z, qmin, qmax, d, g_es, g_out);
    dx[i] = from_float<T>(d);
    acc_es += g_es;
    acc_out += g_out;
  }
  if (kSums) {
    part_es[tile * M + j] = acc_es;
    part_out[tile * M + j] = acc_out;
  }
}

// One block per channel c: sums the channel's `groups` partials in a fixed order, in double.
//   rows:    group g = (o, k) -> partial (o * channels + c) * chunks + k
//   columns: group g = (t, i) -> partial t * M + c * inner + i
// Writes dscale[c] = grad_scale * sum(g * e_s); for the zero point either dzp[c] = -s_c * grad_scale *
// sum(g outside) (zero point per channel) or zsum[c] = -s_c * sum(g outside), summed by the next kernel.
__global__ void fake_quant_bwd_reduce_kernel(const float* __restrict__ part_es, const float* __restrict__ part_out,
                                             const float* __restrict__ scale, bool columns, int64_t channels,
                                             int64_t inner, int64_t chunks, int64_t groups, double grad_scale,
                                             float* __restrict__ dscale, float* __restrict__ dzp,
                                             double* __restrict__ zsum) {
  __shared__ double shared[kThreads];
  const int64_t c = blockIdx.x;
  double se = 0.0, so = 0.0;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const int64_t idx = columns ? (g / inner) * channels * inner + c * inner + g % inner
                                : ((g / chunks) * channels + c) * chunks + g % chunks;
    se += part_es[idx];
    so += part_out[idx];
  }
  se = block_sum(se, shared);
  __syncthreads();  // shared[0] is read by every thread before it is reused
  so = block_sum(so, shared);
  if (threadIdx.x == 0) {
    if (dscale != nullptr) dscale[c] = static_cast<float>(se * grad_scale);
    const double z = -static_cast<double>(scale[c]) * so;
    if (dzp != nullptr) dzp[c] = static_cast<float>(z * grad_scale);
    if (zsum != nullptr) zsum[c] = z;
  }
}

// Single block: dzp = grad_scale * sum over channels of zsum, in a fixed order.
__global__ void fake_quant_bwd_zero_point_kernel(const double* __restrict__ zsum, int64_t channels,
                                                 double grad_scale, float* __restrict__ dzp) {
  __shared__ double shared[kThreads];
  double t = 0.0;
  for (int64_t c = threadIdx.x; c < channels; c += kThreads) t += zsum[c];
  t = block_sum(t, shared);
  if (threadIdx.x == 0) dzp[0] = static_cast<float>(t * grad_scale);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers (ATen)

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_dtype(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<__half>{});
      break;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", st);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename index_t, int kVec>
void launch_fwd(const T* x, T* y, int64_t n, const float* scale, const float* zero_point, bool zp_per_channel,
                ChannelView view, float qmin, float qmax, cudaStream_t stream) {
  // Results do not depend on the grid here (no reductions), so it may follow the device size.
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = int64_t(sms) * 8;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(ceil_div(n, kVec), kThreads), max_blocks));
  fake_quant_fwd_kernel<T, index_t, kVec><<<blocks, kThreads, 0, stream>>>(
      x, y, static_cast<index_t>(n), scale, zero_point, zp_per_channel, static_cast<index_t>(view.channels),
      static_cast<index_t>(view.inner), qmin, qmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor fake_quant_fwd_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                               bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  const float* s = scale.data_ptr<float>();
  const float* zp = zero_point.data_ptr<float>();
  dispatch_dtype(x.scalar_type(), "fake_quant_fwd_cuda", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    // x may be a view with a storage offset; y is a fresh allocation and always aligned.
    const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0;
    // 32-bit indices are cheaper to divide; the margin keeps index + grid stride below 2^31.
    const bool small = n <= (int64_t(1) << 30);
    if (aligned && small) {
      launch_fwd<T, int32_t, kVec>(xp, yp, n, s, zp, zp_per_channel, view, qmin, qmax, stream);
    } else if (aligned) {
      launch_fwd<T, int64_t, kVec>(xp, yp, n, s, zp, zp_per_channel, view, qmin, qmax, stream);
    } else if (small) {
      launch_fwd<T, int32_t, 1>(xp, yp, n, s, zp, zp_per_channel, view, qmin, qmax, stream);
    } else {
      launch_fwd<T, int64_t, 1>(xp, yp, n, s, zp, zp_per_channel, view, qmin, qmax, stream);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view, double grad_scale,
    bool need_dscale, bool need_dzp) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dscale = need_dscale ? at::zeros_like(scale, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dzp = need_dzp ? at::zeros_like(zero_point, at::MemoryFormat::Contiguous) : at::Tensor();
  if (x.numel() == 0) return {dx, dscale, dzp};  // empty sums are zero, as in the reference

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  const float* s = scale.data_ptr<float>();
  const float* zp = zero_point.data_ptr<float>();
  const bool sums = need_dscale || need_dzp;
  const int64_t C = view.channels, inner = view.inner, outer = view.outer;
  const bool columns = C > 1 && inner < kWarpRowMin;

  // Launch shape and partial count, from the shape only.
  const int64_t chunks = columns ? 0 : ceil_div(inner, kWarpItem);
  const int64_t items = columns ? 0 : outer * C * chunks;
  const int64_t M = C * inner;
  const int64_t column_blocks = columns ? ceil_div(M, kThreads) : 0;
  const int64_t row_tiles = columns ? ceil_div(outer, kColumnRows) : 0;
  const int64_t partials = columns ? row_tiles * M : items;
  const int64_t groups = columns ? row_tiles * inner : outer * chunks;  // partials per channel

  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor part_es = sums ? at::empty({partials}, fopts) : at::Tensor();
  at::Tensor part_out = sums ? at::empty({partials}, fopts) : at::Tensor();
  float* pe = sums ? part_es.data_ptr<float>() : nullptr;
  float* po = sums ? part_out.data_ptr<float>() : nullptr;

  dispatch_dtype(x.scalar_type(), "fake_quant_bwd_cuda", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* dyp = reinterpret_cast<const T*>(dy.data_ptr());
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    T* dxp = reinterpret_cast<T*>(dx.data_ptr());
    if (columns) {
      const int64_t blocks = row_tiles * column_blocks;
      if (sums) {
        fake_quant_bwd_columns_kernel<T, true><<<blocks, kThreads, 0, stream>>>(
            dyp, xp, dxp, s, zp, zp_per_channel, outer, M, inner, column_blocks, qmin, qmax, pe, po);
      } else {
        fake_quant_bwd_columns_kernel<T, false><<<blocks, kThreads, 0, stream>>>(
            dyp, xp, dxp, s, zp, zp_per_channel, outer, M, inner, column_blocks, qmin, qmax, pe, po);
      }
    } else {
      const int64_t blocks = ceil_div(items * kWarp, kThreads);
      if (sums) {
        fake_quant_bwd_rows_kernel<T, true><<<blocks, kThreads, 0, stream>>>(
            dyp, xp, dxp, s, zp, zp_per_channel, C, inner, chunks, items, qmin, qmax, pe, po);
      } else {
        fake_quant_bwd_rows_kernel<T, false><<<blocks, kThreads, 0, stream>>>(
            dyp, xp, dxp, s, zp, zp_per_channel, C, inner, chunks, items, qmin, qmax, pe, po);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!sums) return {dx, dscale, dzp};

  // A zero point shared by several channels needs a second pass over the per-channel terms.
  const bool shared_zp = need_dzp && !zp_per_channel && C > 1;
  at::Tensor zsum = shared_zp ? at::empty({C}, x.options().dtype(at::kDouble)) : at::Tensor();
  fake_quant_bwd_reduce_kernel<<<C, kThreads, 0, stream>>>(
      pe, po, s, columns, C, inner, chunks, groups, grad_scale, need_dscale ? dscale.data_ptr<float>() : nullptr,
      need_dzp && !shared_zp ? dzp.data_ptr<float>() : nullptr, shared_zp ? zsum.data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (shared_zp) {
    fake_quant_bwd_zero_point_kernel<<<1, kThreads, 0, stream>>>(zsum.data_ptr<double>(), C, grad_scale,
                                                                  dzp.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, dscale, dzp};
}

}  // namespace qgrad
