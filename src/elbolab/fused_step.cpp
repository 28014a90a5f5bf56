// The fused training step of elbolab.fused (FusedStep) compiled: the same forward and hand-written
// backward for one run, as one call from Python instead of a hundred or more ATen dispatches, and
// (once the run's torch.optim.Adam has state) the Adam update in the same call.
//
// It computes what fused._FusedCore._one_layer / _two_layer compute, on the noise the caller drew
// (so a seed gives the same samples), writing the gradients into the tensors it was given (views of
// the step's flat gradient buffer). Matrix products stay ATen's (addmm_out / mm_out: MKL); tanh, exp
// and log1p over the large buffers stay ATen's vectorized kernels; everything else (the Gaussian
// log-densities and reparameterization, the Bernoulli log-likelihood and its gradient, the IWAE
// weights, tanh's backward, bias gradients) is plain loops in one pass each.
#include <dlfcn.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// The BLAS sgemm_ ATen's own float matrix products call (torch's MKL exports it), found at load
// time: called directly, a product gives the bits of at::addmm_out / at::mm_out on the same
// buffers (the same routine, operands and transposes) without their dispatch, checks and views,
// a microsecond or more of each of a k = 1 step's 17-35 small products. Where torch has no
// sgemm_, ATen's calls run.
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
const Sgemm sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "sgemm_"));

// Column-major C (m x n) = alpha op(A) op(B) + beta C
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <typename T>
constexpr bool direct() {
  return std::is_same_v<T, float>;
}

// The sum of f(v) over a buffer, on independent lanes (a vectorized pass) summed in float64;
// inf or NaN where an f(v) is, or where a lane's sum overflows.
template <typename T, typename F>
double lane_sum(const T* v, int64_t n, F f) {
  constexpr int L = 16;
  T acc[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) acc[l] += f(v[j + l]);
  double total = 0;
  for (int l = 0; l < L; ++l) total += acc[l];
  for (; j < n; ++j) total += f(v[j]);
  return total;
}

template <typename T>
double abs_sum(const Tensor& t) {
  return lane_sum(t.data_ptr<T>(), t.numel(), [](T v) { return std::abs(v); });
}

// A proof, from the small operands of the gradient products, that every gradient is finite,
// so that the step need not read its (larger) gradients again to check: a weight gradient is
// d^T inp, a bias gradient d's column sums, and where d and inp are finite with
// sum|d| sum|inp| and sum|d| below a quarter of the type's largest value, no product, partial
// sum or result can overflow or be NaN. It holds or it does not; where it does not (an
// operand not finite, or so large), the gradients are checked entry by entry.
struct Proof {
  bool on = false;  // collecting this step
  bool ok = true;

  template <typename T>
  void add(const Tensor& d, const Tensor& inp) {
    if (!on || !ok) return;
    const double sd = abs_sum<T>(d), si = abs_sum<T>(inp);
    const double lim = static_cast<double>(std::numeric_limits<T>::max()) / 4;
    ok = std::isfinite(sd) && std::isfinite(si) && sd < lim && sd * si < lim;
  }
};

struct Chain {
  // input -> (Linear, tanh)* -> Linear; weights [out, in]
  std::vector<Tensor> w, b, gw, gb;
  std::vector<Tensor> wt;
  std::vector<Tensor> acts, deltas;  // tanh outputs and gradients at the hidden pre-activations
  Tensor out, grad_in;               // the head's output (its gradient in the backward), grad at input
  int64_t rows = -1;
  Proof* proof = nullptr;            // the step's finiteness proof, given each weight gradient's operands

