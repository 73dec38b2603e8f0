// Fused CPU kernel of modan_ext::supcon_fwd / supcon_bwd (contract: DEVELOPERS.md).
//
// The similarity matrix S = Z Zᵀ is streamed in square tiles of kTile rows. S and the label
// weights are symmetric, so a tile pair (I, J) with J > I serves the anchors of I (reducing along
// rows) and those of J (reducing along columns); pairs with J < I are skipped when J holds
// anchors. Forward: per-anchor online log-sum-exp, positive count, weight sum and weighted logit
// sum. Backward: recompute the tile, form H = G + Gᵀ on it, accumulate H Z_J into the gradient of
// block I and Hᵀ Z_I into that of block J. Tile pairs are split into one contiguous run per
// thread slot; each slot owns its accumulators (O(M) forward, O(M·D) backward), merged in a fixed
// order, so results do not depend on thread timing. Never an M x M buffer.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/label_weights.h"
#include "cpu/simd.h"
#include "supcon_pair.h"
#include "supcon_problem.h"

// The hot per-tile loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time: one portable build runs vectorised on any x86-64.
#if defined(__x86_64__) && !defined(__clang__)
#define MODAN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MODAN_CLONES
#endif

namespace modan_ext {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using simd::vec_t;

constexpr int64_t kTile = 256;  // rows per block: a 256 x 256 fp32 tile is 256 KiB (fits L2)
constexpr double kMinusInf = -std::numeric_limits<double>::infinity();

// ---- problem: the CPU's own checks and tiling --------------------------------------------------

// Devices and dtypes; everything else is checked once for both backends (supcon_problem.h).
void check_cpu_tensors(const Tensor& features, const Tensor& labels) {
  STD_TORCH_CHECK(features.device().type() == torch::headeronly::DeviceType::CPU &&
                      labels.device().type() == torch::headeronly::DeviceType::CPU,
                  "modan_ext: the CPU kernel got a tensor on another device");
  STD_TORCH_CHECK(features.scalar_type() == ScalarType::Float ||
                      features.scalar_type() == ScalarType::Double,
                  "modan_ext: the CPU kernel takes float32 or float64 features");
}

int64_t blocks(const Problem& p) { return (p.rows + kTile - 1) / kTile; }
int64_t block_rows(const Problem& p, int64_t b) { return std::min(kTile, p.rows - b * kTile); }
bool block_has_anchor(const Problem& p, int64_t b) {
  return b * kTile < p.anchor_end && (b + 1) * kTile > p.anchor_begin;
}
WeightProblem weight_problem(const Problem& p) {
  return {p.images, p.views, p.words, p.label_kind, p.weighting, p.threshold};
}

// ---- matrix products through ATen (MKL / OpenBLAS) -------------------------------------------

template <typename T>
constexpr ScalarType scalar_type_of() {
  return std::is_same_v<T, float> ? ScalarType::Float : ScalarType::Double;
}

template <typename T>
Tensor blob(const T* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return torch::stable::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride},
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  scalar_type_of<T>());
}

// out = a @ b, all strided views of raw memory; `out` is preallocated.
void matmul_into(const Tensor& out, const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a),
                                    torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STD_TORCH_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION) ==
                      AOTI_TORCH_SUCCESS,
                  "modan_ext: aten::mm.out failed");
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // drop the returned alias of `out`
}

// Scratch of one thread slot for one tile: similarities (later H), weights, column statistics.
template <typename T>
struct TileScratch {
  std::vector<T> s, w, column, product;
  TileScratch() : s(kTile * kTile), w(kTile * kTile), column(5 * kTile) {}
};

int64_t padded(int64_t n, int lanes) { return (n + lanes - 1) / lanes * lanes; }

// S_IJ = Z_I Z_Jᵀ into s (row stride kTile) and the weight tile into w; columns nc.. of both
// are padded with (-inf, 0) so that vector loops can run over whole vectors.
template <typename T>
void load_tile(const Problem& p, const LabelWeights<T>& weights, const T* z, int64_t r0,
               int64_t nr, int64_t c0, int64_t nc, TileScratch<T>& t) {
  matmul_into(blob(t.s.data(), nr, nc, kTile, 1), blob(z + r0 * p.dim, nr, p.dim, p.dim, 1),
              blob(z + c0 * p.dim, p.dim, nc, 1, p.dim));
  const int64_t width = padded(nc, simd::lanes<T>);
  for (int64_t r = 0; r < nr; ++r)
    std::fill(t.s.data() + r * kTile + nc, t.s.data() + r * kTile + width,
              -std::numeric_limits<T>::infinity());
  weights.fill(t.w.data(), kTile, r0, nr, c0, nc, width);
}

