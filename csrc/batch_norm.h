// Interface between the binding (csrc/binding.cpp) and the CPU kernel of BatchNorm's double backward.
//
// The binding validates and normalizes the arguments before calling in here:
//   * x, dy and (when defined) ggx are contiguous CPU tensors of one shape (N, C, *) and one dtype (float32,
//     float64, float16 or bfloat16); x is viewed as (N, C, S) with S the product of the trailing dims;
//   * every per-channel tensor (weight, mean, invstd, ggw, ggb, sum_dy, sum_dy_xhat) is a contiguous float64
//     vector of length C, or undefined: weight = 1, ggw = ggb = 0, and the two sums are then computed here.
// The formulas are those of the BatchNorm section of qgrad/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace qgrad {

// Returns (d_dy, d_x, d_w): d_dy / d_x contiguous in the dtype of x, d_w float64 of length C; each one is an
// undefined tensor unless requested (need_dy, need_x, need_w).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cpu(
    const at::Tensor& ggx, const at::Tensor& ggw, const at::Tensor& ggb, const at::Tensor& dy, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xhat, bool training, bool need_dy, bool need_x, bool need_w);

}  // namespace qgrad
