// The type the CPU kernels accumulate a tensor's elements in: float for float32, float16 and bfloat16 inputs
// (folded into double by each kernel at intervals it chooses), double for float64.
#pragma once

namespace qgrad {

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

}  // namespace qgrad
