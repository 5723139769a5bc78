// Python binding of qgrad._C: argument checks (device, dtype, shape, contiguity) and dispatch to the CPU or
// CUDA kernels. No math happens here.
//
//   fake_quant_fwd(x, scale, zero_point, quant_min, quant_max, axis) -> y
//   fake_quant_bwd(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale, need_dscale, need_dzp)
//       -> (dx, dscale, dzero_point)      (None where not requested)
//
// axis = -1 selects per-tensor quantization (scale and zero_point hold one value each, 0-d or shape [1]);
// axis in [0, x.dim()) selects per-channel quantization (scale 1-d of length x.size(axis), zero_point 0-d or
// shaped like scale). x and dy may have any strides: non-contiguous inputs are copied to a contiguous buffer
// first. y and dx are contiguous with x's shape and dtype; dscale / dzero_point are float32 shaped like scale /
// zero_point. Values are not checked here (scale > 0, zero_point on the grid): reading them would synchronize
// a CUDA stream; qgrad.ops.fake_quant checks them.
#include <torch/extension.h>

#include <cmath>
#include <string>

#include "fake_quant.h"

namespace qgrad {
namespace {

// Integers up to 2**24 are exact in float32, the precision the kernels compute in.
constexpr int64_t kQuantLimit = int64_t(1) << 24;

void check_grid(int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK_VALUE(quant_min < quant_max, "quant_min must be < quant_max, got quant_min=", quant_min,
                    ", quant_max=", quant_max);
  TORCH_CHECK_VALUE(quant_min >= -kQuantLimit && quant_max <= kQuantLimit,
                    "quant_min and quant_max must lie in [-2**24, 2**24], got ", quant_min, " and ", quant_max);
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.defined(), name, " must be a tensor, got None");
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
                    " must be float32, float16 or bfloat16, got ", dt,
                    " (float64 inputs are handled by qgrad.reference)");
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), name,
                    " must be on a cpu or cuda device, got ", x.device());
}

void check_param(const at::Tensor& p, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(p.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(p.scalar_type() == at::kFloat, name, " must be float32, got ", p.scalar_type());
  TORCH_CHECK_VALUE(p.device() == x.device(), name, " is on ", p.device(), " but x is on ", x.device(),
                    "; put both on one device");
  TORCH_CHECK_VALUE(p.dim() <= 1, name, " must be 0-d or 1-d, got shape ", p.sizes());
}

struct Args {
  ChannelView view;
  bool zp_per_channel;
};

// Validates scale / zero_point against x and axis and returns the (outer, channels, inner) view of x.
Args check_quant_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                      int64_t quant_min, int64_t quant_max, int64_t axis) {
  check_x(x, "x");
  check_param(scale, "scale", x);
  check_param(zero_point, "zero_point", x);
  check_grid(quant_min, quant_max);
  if (axis == -1) {
    TORCH_CHECK_VALUE(scale.numel() == 1 && zero_point.numel() == 1,
                      "per-tensor quantization (axis=-1) needs one scale and one zero_point value, got ",
                      scale.numel(), " and ", zero_point.numel());
    return {{1, 1, x.numel()}, false};
  }
  TORCH_CHECK_VALUE(axis >= 0 && axis < x.dim(), "axis must be -1 (per-tensor) or in [0, ", x.dim(),
                    ") for x of shape ", x.sizes(), ", got ", axis);
  const int64_t channels = x.size(axis);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.numel() == channels, "per-channel scale along axis ", axis,
                    " must be 1-d of length ", channels, ", got shape ", scale.sizes());
  const bool zp_per_channel = zero_point.dim() == 1 && zero_point.numel() == channels;
  TORCH_CHECK_VALUE(zp_per_channel || zero_point.numel() == 1, "per-channel zero_point along axis ", axis,
                    " must be 0-d or 1-d of length ", channels, ", got shape ", zero_point.sizes());
  int64_t outer = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
  int64_t inner = 1;
  for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {{outer, channels, inner}, zp_per_channel};
}