  void buffers(int64_t n, const Tensor& like) {
    if (rows == n) return;
    rows = n;
    acts.clear();
    deltas.clear();
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      acts.push_back(at::empty({n, w[i].size(0)}, like.options()));
      deltas.push_back(at::empty({n, w[i].size(0)}, like.options()));
    }
    out = at::empty({n, w.back().size(0)}, like.options());
    grad_in = at::empty({n, w[0].size(1)}, like.options());
  }

  // y [n, out] = b + h [n, in] W^T (at::addmm_out: the bias copied into y, then y += h W^T)
  template <typename T>
  void linear(size_t i, const Tensor& h, Tensor& y) {
    if (direct<T>() && sgemm) {
      const int64_t n = h.size(0), in = w[i].size(1), o = w[i].size(0);
      float* c = y.data_ptr<float>();
      const float* bp = b[i].data_ptr<float>();
      for (int64_t r = 0; r < n; ++r) std::memcpy(c + r * o, bp, o * sizeof(float));
      gemm('T', 'N', o, n, in, 1.f, w[i].data_ptr<float>(), in, h.data_ptr<float>(), in, 1.f, c, o);
    } else {
      at::addmm_out(y, b[i], h, wt[i]);
    }
  }

  // gw[i] [out, in] = d [n, out]^T inp [n, in]
  template <typename T>
  void weight_grad(size_t i, const Tensor& d, const Tensor& inp) {
    if (direct<T>() && sgemm) {
      const int64_t n = d.size(0), o = d.size(1), in = inp.size(1);
      gemm('N', 'T', in, o, n, 1.f, inp.data_ptr<float>(), in, d.data_ptr<float>(), o, 0.f, gw[i].data_ptr<float>(),
           in);
    } else {
      at::mm_out(gw[i], d.t(), inp);
    }
  }

  // g [n, in] = d [n, out] W [out, in]
  template <typename T>
  void in_grad(size_t i, const Tensor& d, Tensor& g) {
    if (direct<T>() && sgemm) {
      const int64_t n = d.size(0), o = d.size(1), in = w[i].size(1);
      gemm('N', 'N', in, n, o, 1.f, w[i].data_ptr<float>(), in, d.data_ptr<float>(), o, 0.f, g.data_ptr<float>(), in);
    } else {
      at::mm_out(g, d, w[i]);
    }
  }

  template <typename T>
  const Tensor& forward(const Tensor& x) {
    const Tensor* h = &x;
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      linear<T>(i, *h, acts[i]);
      acts[i].tanh_();
      h = &acts[i];
    }
    linear<T>(w.size() - 1, *h, out);
    return out;
  }

  template <typename T>
  static void bias_grad(const Tensor& d, Tensor& gb) {
    const int64_t n = d.size(0), m = d.size(1);
    const T* dp = d.data_ptr<T>();
    T* g = gb.data_ptr<T>();
    std::vector<double> acc(m, 0.0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < m; ++j) acc[j] += dp[r * m + j];
    for (int64_t j = 0; j < m; ++j) g[j] = static_cast<T>(acc[j]);
  }

  // Gradients of the parameters (written over theirs) from the gradient at the head's output
  // ``d`` (the ``out`` buffer), and, if asked, at the input (the ``grad_in`` buffer).
  template <typename T>
  void backward(const Tensor& x, const Tensor& dout, bool params, bool input_grad) {
    const Tensor* d = &dout;
    for (int64_t i = static_cast<int64_t>(w.size()) - 1; i >= 0; --i) {
      const Tensor& inp = i > 0 ? acts[i - 1] : x;
      if (params) {
        proof->add<T>(*d, inp);
        weight_grad<T>(i, *d, inp);
        bias_grad<T>(*d, gb[i]);
      }
      if (i == 0) {
        if (input_grad) in_grad<T>(0, *d, grad_in);
        return;
      }
      Tensor& nxt = deltas[i - 1];
      in_grad<T>(i, *d, nxt);
      T* np = nxt.data_ptr<T>();
      const T* ap = inp.data_ptr<T>();
      const int64_t n = nxt.numel();
      for (int64_t j = 0; j < n; ++j) np[j] *= T(1) - ap[j] * ap[j];
      d = &nxt;
    }
  }
};

// A Gaussian head's [b, 2d] output (means, then log-variances): the standard deviations into sd
// and each row's log-variance sum (float64, as the log-density's row sums)
template <typename T>
std::vector<double> std_from_logvar(const T* out, int64_t b, int64_t d, T* sd) {
  std::vector<double> lvsum(b);
  for (int64_t c = 0; c < b; ++c) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) {
      const T lv = out[c * 2 * d + d + j];
      sd[c * d + j] = std::exp(lv * T(0.5));
      s += lv;
    }
    lvsum[c] = s;
  }
  return lvsum;
}

// Adam's update of one tensor as torch's fused Adam kernel computes it (its bias corrections in
// double, folded into step_size and bc2_sqrt): m <- lerp(m, g, 1 - beta1), v <- beta2 v + (1 - beta2) g^2,
// p <- p - step_size m / (sqrt(v) / bc2_sqrt + eps). The same arithmetic, in one pass per tensor;
// the compiler may round a product-sum as one fused multiply-add, so it agrees with torch's kernel
// to float rounding.
template <typename T>
struct AdamArgs {
  T step_size, c1, beta2, c2, bc2_sqrt, eps;
};

