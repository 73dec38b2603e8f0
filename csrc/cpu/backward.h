// The CPU backward: H = G + Gᵀ formed tile by tile from the forward's statistics, and the
// gradient (G + Gᵀ) Z accumulated per thread slot, merged in a fixed order.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/label_weights.h"
#include "cpu/matmul.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace {

using simd::vec_t;

// Per contrast row: ∂ℓ_a/∂s_ab · grad_loss_a = alpha_a exp(x_ab - lse_a) - beta_a w_ab. Rows that
// are not counted anchors get alpha = beta = 0 and lse = +inf, so their term is exactly 0
// (never 0 · inf).
//
// lse comes in float64 and must not be rounded to T: with lse = lse_hi + lse_lo (lse_hi = T(lse)),
// exp(x - lse) = exp(x - lse_hi) · exp(-lse_lo), and the second factor is folded into alpha
// (in double, rounded once). x - lse_hi is exact where p matters (x within a factor 2 of lse).
template <typename T>
struct AnchorCoefficients {
  std::vector<T> alpha, beta, lse;
  AnchorCoefficients(const Problem& p, const T* grad_loss, const double* stats)
      : alpha(p.rows, T(0)), beta(p.rows, T(0)),
        lse(p.rows, std::numeric_limits<T>::infinity()) {
    for (int64_t a = 0; a < p.anchors(); ++a) {
      const double* st = stats + kStatsColumns * a;
      const int64_t r = p.anchor_begin + a;
      if (!p.is_anchor(r) || !(st[kCount] > 0)) continue;
      const double b = double(grad_loss[a]) / (p.base_temperature * st[kNorm]);
      const T lse_hi = T(st[kLse]);
      beta[r] = T(b);
      alpha[r] = T(b * st[kOmega] * std::exp(double(lse_hi) - st[kLse]));
      lse[r] = lse_hi;
    }
  }
};

// H = G (row anchors) + Gᵀ (column anchors, off the diagonal block), in place of the logits x
// (load_tile), from the per-column coefficients padded to whole vectors in `column`.
template <typename T>
MODAN_INLINE void backward_tile_body(const Problem& p, const AnchorCoefficients<T>& coef,
                                     int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                     bool symmetric, int64_t ld, T* s, const T* w, T* column) {
  using V = vec_t<T>;
  constexpr int L = simd::lanes<T>;
  const int64_t width = padded(nc, L);
  T* ac = column;
  T* bc = column + ld;
  T* lc = column + 2 * ld;
  std::copy(coef.alpha.data() + c0, coef.alpha.data() + c0 + nc, ac);
  std::copy(coef.beta.data() + c0, coef.beta.data() + c0 + nc, bc);
  std::copy(coef.lse.data() + c0, coef.lse.data() + c0 + nc, lc);
  std::fill(ac + nc, ac + width, T(0)), std::fill(bc + nc, bc + width, T(0));
  std::fill(lc + nc, lc + width, std::numeric_limits<T>::infinity());
  for (int64_t r = 0; r < nr; ++r) {
    T* hr = s + r * ld;
    const T* wr = w + r * ld;
    const V ar = simd::splat(coef.alpha[r0 + r]), br = simd::splat(coef.beta[r0 + r]);
    const V lr = simd::splat(coef.lse[r0 + r]);
    const bool row_anchor = coef.alpha[r0 + r] != T(0) || coef.beta[r0 + r] != T(0);
    if (row_anchor && symmetric) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(hr + c), wc = simd::load(wr + c);
        simd::store(hr + c, ar * simd::exp(x - lr) - br * wc +
                                simd::load(ac + c) * simd::exp(x - simd::load(lc + c)) -
                                simd::load(bc + c) * wc);
      }
    } else if (row_anchor) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(hr + c), wc = simd::load(wr + c);
        simd::store(hr + c, ar * simd::exp(x - lr) - br * wc);
      }
    } else if (symmetric) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(hr + c), wc = simd::load(wr + c);
        simd::store(hr + c, simd::load(ac + c) * simd::exp(x - simd::load(lc + c)) -
                                simd::load(bc + c) * wc);
      }
    } else {
      std::fill(hr, hr + width, T(0));
    }
    const int64_t self = r0 + r - c0;  // in range on a diagonal block only
    if (self >= 0 && self < nc) hr[self] = T(0);
  }
}
MODAN_CLONES void backward_tile(const Problem& p, const AnchorCoefficients<float>& coef,
                                int64_t r0, int64_t nr, int64_t c0, int64_t nc, bool symmetric,
                                int64_t ld, float* s, const float* w, float* column) {
  backward_tile_body(p, coef, r0, nr, c0, nc, symmetric, ld, s, w, column);
}
MODAN_CLONES void backward_tile(const Problem& p, const AnchorCoefficients<double>& coef,
                                int64_t r0, int64_t nr, int64_t c0, int64_t nc, bool symmetric,
                                int64_t ld, double* s, const double* w, double* column) {
  backward_tile_body(p, coef, r0, nr, c0, nc, symmetric, ld, s, w, column);
}

MODAN_CLONES void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}
MODAN_CLONES void add_into(double* dst, const double* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

template <typename T>
void backward(const Problem& p, const T* grad_loss, const T* z, const int64_t* labels,
              const double* stats, T* grad) {
  const auto pairs = tile_pairs(p);
  const int64_t slots = thread_slots(pairs.size());
  const LabelWeights<T> weights(weight_problem(p), labels);
  const AnchorCoefficients<T> coef(p, grad_loss, stats);
  const int64_t D = p.dim;
  std::fill(grad, grad + p.rows * D, T(0));
  // Slot 0 accumulates straight into `grad`; the others into private buffers merged below.
  std::vector<std::vector<T>> slot_grad(slots - 1, std::vector<T>(p.rows * D, T(0)));
  std::vector<TileScratch<T>> scratch(slots, TileScratch<T>(p, /*backward=*/true));

  for_each_pair(pairs, slots, [&](int64_t slot, const TilePair& tp) {
    TileScratch<T>& t = scratch[slot];
    T* g = slot == 0 ? grad : slot_grad[slot - 1].data();
    const int64_t r0 = tp.row_block * kTile, nr = block_rows(p, tp.row_block);
    const int64_t c0 = tp.col_block * kTile, nc = block_rows(p, tp.col_block);
    load_tile(p, weights, z, r0, nr, c0, nc, t);
    backward_tile(p, coef, r0, nr, c0, nc,
                  tp.col_block != tp.row_block && block_has_anchor(p, tp.col_block), t.ld,
                  t.s.data(), t.w.data(), t.column.data());
    // grad_I += H Z_J and grad_J += Hᵀ Z_I (on a diagonal block both land in grad_I).
    T* product = t.product.data();
    matmul_into(blob(product, nr, D, D, 1), blob(t.s.data(), nr, nc, t.ld, 1),
                blob(z + c0 * D, nc, D, D, 1));
    add_into(g + r0 * D, product, nr * D);
    matmul_into(blob(product, nc, D, D, 1), blob(t.s.data(), nc, nr, 1, t.ld),
                blob(z + r0 * D, nr, D, D, 1));
    add_into(g + c0 * D, product, nc * D);
  });

  if (slots > 1) {
    torch::stable::parallel_for(0, p.rows, 64, [&](int64_t begin, int64_t end) {
      for (const auto& buffer : slot_grad)
        add_into(grad + begin * D, buffer.data() + begin * D, (end - begin) * D);
    });
  }
}

}  // namespace
}  // namespace modan_ext
