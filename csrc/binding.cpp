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

#include "batch_norm.h"
#include "fake_quant.h"
#include "l1_norm.h"

namespace qgrad {
namespace {

// Numbers, shapes and devices in the error messages below are turned into text with std::to_string, never by
// streaming them into an ostream: with some pairings of compiler and torch build (seen with torch 2.11+cu130
// wheels and g++ 13.3 on Ubuntu 24.04) any extension that streams a number crashes in the stream's numeric
// formatting (a 5-line torch extension reproduces it), which would turn a ValueError into a segfault.
std::string num(int64_t v) { return std::to_string(v); }

std::string num(double v) { return std::to_string(v); }

std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// Integers up to 2**24 are exact in float32, the precision the kernels compute in.
constexpr int64_t kQuantLimit = int64_t(1) << 24;

void check_grid(int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK_VALUE(quant_min < quant_max, "quant_min must be < quant_max, got quant_min=", num(quant_min),
                    ", quant_max=", num(quant_max));
  TORCH_CHECK_VALUE(quant_min >= -kQuantLimit && quant_max <= kQuantLimit,
                    "quant_min and quant_max must lie in [-2**24, 2**24], got ", num(quant_min), " and ",
                    num(quant_max));
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.defined(), name, " must be a tensor, got None");
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
                    " must be float32, float16 or bfloat16, got ", dt,
                    " (float64 inputs are handled by qgrad.reference)");
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), name,
                    " must be on a cpu or cuda device, got ", x.device().str());
}

void check_param(const at::Tensor& p, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(p.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(p.scalar_type() == at::kFloat, name, " must be float32, got ", p.scalar_type());
  TORCH_CHECK_VALUE(p.device() == x.device(), name, " is on ", p.device().str(), " but x is on ", x.device().str(),
                    "; put both on one device");
  TORCH_CHECK_VALUE(p.dim() <= 1, name, " must be 0-d or 1-d, got shape ", shape(p.sizes()));
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
                      num(scale.numel()), " and ", num(zero_point.numel()));
    return {{1, 1, x.numel()}, false};
  }
  TORCH_CHECK_VALUE(axis >= 0 && axis < x.dim(), "axis must be -1 (per-tensor) or in [0, ", num(x.dim()),
                    ") for x of shape ", shape(x.sizes()), ", got ", num(axis));
  const int64_t channels = x.size(axis);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.numel() == channels, "per-channel scale along axis ", num(axis),
                    " must be 1-d of length ", num(channels), ", got shape ", shape(scale.sizes()));
  const bool zp_per_channel = zero_point.dim() == 1 && zero_point.numel() == channels;
  TORCH_CHECK_VALUE(zp_per_channel || zero_point.numel() == 1, "per-channel zero_point along axis ", num(axis),
                    " must be 0-d or 1-d of length ", num(channels), ", got shape ", shape(zero_point.sizes()));
  int64_t outer = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
  int64_t inner = 1;
  for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {{outer, channels, inner}, zp_per_channel};
}

[[noreturn]] void no_cuda(const at::Tensor& x) {
  TORCH_CHECK(false, "qgrad._C was built without CUDA support but x is on ", x.device().str(),
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
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "dy must have the shape of x ", shape(x.sizes()), ", got ",
                    shape(dy.sizes()));
  TORCH_CHECK_VALUE(dy.scalar_type() == x.scalar_type(), "dy must have the dtype of x (", x.scalar_type(),
                    "), got ", dy.scalar_type());
  TORCH_CHECK_VALUE(dy.device() == x.device(), "dy is on ", dy.device().str(), " but x is on ", x.device().str(),
                    "; put both on one device");
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "grad_scale must be finite, got ", num(grad_scale));
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

// ---------------------------------------------------------------------------------------------- BatchNorm
//   batch_norm_double_backward(ggx, ggw, ggb, dy, x, weight, mean, invstd, sum_dy, sum_dy_xhat, training,
//                              need_dy, need_x, need_w) -> (d_dy, d_x, d_w)      (None where not requested)
//
// CPU only. x, dy and ggx (None for zero) share one shape (N, C, *) and dtype (float32, float64, float16,
// bfloat16); they are made contiguous here. weight, ggw, ggb, sum_dy, sum_dy_xhat are (C,) or None; mean and
// invstd are (C,). d_dy / d_x come back contiguous in x's dtype, d_w as float64 (C,).
namespace qgrad {
namespace {

at::Tensor channel_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t channels, bool required) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK_VALUE(!required, name, " must be a tensor, got None");
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(t->device().is_cpu(), name, " must be a CPU tensor, got ", t->device().str());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, name, " must be 1-d of length ", num(channels),
                    ", got shape ", shape(t->sizes()));
  TORCH_CHECK_VALUE(t->is_floating_point(), name, " must be floating point, got ", t->scalar_type());
  return t->to(at::kDouble).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const c10::optional<at::Tensor>& ggx, const c10::optional<at::Tensor>& ggw,
    const c10::optional<at::Tensor>& ggb, const at::Tensor& dy, const at::Tensor& x,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& sum_dy, const c10::optional<at::Tensor>& sum_dy_xhat, bool training,
    bool need_dy, bool need_x, bool need_w) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device().str());
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                    "x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have shape (N, C, ...), got ", shape(x.sizes()));
  auto check_like_x = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have the shape of x ", shape(x.sizes()), ", got ",
                      shape(t.sizes()));
    TORCH_CHECK_VALUE(t.scalar_type() == dt, name, " must have the dtype of x (", dt, "), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device().str());
  };
  check_like_x(dy, "dy");
  const bool has_ggx = ggx.has_value() && ggx->defined();
  if (has_ggx) check_like_x(*ggx, "ggx");
  const int64_t channels = x.size(1);
  return batch_norm_double_backward_cpu(
      has_ggx ? ggx->contiguous() : at::Tensor(), channel_vector(ggw, "ggw", channels, false),
      channel_vector(ggb, "ggb", channels, false), dy.contiguous(), x.contiguous(),
      channel_vector(weight, "weight", channels, false), channel_vector(mean, "mean", channels, true),
      channel_vector(invstd, "invstd", channels, true), channel_vector(sum_dy, "sum_dy", channels, false),
      channel_vector(sum_dy_xhat, "sum_dy_xhat", channels, false), training, need_dy, need_x, need_w);
}

}  // namespace
}  // namespace qgrad

