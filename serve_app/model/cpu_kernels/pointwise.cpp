// Pointwise decode kernels: residual add + RMSNorm, SwiGLU's silu * up, in-place RoPE.
#include "common.h"

namespace {
using namespace moe_serve_kernels;

// x [T, D] (+ residual [T, D]) -> (h = x + residual rounded to x's dtype, rms_norm(h) * weight).
// The weight is in x's dtype or float32 (a 16-bit fast lane over a float32 checkpoint: the norm is
// computed in float32 either way, as the reference does).
template <typename T, typename W>
void add_rms_norm_impl(const T* x, const T* res, const W* w, T* h, T* y, int64_t rows, int64_t D, float eps) {
  std::vector<float> hf(D), wf(D);
  for (int64_t d = 0; d < D; ++d) wf[d] = to_f(w[d]);
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * D;
    float ss = 0.f;
    if (res != nullptr) {
      const T* rr = res + t * D;
      for (int64_t d = 0; d < D; ++d) {
        const T sum = from_f<T>(to_f(xr[d]) + to_f(rr[d]));     // the residual stream keeps x's dtype
        h[t * D + d] = sum;
        hf[d] = to_f(sum);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) hf[d] = to_f(xr[d]);
    }
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += hf[d] * hf[d];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) y[t * D + d] = from_f<T>(hf[d] * inv * wf[d]);
  }
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  const bool float_weight = weight.scalar_type() == at::kFloat;
  TORCH_CHECK(weight.numel() == D && (float_weight || weight.scalar_type() == x.scalar_type()),
              "weight must be [D] in x's dtype or float32");
  auto xc = x.contiguous();
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual like x");
    rc = residual->contiguous();
  }
  auto wc = weight.contiguous();
  auto h = residual.has_value() ? at::empty_like(xc) : xc;
  auto y = at::empty_like(xc);
#define MOE_NORM_W(T, W) add_rms_norm_impl<T, W>(xc.data_ptr<T>(), rc.defined() ? rc.data_ptr<T>() : nullptr, \
    wc.data_ptr<W>(), h.data_ptr<T>(), y.data_ptr<T>(), rows, D, static_cast<float>(eps))
#define MOE_NORM(T) do { if (float_weight) MOE_NORM_W(T, float); else MOE_NORM_W(T, T); } while (0)
  if (x.scalar_type() == at::kBFloat16) MOE_NORM(c10::BFloat16);
  else if (x.scalar_type() == at::kFloat) MOE_NORM(float);
  else if (x.scalar_type() == at::kHalf) MOE_NORM(c10::Half);
  else TORCH_CHECK(false, "add_rms_norm: unsupported dtype ", x.scalar_type());
#undef MOE_NORM
#undef MOE_NORM_W
  return {h, y};
}


at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t F2 = gate_up.size(-1), rows = gate_up.numel() / F2;
  TORCH_CHECK(F2 % 2 == 0, "silu_mul: last dim must be 2F");
  auto gc = gate_up.contiguous();
  auto sizes = gc.sizes().vec();
  sizes.back() = F2 / 2;
  auto out = at::empty(sizes, gc.options());
  if (gc.scalar_type() == at::kBFloat16) silu_mul_impl(gc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, F2 / 2);
  else if (gc.scalar_type() == at::kFloat) silu_mul_impl(gc.data_ptr<float>(), out.data_ptr<float>(), rows, F2 / 2);
  else if (gc.scalar_type() == at::kHalf) silu_mul_impl(gc.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, F2 / 2);
  else TORCH_CHECK(false, "silu_mul: unsupported dtype ", gc.scalar_type());
  return out;
}

// In place on x [T, heads, Dh] (any row stride; the head and Dh axes contiguous): the reference
// x * cos + rotate_half(x) * sin with cos/signed sin [T, 1, Dh] (model/attention.py `rotary`).
template <typename T>
void rotary_impl(T* x, int64_t row_stride, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t Dh) {
  const int64_t half = Dh / 2;
  std::vector<float> c(Dh), s(Dh), tmp(Dh);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t d = 0; d < Dh; ++d) { c[d] = to_f(cos[t * Dh + d]); s[d] = to_f(sin[t * Dh + d]); }
    for (int64_t h = 0; h < heads; ++h) {
      T* xh = x + t * row_stride + h * Dh;
      for (int64_t d = 0; d < Dh; ++d) tmp[d] = to_f(xh[d]);
      for (int64_t d = 0; d < Dh; ++d) {
        const float rolled = tmp[d < half ? d + half : d - half];
        xh[d] = from_f<T>(tmp[d] * c[d] + rolled * s[d]);
      }
    }
  }
}

void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, Dh], rows strided");
  const int64_t rows = x.size(0), heads = x.size(1), Dh = x.size(2);
  TORCH_CHECK(cos.numel() == rows * Dh && sin.numel() == rows * Dh, "cos/sin must be [T, 1, Dh]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "cos/sin in x's dtype");
  auto cc = cos.contiguous(), sc = sin.contiguous();
  if (x.scalar_type() == at::kBFloat16)
    rotary_impl(x.data_ptr<c10::BFloat16>(), x.stride(0), cc.data_ptr<c10::BFloat16>(), sc.data_ptr<c10::BFloat16>(), rows, heads, Dh);
  else if (x.scalar_type() == at::kFloat)
    rotary_impl(x.data_ptr<float>(), x.stride(0), cc.data_ptr<float>(), sc.data_ptr<float>(), rows, heads, Dh);
  else if (x.scalar_type() == at::kHalf)
    rotary_impl(x.data_ptr<c10::Half>(), x.stride(0), cc.data_ptr<c10::Half>(), sc.data_ptr<c10::Half>(), rows, heads, Dh);
  else TORCH_CHECK(false, "rotary_: unsupported dtype ", x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_serve, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rotary_);
}