[[noreturn]] void no_cuda(const at::Tensor& x) {
  TORCH_CHECK(false, "qgrad._C was built without CUDA support but x is on ", x.device(),
              "; rebuild with a CUDA-enabled torch and toolkit (pip install --no-build-isolation .)");
}

at::Tensor fake_quant_fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t quant_min, int64_t quant_max, int64_t axis) {
  const Args a = check_quant_args(x, scale, zero_point, quant_min, quant_max, axis);
  const at::Tensor xc = x.contiguous();
  const at::Tensor s = scale.contiguous();
  const at::Tensor zp = zero_point.contiguous();
  if (x.is_cuda()) {
#ifdef QGRAD_WITH_CUDA
    return fake_quant_fwd_cuda(xc, s, zp, a.zp_per_channel, quant_min, quant_max, a.view);
#else
    no_cuda(x);
#endif
  }
  return fake_quant_fwd_cpu(xc, s, zp, a.zp_per_channel, quant_min, quant_max, a.view);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& scale,
                                                              const at::Tensor& zero_point, int64_t quant_min,
                                                              int64_t quant_max, int64_t axis, double grad_scale,
                                                              bool need_dscale, bool need_dzp) {
  const Args a = check_quant_args(x, scale, zero_point, quant_min, quant_max, axis);
  check_x(dy, "dy");
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_VALUE(dy.scalar_type() == x.scalar_type(), "dy must have the dtype of x (", x.scalar_type(),
                    "), got ", dy.scalar_type());
  TORCH_CHECK_VALUE(dy.device() == x.device(), "dy is on ", dy.device(), " but x is on ", x.device(),
                    "; put both on one device");
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "grad_scale must be finite, got ", grad_scale);
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor s = scale.contiguous();
  const at::Tensor zp = zero_point.contiguous();
  if (x.is_cuda()) {
#ifdef QGRAD_WITH_CUDA
    return fake_quant_bwd_cuda(dyc, xc, s, zp, a.zp_per_channel, quant_min, quant_max, a.view, grad_scale,
                               need_dscale, need_dzp);
#else
    no_cuda(x);
#endif
  }
  return fake_quant_bwd_cpu(dyc, xc, s, zp, a.zp_per_channel, quant_min, quant_max, a.view, grad_scale,
                            need_dscale, need_dzp);
}

}  // namespace
}  // namespace qgrad

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qgrad compiled kernels: fused fake-quantization forward and backward (CPU"
#ifdef QGRAD_WITH_CUDA
            " and CUDA"
#endif
            ").";
#ifdef QGRAD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  namespace py = pybind11;
  m.def("fake_quant_fwd", &qgrad::fake_quant_fwd, py::arg("x"), py::arg("scale"), py::arg("zero_point"),
        py::arg("quant_min"), py::arg("quant_max"), py::arg("axis"), py::call_guard<py::gil_scoped_release>(),
        "y = (clamp(round(x / scale) + zp, quant_min, quant_max) - zp) * scale, zp = round(zero_point); "
        "axis=-1 is per-tensor. Bit-exact with qgrad.reference.fake_quant_ref.");
  m.def("fake_quant_bwd", &qgrad::fake_quant_bwd, py::arg("dy"), py::arg("x"), py::arg("scale"),
        py::arg("zero_point"), py::arg("quant_min"), py::arg("quant_max"), py::arg("axis"),
        py::arg("grad_scale"), py::arg("need_dscale"), py::arg("need_dzp"),
        py::call_guard<py::gil_scoped_release>(),
        "(dx, dscale, dzero_point) of fake_quant_fwd under the STE / LSQ rules of qgrad.reference, computed in "
        "one pass over x and dy; dscale / dzero_point are None unless requested. Sums are deterministic.");
}