template <typename T>
__attribute__((always_inline)) inline void adam_loop(T* __restrict p, T* __restrict m, T* __restrict v,
                                                     const T* __restrict g, int64_t n, AdamArgs<T> a) {
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j];
    const T mj = m[j] + a.c1 * (gj - m[j]);
    const T vj = v[j] * a.beta2 + a.c2 * gj * gj;
    m[j] = mj;
    v[j] = vj;
    p[j] -= a.step_size * mj / (std::sqrt(vj) / a.bc2_sqrt + a.eps);
  }
}

// The float loop for the widest vectors the CPU has (the build itself targets baseline x86-64, so
// that a cached build runs on any machine this torch runs on)
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void adam_avx512(float* p, float* m, float* v, const float* g, int64_t n,
                                                    AdamArgs<float> a) {
  adam_loop(p, m, v, g, n, a);
}
__attribute__((target("avx2,fma"))) void adam_avx2(float* p, float* m, float* v, const float* g, int64_t n,
                                                   AdamArgs<float> a) {
  adam_loop(p, m, v, g, n, a);
}
#endif
void adam_base(float* p, float* m, float* v, const float* g, int64_t n, AdamArgs<float> a) {
  adam_loop(p, m, v, g, n, a);
}

using AdamFn = void (*)(float*, float*, float*, const float*, int64_t, AdamArgs<float>);

AdamFn pick_adam() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return adam_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return adam_avx2;
#endif
  return adam_base;
}

class Step {
 public:
  // chains: per role (q1, px for the one-layer model; q1, q2, p1, px for the two-layer), the
  // weights, biases, weight gradients and bias gradients of its Linear layers in order; flat: the
  // one buffer every gradient is a view of.
  Step(std::vector<std::vector<std::vector<Tensor>>> chains, Tensor flat, int64_t k, bool iwae, bool stl,
       bool dreg)
      : flat_(std::move(flat)), k_(k), iwae_(iwae), stl_(stl), dreg_(dreg) {
    for (auto& c : chains) {
      Chain ch;
      ch.w = c[0];
      ch.b = c[1];
      ch.gw = c[2];
      ch.gb = c[3];
      for (auto& wi : ch.w) ch.wt.push_back(wi.t());
      chains_.push_back(std::move(ch));
    }
    for (Chain& ch : chains_) ch.proof = &proof_;
    two_layer_ = chains_.size() == 4;
    d1_ = chains_[0].w.back().size(0) / 2;
    d2_ = two_layer_ ? chains_[1].w.back().size(0) / 2 : 0;
  }