// ---- tile pairs and thread slots -------------------------------------------------------------

struct TilePair {
  int64_t row_block, col_block;
};

std::vector<TilePair> tile_pairs(const Problem& p) {
  std::vector<TilePair> pairs;
  for (int64_t i = 0; i < blocks(p); ++i) {
    if (!block_has_anchor(p, i)) continue;
    for (int64_t j = 0; j < blocks(p); ++j)
      if (!(block_has_anchor(p, j) && j < i)) pairs.push_back({i, j});
  }
  return pairs;
}

int64_t thread_slots(size_t pairs) {
  return std::max<int64_t>(
      1, std::min<int64_t>(torch::stable::get_num_threads(), static_cast<int64_t>(pairs)));
}

// body(slot, pair) for every pair; slot k runs the k-th contiguous run of pairs.
template <typename F>
void for_each_pair(const std::vector<TilePair>& pairs, int64_t slots, const F& body) {
  const int64_t n = static_cast<int64_t>(pairs.size());
  torch::stable::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot)
      for (int64_t k = n * slot / slots; k < n * (slot + 1) / slots; ++k) body(slot, pairs[k]);
  });
}

template <typename T>
bool all_finite(const T* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

// ---- forward ---------------------------------------------------------------------------------

// Online per-anchor statistics: log-sum-exp as (max, Σ exp(x - max)), positive count, weight
// sum, Σ w·x. Double whatever T is: they are merged once per tile and the loss is a difference.
struct RowStats {
  std::vector<double> max, sum, count, omega, weighted_logit;
  explicit RowStats(int64_t n)
      : max(n, kMinusInf), sum(n, 0), count(n, 0), omega(n, 0), weighted_logit(n, 0) {}

  // Out of line on purpose: compiled once, for the baseline ISA, the merge rounds the same way
  // whichever clone of forward_tile calls it (inlined into the x86-64-v3/v4 clones, GCC would
  // contract `sum * exp(...) + tile_sum` into an FMA there, and the float64 results would
  // depend on the inliner's choices).
  __attribute__((noinline)) void add(int64_t a, double tile_max, double tile_sum, double c,
                                     double o, double wl) {
    count[a] += c;
    omega[a] += o;
    weighted_logit[a] += wl;
    if (tile_max == kMinusInf) return;
    if (tile_max > max[a]) {
      sum[a] = sum[a] * std::exp(max[a] - tile_max) + tile_sum;
      max[a] = tile_max;
    } else {
      sum[a] += tile_sum * std::exp(tile_max - max[a]);
    }
  }
  void merge(int64_t a, const RowStats& o) {
    add(a, o.max[a], o.sum[a], o.count[a], o.omega[a], o.weighted_logit[a]);
  }
};

// Statistics of the anchors among the tile's rows (reductions along each row) and, when
// `columns`, of those among its columns (reductions down the columns).
template <typename T>
MODAN_INLINE void forward_tile_body(const Problem& p, int64_t r0, int64_t nr, int64_t c0,
                                    int64_t nc, bool columns, T* s, const T* w, T* column,
                                    RowStats& stats) {
  using V = vec_t<T>;
  constexpr int L = simd::lanes<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T inv_t = T(1.0 / p.temperature);
  const int64_t width = padded(nc, L);
  for (int64_t r = 0; r < nr; ++r) {
    T* sr = s + r * kTile;
    for (int64_t c = 0; c < width; c += L) simd::store(sr + c, simd::load(sr + c) * inv_t);
    if (!p.is_anchor(r0 + r)) continue;
    const int64_t self = r0 + r - c0;
    T self_x = 0;
    if (self >= 0 && self < nc) self_x = sr[self], sr[self] = kNegInf;
    V vmax = simd::splat(kNegInf);
    for (int64_t c = 0; c < width; c += L) vmax = simd::vmax(vmax, simd::load(sr + c));
    const T m = simd::hmax<T>(vmax);
    V sum{}, cnt{}, om{}, wl{};
    if (m != kNegInf) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(sr + c), wc = simd::load(w + r * kTile + c);
        sum += simd::exp(x - m);
        const auto positive = wc > T(0);
        cnt += positive ? simd::splat(T(1)) : V{};
        om += wc;
        wl += positive ? wc * x : V{};
      }
    }
    stats.add(r0 + r - p.anchor_begin, m, simd::hsum<T>(sum), simd::hsum<T>(cnt),
              simd::hsum<T>(om), simd::hsum<T>(wl));
    if (self >= 0 && self < nc) sr[self] = self_x;
  }
  if (!columns) return;
  T* cmax = column;
  T* csum = column + kTile;
  T* ccnt = column + 2 * kTile;
  T* com = column + 3 * kTile;
  T* cwl = column + 4 * kTile;
  for (int64_t c = 0; c < width; c += L) {
    V m = simd::splat(kNegInf);
    for (int64_t r = 0; r < nr; ++r) m = simd::vmax(m, simd::load(s + r * kTile + c));
    simd::store(cmax + c, m);
    V sum{}, cnt{}, om{}, wl{};
    for (int64_t r = 0; r < nr; ++r) {
      const V x = simd::load(s + r * kTile + c), wc = simd::load(w + r * kTile + c);
      sum += simd::exp(x - m);
      const auto positive = wc > T(0);
      cnt += positive ? simd::splat(T(1)) : V{};
      om += wc;
      wl += positive ? wc * x : V{};
    }
    simd::store(csum + c, sum), simd::store(ccnt + c, cnt);
    simd::store(com + c, om), simd::store(cwl + c, wl);
  }
  for (int64_t c = 0; c < nc; ++c)
    if (p.is_anchor(c0 + c))
      stats.add(c0 + c - p.anchor_begin, cmax[c], csum[c], ccnt[c], com[c], cwl[c]);
}
MODAN_CLONES void forward_tile(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                               bool columns, float* s, const float* w, float* column,
                               RowStats& stats) {
  forward_tile_body(p, r0, nr, c0, nc, columns, s, w, column, stats);
}
MODAN_CLONES void forward_tile(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                               bool columns, double* s, const double* w, double* column,
                               RowStats& stats) {
  forward_tile_body(p, r0, nr, c0, nc, columns, s, w, column, stats);
}

