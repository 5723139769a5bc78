// Interface between the binding (csrc/binding.cpp) and the device kernels of fake-quantization.
//
// The binding validates the arguments and normalizes them before calling in here:
//   * x, dy are contiguous, of one dtype (float32, float16 or bfloat16) and on one device;
//   * scale, zero_point are contiguous float32 on x's device; zero_point is NOT yet rounded;
//   * x is viewed as (outer, channels, inner): channel c of element (o, c, i) sits at offset
//     (o * channels + c) * inner + i. Per-tensor quantization is outer = 1, channels = 1, inner = numel;
//   * scale holds `channels` values; zero_point holds `channels` values when zp_per_channel, else one.
// The math (true division, round half to even, range test on the unrounded x / s + zp) is documented in
// qgrad/reference.py, which every kernel reproduces bit for bit (outputs) or to float tolerance (sums).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace qgrad {

struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

at::Tensor fake_quant_fwd_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view);

// Returns (dx, dscale, dzero_point); dscale / dzero_point are undefined tensors unless requested.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view, double grad_scale,
    bool need_dscale, bool need_dzp);

#ifdef QGRAD_WITH_CUDA
at::Tensor fake_quant_fwd_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                               bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    bool zp_per_channel, int64_t quant_min, int64_t quant_max, ChannelView view, double grad_scale,
    bool need_dscale, bool need_dzp);
#endif

}  // namespace qgrad
