// CPU kernels of the l1 norm's forward and backward (qgrad.ops.l1_norm):
//   * l1_norm_sign_cpu, the multi-tensor l1 norm with int8 signs: one call for all tensors, which reads each
//     element from memory once, adds |t| to its tensor's sum and writes sign(t) as one byte, with no
//     temporaries;
//   * add_scaled_sign_cpu, x + scale * sign from the int8 signs: the seeds of the double backward and the
//     activation shifts of the worst-case penalty in one pass (cast, scale and add fused).
//
// The tensors are cut into chunks of kChunk elements (a tensor's last chunk is shorter); one parallel loop runs
// over the chunks of all tensors, so many small tensors and a few large ones keep the threads equally busy. A
// chunk sums in kLanes float lanes (double for float64 input) that are folded into one double per chunk, and a
// tensor's norm is the sum of its chunks' doubles in chunk order. Chunk boundaries depend on the shapes only,
// so the norms are identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../l1_norm.h"
#include "multiversion.h"
#include "op_math.h"

namespace qgrad {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per chunk; a multiple of kLanes
constexpr int kLanes = 16;           // independent accumulators of a chunk

struct Chunk {
  int tensor;
  int64_t begin, end;
};

// Two simple loops over the chunk (it stays in cache for the second): the float sums in lanes, then the signs.
// Kept apart because the compiler vectorizes each on its own but not the two fused (float lanes next to int8
// stores), which measured 2.5x slower.
template <typename T>
QGRAD_MULTIVERSION double chunk_sum(const T* __restrict__ x, int8_t* __restrict__ sign, int64_t begin, int64_t end) {
  using A = typename OpMath<T>::type;
  A lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += std::abs(static_cast<A>(x[i + l]));
  }
  for (; i < end; ++i) lanes[0] += std::abs(static_cast<A>(x[i]));
  if (sign != nullptr) {
    for (int64_t j = begin; j < end; ++j) {
      const A v = static_cast<A>(x[j]);
      sign[j] = static_cast<int8_t>((v > A(0)) - (v < A(0)));
    }
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

// out[i] = x[i] + scale * sign[i] over [begin, end) (x null: 0); the product is exact in A.
template <typename T>
QGRAD_MULTIVERSION void scaled_sign_range(const int8_t* __restrict__ sign, typename OpMath<T>::type scale,
                                          const T* __restrict__ x, T* __restrict__ out, int64_t begin,
                                          int64_t end) {
  using A = typename OpMath<T>::type;
  if (x == nullptr) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<T>(scale * static_cast<A>(sign[i]));
  } else {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<T>(static_cast<A>(x[i]) + scale * static_cast<A>(sign[i]));
  }
}

}  // namespace

at::Tensor add_scaled_sign_cpu(const at::Tensor& sign, double scale, const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor out = at::empty(sign.sizes(), sign.options().dtype(dtype));
  const int64_t n = sign.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "add_scaled_sign_cpu", [&] {
    using A = typename OpMath<scalar_t>::type;
    const int8_t* s = sign.const_data_ptr<int8_t>();
    const scalar_t* xp = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const A a = static_cast<A>(scale);
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) { scaled_sign_range<scalar_t>(s, a, xp, o, begin, end); });
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> l1_norm_sign_cpu(const std::vector<at::Tensor>& tensors,
                                                                 bool keep_sign) {
  std::vector<Chunk> chunks;
  std::vector<at::Tensor> signs;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const int64_t n = tensors[k].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int>(k), b, std::min(n, b + kChunk)});
    if (keep_sign) signs.push_back(at::empty(tensors[k].sizes(), tensors[k].options().dtype(at::kChar)));
  }
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& t = tensors[ch.tensor];
      int8_t* sign = keep_sign ? signs[ch.tensor].data_ptr<int8_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "l1_norm_sign_cpu", [&] {
        partial[c] = chunk_sum<scalar_t>(t.const_data_ptr<scalar_t>(), sign, ch.begin, ch.end);
      });
    }
  });
  at::Tensor norms = at::zeros({static_cast<int64_t>(tensors.size())}, at::dtype(at::kDouble));
  double* out = norms.data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].tensor] += partial[c];
  return {norms, signs};
}

}  // namespace qgrad