template <typename T>
void forward(const Problem& p, const T* z, const int64_t* labels, T* loss, T* stats_out) {
  const int64_t anchors = p.anchors();
  const auto pairs = tile_pairs(p);
  const int64_t slots = thread_slots(pairs.size());
  const LabelWeights<T> weights(weight_problem(p), labels);
  std::vector<RowStats> slot_stats(slots, RowStats(anchors));

  for_each_pair(pairs, slots, [&](int64_t slot, const TilePair& tp) {
    thread_local TileScratch<T> t;
    const int64_t r0 = tp.row_block * kTile, nr = block_rows(p, tp.row_block);
    const int64_t c0 = tp.col_block * kTile, nc = block_rows(p, tp.col_block);
    load_tile(p, weights, z, r0, nr, c0, nc, t);
    forward_tile(p, r0, nr, c0, nc,
                 tp.col_block != tp.row_block && block_has_anchor(p, tp.col_block), t.s.data(),
                 t.w.data(), t.column.data(), slot_stats[slot]);
  });

  RowStats& total = slot_stats[0];
  for (int64_t slot = 1; slot < slots; ++slot)
    for (int64_t a = 0; a < anchors; ++a) total.merge(a, slot_stats[slot]);

  const double scale = p.temperature / p.base_temperature;
  for (int64_t a = 0; a < anchors; ++a) {
    T* st = stats_out + 4 * a;
    const bool anchor = p.is_anchor(p.anchor_begin + a);
    const double lse = total.max[a] == kMinusInf ? 0.0 : total.max[a] + std::log(total.sum[a]);
    const double norm = p.normalization == kByCount ? total.count[a] : total.omega[a];
    if (!anchor || total.count[a] == 0) {  // no positive: no loss, nothing to normalise
      loss[a] = T(0);
      st[0] = anchor ? T(lse) : T(0);
      st[1] = st[2] = st[3] = T(0);
      continue;
    }
    loss[a] = T(scale * (total.omega[a] * lse - total.weighted_logit[a]) / norm);
    st[0] = T(lse), st[1] = T(total.count[a]), st[2] = T(total.omega[a]), st[3] = T(norm);
  }
}

// ---- backward --------------------------------------------------------------------------------

// Per contrast row: ∂ℓ_a/∂s_ab · grad_loss_a = alpha_a exp(x_ab - lse_a) - beta_a w_ab. Rows that
// are not counted anchors get alpha = beta = 0 and lse = +inf, so their term is exactly 0
// (never 0 · inf).
template <typename T>
struct AnchorCoefficients {
  std::vector<T> alpha, beta, lse;
  AnchorCoefficients(const Problem& p, const T* grad_loss, const T* stats)
      : alpha(p.rows, T(0)), beta(p.rows, T(0)),
        lse(p.rows, std::numeric_limits<T>::infinity()) {
    for (int64_t a = 0; a < p.anchors(); ++a) {
      const T* st = stats + 4 * a;
      const int64_t r = p.anchor_begin + a;
      if (!p.is_anchor(r) || !(st[1] > T(0))) continue;
      const double b = double(grad_loss[a]) / (p.base_temperature * double(st[3]));
      beta[r] = T(b);
      alpha[r] = T(b * double(st[2]));
      lse[r] = st[0];
    }
  }
};

