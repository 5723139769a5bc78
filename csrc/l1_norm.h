// Interface between the binding (csrc/binding.cpp) and the CPU kernel of the multi-tensor l1 norm with signs.
//
// The binding validates the arguments before calling in here: CPU tensors, contiguous, each float32, float64,
// float16 or bfloat16 (signs: int8).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace qgrad {

// Returns (norms, signs): norms[i] = sum(|t_i|) as a float64 vector of length len(tensors); signs[i] = sign(t_i)
// as int8 with t_i's shape (-1, 0, 1; 0 for NaN), or an empty list when keep_sign is false.
std::tuple<at::Tensor, std::vector<at::Tensor>> l1_norm_sign_cpu(const std::vector<at::Tensor>& tensors,
                                                                 bool keep_sign);

// Returns x + scale * sign, contiguous, in dtype (x's dtype when x is defined; an undefined x counts as zero).
// Computed in the accumulation type (float for float32 / float16 / bfloat16, double for float64), where
// scale * sign is exact, then converted to dtype: for float32 and float64 the correctly rounded sum.
at::Tensor add_scaled_sign_cpu(const at::Tensor& sign, double scale, const at::Tensor& x, at::ScalarType dtype);

}  // namespace qgrad
