// float64: a plain FMA path (gradcheck), no tensor cores.
#pragma once

#include <cmath>
#include <cstdint>

#include "supcon_pair.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace cuda_impl {

// One warp per row; lanes stride over the columns; every dot product is a sequential FMA over k,
// so s_ab == s_ba bit for bit and the backward recomputes the forward's logits exactly.

struct Params64 {
  const double* z;
  const int64_t* labels;
  const int32_t* counts;  // per image
  const int* flag;
  const double* coef;     // backward: [M, 3] = (lse or +inf, ca, cb)
  int64_t M, D, W, views, label_kind;
  int64_t abeg, a_first, a_step, na;
  double inv_t, thr, t_over_tb;
  int weighting, normalization;
  double* loss;
  double* stats;
  double* grad;
};

__device__ __forceinline__ double dot64(const double* a, const double* b, int64_t D) {
  double s = 0.0;
  for (int64_t k = 0; k < D; ++k) s = fma(a[k], b[k], s);
  return s;
}

__global__ void counts64_kernel(const int64_t* labels, int64_t B, int64_t W, int32_t* counts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  int n = 0;
  for (int64_t k = 0; k < W; ++k) n += __popcll(static_cast<unsigned long long>(labels[i * W + k]));
  counts[i] = n;
}

__global__ void supcon_fwd64_kernel(const Params64 p) {
  const int64_t ta = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (ta >= p.na || *p.flag) return;  // whole warps
  const int64_t a = p.a_first + ta * p.a_step;
  const int64_t ia = a / p.views;
  const double* za = p.z + a * p.D;
  // (m, l = Σ e^{x−m}, t = Σ e^{x−m}(x − m) <= 0): log-sum-exp and entropy (op contract v2)
  double m = -INFINITY, l = 0.0, t = 0.0, cnt = 0.0, om = 0.0, wx = 0.0;
  for (int64_t b = lane; b < p.M; b += 32) {
    if (b == a) continue;
    const double x = __dmul_rn(dot64(za, p.z + b * p.D, p.D), p.inv_t);  // never contracted
    if (x > m) {  // rescale to the new max: t' = e^d (t + d l), d = m − x; the new term adds 0
      const double scale = exp(m - x);
      t = l > 0.0 ? scale * (t + (m - x) * l) : 0.0;
      l = l * scale + 1.0;
      m = x;
    } else {
      const double e = exp(x - m);
      l += e;
      t += e * (x - m);
    }
    const double w = pair_weight(p.labels, p.counts, p.W, p.label_kind, ia, b / p.views, p.thr,
                                 p.weighting);
    if (w > 0.0) cnt += 1.0, om += w, wx += w * x;
  }
  for (int off = 1; off < 32; off <<= 1) {
    const double m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const double l2 = __shfl_xor_sync(0xffffffffu, l, off);
    const double t2 = __shfl_xor_sync(0xffffffffu, t, off);
    const double mn = fmax(m, m2);
    const double mu = mn == -INFINITY ? 0.0 : mn;
    const double s1 = exp(m - mu), s2 = exp(m2 - mu);
    t = (l > 0.0 ? s1 * (t + (m - mu) * l) : 0.0) + (l2 > 0.0 ? s2 * (t2 + (m2 - mu) * l2) : 0.0);
    l = l * s1 + l2 * s2;
    m = mn;
    cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
    om += __shfl_xor_sync(0xffffffffu, om, off);
    wx += __shfl_xor_sync(0xffffffffu, wx, off);
  }
  if (lane == 0) {
    const int64_t i = a - p.abeg;
    const double log_l = m == -INFINITY ? 0.0 : log(l);
    const double lse = m == -INFINITY ? 0.0 : m + log_l;
    const double norm = p.normalization == kByCount ? cnt : om;
    double* st = p.stats + kStatsColumns * i;
    st[kLse] = lse;
    st[kEntropy] = m == -INFINITY ? 0.0 : log_l - t / l;
    if (cnt > 0.0) {
      p.loss[i] = p.t_over_tb * (om * lse - wx) / norm;
      st[kCount] = cnt, st[kOmega] = om, st[kNorm] = norm;
    } else {
      p.loss[i] = 0.0;
      st[kCount] = st[kOmega] = st[kNorm] = 0.0;
    }
  }
}

__global__ void coef64_kernel(const double* stats, const double* grad_loss, int64_t M,
                              int64_t abeg, int64_t aend, int64_t views, int fvo,
                              double base_temperature, double* coef) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= M) return;
  double lse = INFINITY, ca = 0.0, cb = 0.0;
  if (is_anchor(r, abeg, aend, fvo, views)) {
    const double* st = stats + kStatsColumns * (r - abeg);
    if (st[kCount] > 0.0) {
      cb = grad_loss[r - abeg] / (base_temperature * st[kNorm]);
      ca = cb * st[kOmega];
      lse = st[kLse];
    }
  }
  coef[3 * r] = lse, coef[3 * r + 1] = ca, coef[3 * r + 2] = cb;
}

constexpr int kWarps64 = 4;

__global__ void __launch_bounds__(32 * kWarps64) supcon_bwd64_kernel(const Params64 p) {
  __shared__ double hs[kWarps64][32];
  const int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps64 + wib;
  if (r >= p.M || *p.flag) return;  // whole warps
  const double* zr = p.z + r * p.D;
  const int64_t ir = r / p.views;
  const double lse_r = p.coef[3 * r], ca_r = p.coef[3 * r + 1], cb_r = p.coef[3 * r + 2];
  double* gr = p.grad + r * p.D;
  for (int64_t d = lane; d < p.D; d += 32) gr[d] = 0.0;
  for (int64_t b0 = 0; b0 < p.M; b0 += 32) {
    const int64_t b = b0 + lane;
    double hv = 0.0;
    if (b < p.M && b != r) {
      const double x = __dmul_rn(dot64(zr, p.z + b * p.D, p.D), p.inv_t);
      const double w = pair_weight(p.labels, p.counts, p.W, p.label_kind, ir, b / p.views,
                                   p.thr, p.weighting);
      hv = ca_r * exp(x - lse_r) + p.coef[3 * b + 1] * exp(x - p.coef[3 * b]) -
           (cb_r + p.coef[3 * b + 2]) * w;
    }
    hs[wib][lane] = hv;
    __syncwarp();
    const int nb = static_cast<int>(p.M - b0 < 32 ? p.M - b0 : 32);
    for (int64_t d = lane; d < p.D; d += 32) {
      double acc = gr[d];
      for (int j = 0; j < nb; ++j) acc = fma(hs[wib][j], p.z[(b0 + j) * p.D + d], acc);
      gr[d] = acc;
    }
    __syncwarp();
  }
}

}  // namespace cuda_impl
}  // namespace modan_ext