// H = G (row anchors) + Gᵀ (column anchors, off the diagonal block), in place of S.
template <typename T>
MODAN_INLINE void backward_tile_body(const Problem& p, const AnchorCoefficients<T>& coef,
                                     int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                     bool symmetric, T* s, const T* w) {
  using V = vec_t<T>;
  constexpr int L = simd::lanes<T>;
  const T inv_t = T(1.0 / p.temperature);
  const int64_t width = padded(nc, L);
  const T* ac = coef.alpha.data() + c0;
  const T* bc = coef.beta.data() + c0;
  const T* lc = coef.lse.data() + c0;
  // The padding columns of alpha/beta/lse: read past nc only within the vectors' width.
  thread_local std::vector<T> col_alpha, col_beta, col_lse;
  if (width > nc) {
    col_alpha.assign(width, T(0)), col_beta.assign(width, T(0));
    col_lse.assign(width, std::numeric_limits<T>::infinity());
    std::copy(ac, ac + nc, col_alpha.begin()), ac = col_alpha.data();
    std::copy(bc, bc + nc, col_beta.begin()), bc = col_beta.data();
    std::copy(lc, lc + nc, col_lse.begin()), lc = col_lse.data();
  }
  for (int64_t r = 0; r < nr; ++r) {
    T* hr = s + r * kTile;
    const T* wr = w + r * kTile;
    const V ar = simd::splat(coef.alpha[r0 + r]), br = simd::splat(coef.beta[r0 + r]);
    const V lr = simd::splat(coef.lse[r0 + r]);
    const bool row_anchor = coef.alpha[r0 + r] != T(0) || coef.beta[r0 + r] != T(0);
    if (row_anchor && symmetric) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(hr + c) * inv_t, wc = simd::load(wr + c);
        simd::store(hr + c, ar * simd::exp(x - lr) - br * wc +
                                simd::load(ac + c) * simd::exp(x - simd::load(lc + c)) -
                                simd::load(bc + c) * wc);
      }
    } else if (row_anchor) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(hr + c) * inv_t, wc = simd::load(wr + c);
        simd::store(hr + c, ar * simd::exp(x - lr) - br * wc);
      }
    } else if (symmetric) {
      for (int64_t c = 0; c < width; c += L) {
        const V x = simd::load(hr + c) * inv_t, wc = simd::load(wr + c);
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
                                float* s, const float* w) {
  backward_tile_body(p, coef, r0, nr, c0, nc, symmetric, s, w);
}
MODAN_CLONES void backward_tile(const Problem& p, const AnchorCoefficients<double>& coef,
                                int64_t r0, int64_t nr, int64_t c0, int64_t nc, bool symmetric,
                                double* s, const double* w) {
  backward_tile_body(p, coef, r0, nr, c0, nc, symmetric, s, w);
}

MODAN_CLONES void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}
MODAN_CLONES void add_into(double* dst, const double* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

template <typename T>
void backward(const Problem& p, const T* grad_loss, const T* z, const int64_t* labels,
              const T* stats, T* grad) {
  const auto pairs = tile_pairs(p);
  const int64_t slots = thread_slots(pairs.size());
  const LabelWeights<T> weights(weight_problem(p), labels);
  const AnchorCoefficients<T> coef(p, grad_loss, stats);
  const int64_t D = p.dim;
  std::fill(grad, grad + p.rows * D, T(0));
  // Slot 0 accumulates straight into `grad`; the others into private buffers merged below.
  std::vector<std::vector<T>> slot_grad(slots - 1, std::vector<T>(p.rows * D, T(0)));

  for_each_pair(pairs, slots, [&](int64_t slot, const TilePair& tp) {
    thread_local TileScratch<T> t;
    T* g = slot == 0 ? grad : slot_grad[slot - 1].data();
    const int64_t r0 = tp.row_block * kTile, nr = block_rows(p, tp.row_block);
    const int64_t c0 = tp.col_block * kTile, nc = block_rows(p, tp.col_block);
    load_tile(p, weights, z, r0, nr, c0, nc, t);
    backward_tile(p, coef, r0, nr, c0, nc,
                  tp.col_block != tp.row_block && block_has_anchor(p, tp.col_block), t.s.data(),
                  t.w.data());
    // grad_I += H Z_J and grad_J += Hᵀ Z_I (on a diagonal block both land in grad_I).
    t.product.resize(kTile * D);
    T* product = t.product.data();
    matmul_into(blob(product, nr, D, D, 1), blob(t.s.data(), nr, nc, kTile, 1),
                blob(z + c0 * D, nc, D, D, 1));
    add_into(g + r0 * D, product, nr * D);
    matmul_into(blob(product, nc, D, D, 1), blob(t.s.data(), nc, nr, 1, kTile),
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

// ---- op entry points -------------------------------------------------------------------------

template <typename T>
void fill_nan(const Tensor& t) {
  T* d = t.mutable_data_ptr<T>();
  std::fill(d, d + t.numel(), std::numeric_limits<T>::quiet_NaN());
}

template <typename T>
void forward_or_nan(const Problem& p, const Tensor& features, const Tensor& labels,
                    const Tensor& loss, const Tensor& stats) {
  if (!all_finite(features.const_data_ptr<T>(), features.numel())) {
    fill_nan<T>(loss), fill_nan<T>(stats);  // non-finite input: NaN out, never a wrong number
    return;
  }
  forward<T>(p, features.const_data_ptr<T>(), labels.const_data_ptr<int64_t>(),
             loss.mutable_data_ptr<T>(), stats.mutable_data_ptr<T>());
}

template <typename T>
void backward_or_nan(const Problem& p, const Tensor& grad_loss, const Tensor& features,
                     const Tensor& labels, const Tensor& stats, const Tensor& grad) {
  if (!all_finite(features.const_data_ptr<T>(), features.numel()) ||
      !all_finite(stats.const_data_ptr<T>(), stats.numel())) {
    fill_nan<T>(grad);
    return;
  }
  backward<T>(p, grad_loss.const_data_ptr<T>(), features.const_data_ptr<T>(),
              labels.const_data_ptr<int64_t>(), stats.const_data_ptr<T>(),
              grad.mutable_data_ptr<T>());
}

std::tuple<Tensor, Tensor> supcon_fwd_cpu(Tensor features, Tensor labels, int64_t label_kind,
                                          int64_t views, int64_t anchor_begin, int64_t anchor_end,
                                          bool first_view_only, double temperature,
                                          double base_temperature, double threshold,
                                          int64_t weighting, int64_t normalization,
                                          bool /*allow_tf32: CUDA only*/) {
  check_cpu_tensors(features, labels);
  const Problem p = check_problem(features, labels, label_kind, views, anchor_begin, anchor_end,
                                  first_view_only, temperature, base_temperature, threshold,
                                  weighting, normalization);
  Tensor loss = torch::stable::new_empty(features, {p.anchors()}, loss_dtype(p.dtype));
  Tensor stats = torch::stable::new_empty(features, {p.anchors(), 4}, loss_dtype(p.dtype));
  if (p.anchors() == 0) return {loss, stats};
  if (p.dtype == ScalarType::Float)
    forward_or_nan<float>(p, features, labels, loss, stats);
  else
    forward_or_nan<double>(p, features, labels, loss, stats);
  return {loss, stats};
}

Tensor supcon_bwd_cpu(Tensor grad_loss, Tensor features, Tensor labels, Tensor stats,
                      int64_t label_kind, int64_t views, int64_t anchor_begin,
                      int64_t anchor_end, bool first_view_only, double temperature,
                      double base_temperature, double threshold, int64_t weighting,
                      int64_t normalization, bool /*allow_tf32*/) {
  check_cpu_tensors(features, labels);
  const Problem p = check_problem(features, labels, label_kind, views, anchor_begin, anchor_end,
                                  first_view_only, temperature, base_temperature, threshold,
                                  weighting, normalization);
  check_backward(p, features, grad_loss, stats);
  Tensor grad = torch::stable::new_empty(features, {p.rows, p.dim}, p.dtype);
  if (p.dtype == ScalarType::Float)
    backward_or_nan<float>(p, grad_loss, features, labels, stats, grad);
  else
    backward_or_nan<double>(p, grad_loss, features, labels, stats, grad);
  return grad;
}

}  // namespace
}  // namespace modan_ext

STABLE_TORCH_LIBRARY_IMPL(modan_ext, CPU, m) {
  m.impl("supcon_fwd", TORCH_BOX(&modan_ext::supcon_fwd_cpu));
  m.impl("supcon_bwd", TORCH_BOX(&modan_ext::supcon_bwd_cpu));
}