  // Forward and backward on x [B, D] with noise eps1 [K, B, D1] (and eps2 [K, B, D2]) at KL weight
  // beta: (bound [B], log_w [K, B], loss [], log p(x|z), log p(z) (z1, z2), log q (z1, z2), z1, z2),
  // the batch's summed bound, whether the loss and every gradient are finite (the step's condition
  // for the optimizer step), and whether this call took Adam's step: with lr >= 0 and the state
  // set_adam gave, where the loss and gradients are finite.
  std::tuple<std::vector<Tensor>, double, bool, bool> run(const Tensor& x, const Tensor& eps1, const Tensor& eps2,
                                                           double beta, double lr, double beta1, double beta2,
                                                           double eps) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fused step: x must be a contiguous [B, D] tensor");
    std::vector<Tensor> res;
    double bound_sum = 0;
    bool finite = false, updated = false;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_step", [&] {
      proof_.ok = true;
      proof_.on = proof_cost(x) < flat_.numel();
      res = two_layer_ ? two_layer<scalar_t>(x, eps1.contiguous(), eps2.contiguous(), beta)
                       : one_layer<scalar_t>(x, eps1.contiguous(), beta);
      const scalar_t* bp = bound_.data_ptr<scalar_t>();
      for (int64_t c = 0; c < b_; ++c) bound_sum += static_cast<double>(bp[c]);
      finite = std::isfinite(loss_.item<double>()) && ((proof_.on && proof_.ok) || all_finite<scalar_t>());
      if (finite && lr >= 0 && !adam_.empty()) {
        adam<scalar_t>(lr, beta1, beta2, eps);
        updated = true;
      }
    });
    return {res, bound_sum, finite, updated};
  }

  // Whether the last run proved its gradients finite from their operands (no entry-by-entry check)
  bool proved() const { return proof_.on && proof_.ok; }

  // The run's Adam state for run's update: per parameter (in the order to update them) the
  // parameter, its gradient, exp_avg, exp_avg_sq and step (torch.optim.Adam's own state tensors,
  // updated in place, so its state_dict stays the truth); empty lists: no update in run.
  void set_adam(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> avgs,
                std::vector<Tensor> sqs, std::vector<Tensor> steps) {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && avgs.size() == n && sqs.size() == n && steps.size() == n,
                "fused step: set_adam needs one of each per parameter");
    std::vector<AdamSlot> slots;
    for (size_t i = 0; i < n; ++i) {
      const Tensor* all[] = {&params[i], &grads[i], &avgs[i], &sqs[i]};
      for (const Tensor* t : all)
        TORCH_CHECK(t->is_contiguous() && t->scalar_type() == params[i].scalar_type() &&
                        t->numel() == params[i].numel(),
                    "fused step: Adam's tensors must be contiguous and of the parameter's size and type");
      TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat,
                  "fused step: Adam's step must be a float32 scalar tensor");
      slots.push_back({params[i], grads[i], avgs[i], sqs[i], steps[i]});
    }
    adam_ = std::move(slots);
  }

 private:
  std::vector<Chain> chains_;
  Tensor flat_;
  int64_t k_, d1_, d2_;
  bool iwae_, stl_, dreg_, two_layer_;
  int64_t b_ = -1;
  struct AdamSlot {
    Tensor p, g, m, v, step;
  };
  std::vector<AdamSlot> adam_;
  AdamFn adam_float_ = pick_adam();
  Proof proof_;

  // Entries the finiteness proof reads at batch x's size: each weight gradient's two operands
  int64_t proof_cost(const Tensor& x) const {
    const int64_t b = x.size(0);
    int64_t n = 0;
    for (size_t c = 0; c < chains_.size(); ++c)
      for (const Tensor& wi : chains_[c].w) n += (c == 0 ? b : k_ * b) * (wi.size(0) + wi.size(1));
    return n;
  }

  // Adam's step on every slot: step += 1, then the update with that step's bias corrections
  template <typename T>
  void adam(double lr, double beta1, double beta2, double eps) {
    for (AdamSlot& s : adam_) {
      float* st = s.step.data_ptr<float>();
      *st += 1.0f;
      const double step = static_cast<double>(*st);
      const double bc1 = 1 - std::pow(beta1, step), bc2 = 1 - std::pow(beta2, step);
      const AdamArgs<T> a{static_cast<T>(lr / bc1), static_cast<T>(1 - beta1), static_cast<T>(beta2),
                          static_cast<T>(1 - beta2), static_cast<T>(std::sqrt(bc2)), static_cast<T>(eps)};
      T* p = s.p.data_ptr<T>();
      T* m = s.m.data_ptr<T>();
      T* v = s.v.data_ptr<T>();
      const T* g = s.g.data_ptr<T>();
      if constexpr (std::is_same_v<T, float>)
        adam_float_(p, m, v, g, s.p.numel(), a);
      else
        adam_loop(p, m, v, g, s.p.numel(), a);
    }
  }
  // per-batch-size buffers
  Tensor std1_, z1_, std2_, z2_, u_, uip_, lpx_, lp1_, lp2_, lq1_, lq2_, logw_, bound_, loss_, g_, a_, e_, l1p_;

  void buffers(int64_t b, const Tensor& x) {
    if (b == b_) return;
    b_ = b;
    const int64_t kb = k_ * b;
    auto o = x.options();
    chains_[0].buffers(b, x);
    for (size_t i = 1; i < chains_.size(); ++i) chains_[i].buffers(kb, x);
    std1_ = at::empty({b, d1_}, o);
    z1_ = at::empty({k_, b, d1_}, o);
    if (two_layer_) {
      std2_ = at::empty({kb, d2_}, o);
      z2_ = at::empty({k_, b, d2_}, o);
      u_ = at::empty({kb, d1_}, o);
      uip_ = at::empty({kb, d1_}, o);
      lp2_ = at::empty({k_, b}, o);
      lq2_ = at::empty({k_, b}, o);
    }
    for (Tensor* t : {&lpx_, &lp1_, &lq1_, &logw_, &g_, &a_}) *t = at::empty({k_, b}, o);
    bound_ = at::empty({b}, o);
    loss_ = at::empty({}, o);
    e_ = at::empty({kb, x.size(1)}, o);
    l1p_ = at::empty({kb, x.size(1)}, o);
  }

  // Whether every gradient is finite: a sum of squares (lane_sum); where it overflows, each
  // entry is checked.
  template <typename T>
  bool all_finite() const {
    const T* g = flat_.data_ptr<T>();
    const int64_t n = flat_.numel();
    if (std::isfinite(lane_sum(g, n, [](T v) { return v * v; }))) return true;
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(g[i])) return false;
    return true;
  }

  // log p(x|z) per row from the logits [KB, D] (Bernoulli on logits: x l - softplus(l)); leaves
  // sigmoid(l) in e_ for the backward. softplus(l) = max(l, 0) + log1p(exp(-|l|)). Each loop is
  // one simple pass the compiler vectorizes; the row sums run in float64 on independent lanes.
  template <typename T>
  void log_bernoulli(const Tensor& x, const Tensor& logits, T* lpx) {
    const int64_t kb = logits.size(0), dim = logits.size(1), b = x.size(0);
    const T* l = logits.data_ptr<T>();
    T* e = e_.data_ptr<T>();
    const int64_t n = kb * dim;
    for (int64_t j = 0; j < n; ++j) e[j] = -std::abs(l[j]);
    e_.exp_();
    at::log1p_out(l1p_, e_);
    T* t = l1p_.data_ptr<T>();  // becomes the per-pixel term x l - softplus(l)
    const T* xp = x.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r) {
      const T* xr = xp + (r % b) * dim;
      const T* lr = l + r * dim;
      T* tr = t + r * dim;
      T* er = e + r * dim;
      for (int64_t j = 0; j < dim; ++j) {
        const T v = lr[j];
        tr[j] = xr[j] * v - (std::max(v, T(0)) + tr[j]);
        const T s = T(1) / (T(1) + er[j]);
        er[j] = v >= T(0) ? s : er[j] * s;
      }
      lpx[r] = static_cast<T>(row_sum(tr, dim));
    }
  }

  template <typename T>
  static double row_sum(const T* v, int64_t n) {
    constexpr int L = 8;
    double acc[L] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + L <= n; j += L)
      for (int l = 0; l < L; ++l) acc[l] += static_cast<double>(v[j + l]);
    for (; j < n; ++j) acc[0] += static_cast<double>(v[j]);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }

  // dLoss/dlogits = G (x - sigmoid(l)), written over the logits.
  template <typename T>
  void likelihood_backward(const Tensor& x, Tensor& logits) {
    const int64_t kb = logits.size(0), dim = logits.size(1), b = x.size(0);
    T* l = logits.data_ptr<T>();
    const T* e = e_.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* g = g_.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r) {
      const T* xr = xp + (r % b) * dim;
      const T gr = g[r];
      for (int64_t j = 0; j < dim; ++j) l[r * dim + j] = gr * (xr[j] - e[r * dim + j]);
    }
  }

  // The bound, log w, loss, G = dLoss/dlog w_train and A = r G (DReG's path weights) from
  // log p(x|z) and log p(z) - log q (fused._FusedCore._weights).
  template <typename T>
  void weights(const T* lpx, const T* ratio, int64_t b, double beta) {
    const int64_t k = k_;
    const bool unit = beta == 1.0;
    T* lw = logw_.data_ptr<T>();
    T* bound = bound_.data_ptr<T>();
    T* g = g_.data_ptr<T>();
    T* a = a_.data_ptr<T>();
    const T tb = static_cast<T>(beta);
    for (int64_t i = 0; i < k * b; ++i) lw[i] = lpx[i] + ratio[i];
    // the training log weights go to g first
    for (int64_t i = 0; i < k * b; ++i) g[i] = unit ? lw[i] : lpx[i] + tb * ratio[i];
    double train_sum = 0;
    const T logk = static_cast<T>(std::log(static_cast<double>(k)));
    for (int64_t c = 0; c < b; ++c) {
      T train, rep;
      if (iwae_) {
        T m = -INFINITY, mr = -INFINITY;
        for (int64_t i = 0; i < k; ++i) {
          m = std::max(m, g[i * b + c]);
          mr = std::max(mr, lw[i * b + c]);
        }
        if (!std::isfinite(m)) m = 0;
        if (!std::isfinite(mr)) mr = 0;
        T s = 0, sr = 0;
        for (int64_t i = 0; i < k; ++i) {
          s += std::exp(g[i * b + c] - m);
          sr += std::exp(lw[i * b + c] - mr);
        }
        const T lse = m + std::log(s);
        for (int64_t i = 0; i < k; ++i) g[i * b + c] = std::exp(g[i * b + c] - lse);
        train = lse - logk;
        rep = unit ? train : mr + std::log(sr) - logk;
      } else {
        double s = 0, sr = 0;
        for (int64_t i = 0; i < k; ++i) {
          s += g[i * b + c];
          sr += lw[i * b + c];
        }
        train = static_cast<T>(s / static_cast<double>(k));
        rep = unit ? train : static_cast<T>(sr / static_cast<double>(k));
        for (int64_t i = 0; i < k; ++i) g[i * b + c] = T(1) / static_cast<T>(k);
      }
      bound[c] = rep;
      train_sum += train;
    }
    loss_.fill_(-train_sum / static_cast<double>(b));
    const T scale = T(-1) / static_cast<T>(b);
    for (int64_t i = 0; i < k * b; ++i) {
      const T c = g[i];
      g[i] = c * scale;
      a[i] = dreg_ ? g[i] * (T(1) - tb + tb * c) : g[i];
    }
  }

  // q(z1|x)'s head gradient from dLoss/dz1 ([K, B, D1], the reparameterized sample).
  template <typename T>
  void encoder_head_grad(const T* gz, const T* eps, const T* std1, int64_t b, double beta, Tensor& gout) {
    const int64_t d = d1_, k = k_;
    T* go = gout.data_ptr<T>();
    const T* a = a_.data_ptr<T>();
    const T hb = static_cast<T>(0.5 * beta);
    for (int64_t c = 0; c < b; ++c) {
      T* gm = go + c * 2 * d;
      T* gl = gm + d;
      std::fill(gm, gm + 2 * d, T(0));
      for (int64_t i = 0; i < k; ++i) {
        const T* gr = gz + (i * b + c) * d;
        const T* er = eps + (i * b + c) * d;
        for (int64_t j = 0; j < d; ++j) {
          gm[j] += gr[j];
          gl[j] += gr[j] * er[j];
        }
      }
      T asum = 0;
      if (!stl_)
        for (int64_t i = 0; i < k; ++i) asum += a[i * b + c];
      for (int64_t j = 0; j < d; ++j) gl[j] = gl[j] * (std1[c * d + j] * T(0.5)) + (stl_ ? T(0) : asum * hb);
    }
  }

  template <typename T>
  std::vector<Tensor> one_layer(const Tensor& x, const Tensor& eps, double beta) {
    const int64_t b = x.size(0), k = k_, d = d1_, kb = k * b;
    buffers(b, x);
    Chain& enc = chains_[0];
    Chain& dec = chains_[1];
    const T tb = static_cast<T>(beta);
    const T half = static_cast<T>(0.5 * d * std::log(2 * M_PI));
    const Tensor& out = enc.template forward<T>(x);
    const T* op = out.data_ptr<T>();
    T* sd = std1_.data_ptr<T>();
    T* lq = lq1_.data_ptr<T>();
    T* lp = lp1_.data_ptr<T>();
    T* z = z1_.data_ptr<T>();
    const T* ep = eps.data_ptr<T>();
    const std::vector<double> lvsum = std_from_logvar(op, b, d, sd);
    for (int64_t r = 0; r < kb; ++r) {
      const int64_t c = r % b;
      double zz = 0, ee = 0;
      for (int64_t j = 0; j < d; ++j) {
        const T e = ep[r * d + j];
        const T v = op[c * 2 * d + j] + sd[c * d + j] * e;
        z[r * d + j] = v;
        zz += v * v;
        ee += e * e;
      }
      lp[r] = static_cast<T>(-0.5 * zz) - half;
      lq[r] = static_cast<T>(-0.5 * (lvsum[c] + ee)) - half;
    }
    Tensor zf = z1_.view({kb, d});
    Tensor& logits = const_cast<Tensor&>(dec.template forward<T>(zf));
    T* lpx = lpx_.data_ptr<T>();
    log_bernoulli<T>(x, logits, lpx);
    std::vector<T> ratio(kb);
    for (int64_t r = 0; r < kb; ++r) ratio[r] = lp[r] - lq[r];
    weights<T>(lpx, ratio.data(), b, beta);

    likelihood_backward<T>(x, logits);
    dec.backward<T>(zf, logits, true, true);
    T* gz = dec.grad_in.data_ptr<T>();
    const T* g = g_.data_ptr<T>();
    const T* a = a_.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r) {
      const int64_t c = r % b;
      const T rr = dreg_ ? T(1) - tb + tb * (g[r] * static_cast<T>(-b)) : T(1);
      const T ab = a[r] * tb;
      for (int64_t j = 0; j < d; ++j) {
        T v = gz[r * d + j];
        if (dreg_) v *= rr;
        v -= ab * z[r * d + j];
        if (stl_) v += ab * (ep[r * d + j] / sd[c * d + j]);
        gz[r * d + j] = v;
      }
    }
    encoder_head_grad<T>(gz, ep, sd, b, beta, enc.out);
    enc.backward<T>(x, enc.out, true, false);
    return {bound_, logw_, loss_, lpx_, lp1_, Tensor(), lq1_, Tensor(), z1_, Tensor()};
  }

  template <typename T>
  std::vector<Tensor> two_layer(const Tensor& x, const Tensor& eps1, const Tensor& eps2, double beta) {
    const int64_t b = x.size(0), k = k_, d1 = d1_, d2 = d2_, kb = k * b;
    buffers(b, x);
    Chain& q1 = chains_[0];
    Chain& q2 = chains_[1];
    Chain& p1 = chains_[2];
    Chain& px = chains_[3];
    const T tb = static_cast<T>(beta);
    const T half1 = static_cast<T>(0.5 * d1 * std::log(2 * M_PI));
    const T half2 = static_cast<T>(0.5 * d2 * std::log(2 * M_PI));
    // q(z1 | x)
    const Tensor& out1 = q1.template forward<T>(x);
    const T* o1 = out1.data_ptr<T>();
    T* sd1 = std1_.data_ptr<T>();
    T* z1 = z1_.data_ptr<T>();
    T* lq1 = lq1_.data_ptr<T>();
    const T* e1 = eps1.data_ptr<T>();
    const std::vector<double> lvsum = std_from_logvar(o1, b, d1, sd1);
    for (int64_t r = 0; r < kb; ++r) {
      const int64_t c = r % b;
      double ee = 0;
      for (int64_t j = 0; j < d1; ++j) {
        const T e = e1[r * d1 + j];
        z1[r * d1 + j] = o1[c * 2 * d1 + j] + sd1[c * d1 + j] * e;
        ee += e * e;
      }
      lq1[r] = static_cast<T>(-0.5 * (lvsum[c] + ee)) - half1;
    }
    Tensor z1f = z1_.view({kb, d1});
    // q(z2 | z1)
    const Tensor& out2 = q2.template forward<T>(z1f);
    const T* o2 = out2.data_ptr<T>();
    T* sd2 = std2_.data_ptr<T>();
    T* z2 = z2_.data_ptr<T>();
    T* lq2 = lq2_.data_ptr<T>();
    T* lp2 = lp2_.data_ptr<T>();
    const T* e2 = eps2.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r)
      for (int64_t j = 0; j < d2; ++j) sd2[r * d2 + j] = o2[r * 2 * d2 + d2 + j] * T(0.5);
    std2_.exp_();
    for (int64_t r = 0; r < kb; ++r) {
      double lvs = 0, ee = 0, zz = 0;
      for (int64_t j = 0; j < d2; ++j) {
        const T lv = o2[r * 2 * d2 + d2 + j];
        const T s = sd2[r * d2 + j];
        const T e = e2[r * d2 + j];
        const T v = o2[r * 2 * d2 + j] + s * e;
        z2[r * d2 + j] = v;
        lvs += lv;
        ee += e * e;
        zz += v * v;
      }
      lq2[r] = static_cast<T>(-0.5 * (lvs + ee)) - half2;
      lp2[r] = static_cast<T>(-0.5 * zz) - half2;
    }
    Tensor z2f = z2_.view({kb, d2});
    // p(z1 | z2) and p(x | z1)
    const Tensor& outp = p1.template forward<T>(z2f);
    const T* opp = outp.data_ptr<T>();
    T* u = u_.data_ptr<T>();
    T* uip = uip_.data_ptr<T>();
    T* lp1 = lp1_.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r)
      for (int64_t j = 0; j < d1; ++j) uip[r * d1 + j] = -opp[r * 2 * d1 + d1 + j];
    uip_.exp_();  // 1 / var, then (z1 - m) / var
    for (int64_t r = 0; r < kb; ++r) {
      double lvs = 0, q = 0;
      for (int64_t j = 0; j < d1; ++j) {
        const T plv = opp[r * 2 * d1 + d1 + j];
        const T uu = z1[r * d1 + j] - opp[r * 2 * d1 + j];
        const T w = uu * uip[r * d1 + j];
        u[r * d1 + j] = uu;
        uip[r * d1 + j] = w;
        lvs += plv;
        q += uu * w;
      }
      lp1[r] = static_cast<T>(-0.5 * (lvs + q)) - half1;
    }
    Tensor& logits = const_cast<Tensor&>(px.template forward<T>(z1f));
    T* lpx = lpx_.data_ptr<T>();
    log_bernoulli<T>(x, logits, lpx);
    std::vector<T> ratio(kb);
    for (int64_t r = 0; r < kb; ++r) ratio[r] = lp2[r] + lp1[r] - lq1[r] - lq2[r];
    weights<T>(lpx, ratio.data(), b, beta);

    // decoder side: weights G
    const T* g = g_.data_ptr<T>();
    const T* a = a_.data_ptr<T>();
    likelihood_backward<T>(x, logits);
    px.backward<T>(z1f, logits, true, true);
    T* gz1 = px.grad_in.data_ptr<T>();
    T* gp = p1.out.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r) {
      const T gb = g[r] * tb;
      for (int64_t j = 0; j < d1; ++j) {
        const T w = uip[r * d1 + j];
        const T gm = w * gb;  // d log p1 / d mean = (z1 - m) / var
        gp[r * 2 * d1 + j] = gm;
        gp[r * 2 * d1 + d1 + j] = (u[r * d1 + j] * w - T(1)) * (gb * T(0.5));
        gz1[r * d1 + j] -= gm;
      }
    }
    p1.backward<T>(z2f, p1.out, true, true);
    T* gz2 = p1.grad_in.data_ptr<T>();
    // encoder side: weights A = r G
    T* gq2 = q2.out.data_ptr<T>();
    for (int64_t r = 0; r < kb; ++r) {
      const T ab = a[r] * tb;
      const T rr = dreg_ ? T(1) - tb + tb * (g[r] * static_cast<T>(-b)) : T(1);
      if (dreg_)
        for (int64_t j = 0; j < d1; ++j) gz1[r * d1 + j] *= rr;
      for (int64_t j = 0; j < d2; ++j) {
        T v = gz2[r * d2 + j];
        if (dreg_) v *= rr;
        v -= ab * z2[r * d2 + j];
        const T h2 = sd2[r * d2 + j] * e2[r * d2 + j] * T(0.5);
        gq2[r * 2 * d2 + j] = v;
        gq2[r * 2 * d2 + d2 + j] = v * h2 + ab * T(0.5);
      }
    }
    if (!stl_) {
      q2.backward<T>(z1f, q2.out, true, true);
      const T* gi = q2.grad_in.data_ptr<T>();
      for (int64_t i = 0; i < kb * d1; ++i) gz1[i] += gi[i];
    } else {
      q2.backward<T>(z1f, q2.out, false, true);
      const T* gi = q2.grad_in.data_ptr<T>();
      for (int64_t i = 0; i < kb * d1; ++i) gz1[i] += gi[i];
      // q(z2|z1)'s own parameters: log q2 at fixed parameters, + beta eps2 / std2 through z2
      for (int64_t r = 0; r < kb; ++r) {
        const T ab = a[r] * tb;
        for (int64_t j = 0; j < d2; ++j) {
          const T s = sd2[r * d2 + j], e = e2[r * d2 + j];
          const T m = gq2[r * 2 * d2 + j] + ab * (e / s);
          gq2[r * 2 * d2 + j] = m;
          gq2[r * 2 * d2 + d2 + j] = m * (s * e * T(0.5));
        }
      }
      q2.backward<T>(z1f, q2.out, true, false);
      for (int64_t r = 0; r < kb; ++r) {  // log q1 at fixed parameters
        const int64_t c = r % b;
        const T ab = a[r] * tb;
        for (int64_t j = 0; j < d1; ++j) gz1[r * d1 + j] += ab * (e1[r * d1 + j] / sd1[c * d1 + j]);
      }
    }
    encoder_head_grad<T>(gz1, e1, sd1, b, beta, q1.out);
    q1.backward<T>(x, q1.out, true, false);
    return {bound_, logw_, loss_, lpx_, lp1_, lp2_, lq1_, lq2_, z1_, z2_};
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<std::vector<std::vector<std::vector<Tensor>>>, Tensor, int64_t, bool, bool, bool>())
      .def("run", &Step::run, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_adam", &Step::set_adam)
      .def("proved", &Step::proved);
}