// ---------------------------------------------------------------------------------------------- l1 norms
//   l1_norm_sign(tensors, keep_sign) -> (norms, signs)
//
// CPU only. tensors: a non-empty list of float32 / float64 / float16 / bfloat16 CPU tensors of any shapes and
// strides (non-contiguous ones are copied first). norms: float64 (len(tensors),), norms[i] = sum(|tensors[i]|);
// signs: int8 sign(tensors[i]) shaped like tensors[i] (0 for 0 and NaN), or an empty list without keep_sign.
namespace qgrad {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> l1_norm_sign(const std::vector<at::Tensor>& tensors,
                                                             bool keep_sign) {
  TORCH_CHECK_VALUE(!tensors.empty(), "tensors is empty; pass at least one tensor");
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "tensors[", num(static_cast<int64_t>(i)), "] must be a tensor, got None");
    TORCH_CHECK_VALUE(t.device().is_cpu(), "tensors[", num(static_cast<int64_t>(i)), "] must be a CPU tensor, got ",
                      t.device().str());
    const auto dt = t.scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "tensors[",
                      num(static_cast<int64_t>(i)), "] must be float32, float64, float16 or bfloat16, got ", dt);
    contiguous.push_back(t.contiguous());
  }
  return l1_norm_sign_cpu(contiguous, keep_sign);
}

//   add_scaled_sign(sign, scale, x, dtype) -> x + scale * sign
//
// CPU only. sign: int8 of any shape and strides; x: None (zero) or a tensor of sign's shape and of dtype (any
// strides); dtype: float32, float64, float16 or bfloat16. Returns a contiguous tensor of sign's shape and dtype,
// computed in float (double for float64) and converted to dtype.
at::Tensor add_scaled_sign(const at::Tensor& sign, double scale, const c10::optional<at::Tensor>& x,
                           at::ScalarType dtype) {
  TORCH_CHECK_VALUE(sign.device().is_cpu(), "sign must be a CPU tensor, got ", sign.device().str());
  TORCH_CHECK_VALUE(sign.scalar_type() == at::kChar, "sign must be int8, got ", sign.scalar_type());
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    "dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  at::Tensor xc;
  if (x.has_value() && x->defined()) {
    TORCH_CHECK_VALUE(x->device().is_cpu(), "x must be a CPU tensor, got ", x->device().str());
    TORCH_CHECK_VALUE(x->scalar_type() == dtype, "x must have dtype ", dtype, ", got ", x->scalar_type());
    TORCH_CHECK_VALUE(x->sizes() == sign.sizes(), "x must have the shape of sign ", shape(sign.sizes()), ", got ",
                      shape(x->sizes()));
    xc = x->contiguous();
  }
  return add_scaled_sign_cpu(sign.contiguous(), scale, xc, dtype);
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
  m.def("l1_norm_sign", &qgrad::l1_norm_sign, py::arg("tensors"), py::arg("keep_sign"),
        "(norms, signs): float64 l1 norm of every tensor of the list and, with keep_sign, its int8 sign, in one "
        "pass over each tensor (CPU)");
  m.def("add_scaled_sign", &qgrad::add_scaled_sign, py::arg("sign"), py::arg("scale"), py::arg("x"),
        py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
        "x + scale * sign (x None: scale * sign) from int8 signs, in dtype, in one pass (CPU); computed in float "
        "(double for float64) and converted to dtype");
  m.def("batch_norm_double_backward", &qgrad::batch_norm_double_backward, py::arg("ggx"), py::arg("ggw"),
        py::arg("ggb"), py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("invstd"),
        py::arg("sum_dy"), py::arg("sum_dy_xhat"), py::arg("training"), py::arg("need_dy"), py::arg("need_x"),
        py::arg("need_w"), py::call_guard<py::gil_scoped_release>(),
        "(d_dy, d_x, d_w): BatchNorm's second derivatives (qgrad.reference.batch_norm_double_backward_ref) in "
        "two passes per channel on the CPU; None where not requested. Deterministic for any thread count.");
}
