// The MoE router (gate, softmax, top-k, grouping by expert) and the weighted combine.
#include "common.h"

namespace {
using namespace moe_serve_kernels;

// --- MoE router and combine -------------------------------------------------------------------
//
// route: gate (float32) -> softmax -> top-k -> optional renormalisation -> the rows grouped by
// expert, as moe.route builds them with ~12 ops. Ties in top-k go to the lower expert id.
// Returns (logits [T, E] f32, ids [T, K] i64, weights [T, K] in x's dtype, rows [T*K] i64 grouped
// by ascending expert and ascending (token, k) within one, their weights [T*K], counts [E] i64).
template <typename T>
std::vector<at::Tensor> route_impl(const at::Tensor& x, const at::Tensor& w, int64_t k, bool normalize) {
  const int64_t rows = x.size(0), D = x.size(1), E = w.size(0);
  auto logits = at::empty({rows, E}, x.options().dtype(at::kFloat));
  auto ids = at::empty({rows, k}, x.options().dtype(at::kLong));
  auto weights = at::empty({rows, k}, x.options());
  auto order = at::empty({rows * k}, x.options().dtype(at::kLong));
  auto sorted_w = at::empty({rows * k}, x.options());
  auto counts = at::zeros({E}, x.options().dtype(at::kLong));
  const T* xp = x.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  float* lp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  T* wo = weights.data_ptr<T>();
  int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<float> xf(D), probs(E);
  std::vector<char> taken(E);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t d = 0; d < D; ++d) xf[d] = to_f(xp[t * D + d]);
    float m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += xf[d] * wp[e * D + d];
      lp[t * E + e] = acc;
      m = acc > m ? acc : m;
    }
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (probs[e] = std::exp(lp[t * E + e] - m));
    for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
    std::fill(taken.begin(), taken.end(), 0);
    float top_sum = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      taken[best] = 1;
      ip[t * k + j] = best;
      top_sum += probs[best];
    }
    for (int64_t j = 0; j < k; ++j) {
      const float p = probs[ip[t * k + j]];
      wo[t * k + j] = from_f<T>(normalize ? p / top_sum : p);
      cp[ip[t * k + j]] += 1;
    }
  }
  int64_t* op = order.data_ptr<int64_t>();
  T* sw = sorted_w.data_ptr<T>();
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (cp[e] == 0) continue;
    for (int64_t slot = 0; slot < rows * k; ++slot)
      if (ip[slot] == e) { op[n] = slot / k; sw[n] = wo[slot]; ++n; }
  }
  return {logits, ids, weights, order, sorted_w, counts};
}

std::vector<at::Tensor> moe_route(const at::Tensor& x, const at::Tensor& gate_weight, int64_t top_k, bool normalize) {
  TORCH_CHECK(x.dim() == 2 && gate_weight.dim() == 2 && gate_weight.size(1) == x.size(1), "moe_route: x [T, D], gate [E, D]");
  TORCH_CHECK(gate_weight.scalar_type() == at::kFloat, "moe_route: the gate runs in float32");
  TORCH_CHECK(top_k >= 1 && top_k <= gate_weight.size(0), "moe_route: top_k out of range");
  auto xc = x.contiguous();
  auto wc = gate_weight.contiguous();
  if (xc.scalar_type() == at::kBFloat16) return route_impl<c10::BFloat16>(xc, wc, top_k, normalize);
  if (xc.scalar_type() == at::kHalf) return route_impl<c10::Half>(xc, wc, top_k, normalize);
  if (xc.scalar_type() == at::kFloat) return route_impl<float>(xc, wc, top_k, normalize);
  TORCH_CHECK(false, "moe_route: unsupported dtype ", xc.scalar_type());
}

// out [T, D] = sum over experts, in the order given, of weight * output, accumulated in float32
// and rounded once. outputs[i] [R_i, D], rows[i] [R_i] int64 (token of each row), weights[i] [R_i].
template <typename T>
void combine_impl(at::Tensor& out, const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& rows,
                  const std::vector<at::Tensor>& weights) {
  const int64_t tokens = out.size(0), D = out.size(1);
  std::vector<float> acc(tokens * D, 0.f);
  for (size_t i = 0; i < outputs.size(); ++i) {
    const T* y = outputs[i].data_ptr<T>();
    const int64_t* r = rows[i].data_ptr<int64_t>();
    const T* w = weights[i].data_ptr<T>();
    for (int64_t j = 0; j < rows[i].numel(); ++j) {
      const float wj = to_f(w[j]);
      float* a = acc.data() + r[j] * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += wj * to_f(y[j * D + d]);
    }
  }
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < tokens * D; ++i) op[i] = from_f<T>(acc[i]);
}

at::Tensor moe_combine(const at::Tensor& like, at::TensorList outputs, at::TensorList rows, at::TensorList weights) {
  TORCH_CHECK(outputs.size() == rows.size() && rows.size() == weights.size(), "moe_combine: one rows/weights per output");
  std::vector<at::Tensor> ys, rs, ws;
  for (size_t i = 0; i < outputs.size(); ++i) {
    TORCH_CHECK(outputs[i].scalar_type() == like.scalar_type() && weights[i].scalar_type() == like.scalar_type(),
                "moe_combine: outputs and weights in the activations' dtype");
    TORCH_CHECK(outputs[i].size(0) == rows[i].numel() && rows[i].numel() == weights[i].numel(), "moe_combine: sizes");
    TORCH_CHECK(outputs[i].size(1) == like.size(1), "moe_combine: width");
    ys.push_back(outputs[i].contiguous());
    rs.push_back(rows[i].contiguous());
    ws.push_back(weights[i].contiguous());
    const int64_t* r = rs.back().data_ptr<int64_t>();
    for (int64_t j = 0; j < rs.back().numel(); ++j)
      TORCH_CHECK(r[j] >= 0 && r[j] < like.size(0), "moe_combine: row out of range");
  }
  auto out = at::empty({like.size(0), like.size(1)}, like.options());
  if (like.scalar_type() == at::kBFloat16) combine_impl<c10::BFloat16>(out, ys, rs, ws);
  else if (like.scalar_type() == at::kHalf) combine_impl<c10::Half>(out, ys, rs, ws);
  else if (like.scalar_type() == at::kFloat) combine_impl<float>(out, ys, rs, ws);
  else TORCH_CHECK(false, "moe_combine: unsupported dtype ", like.scalar_type());
  return out;
}


}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_serve, m) {
  m.def("moe_route(Tensor x, Tensor gate_weight, int top_k, bool normalize) -> Tensor[]", &moe_route);
  m.def("moe_combine(Tensor like, Tensor[] outputs, Tensor[] rows, Tensor[] weights) -> Tensor", &moe_combine);
}
