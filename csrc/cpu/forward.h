// The CPU forward: per-anchor online log-sum-exp, entropy, positive count, weight sum and
// weighted logit sum over the tile pairs, then the loss and the statistics of each anchor.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/label_weights.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"
#include "supcon_pair.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace {

using simd::vec_t;

constexpr double kMinusInf = -std::numeric_limits<double>::infinity();

// Online per-anchor statistics: log-sum-exp as (max, Σ e^{x−max}), the entropy accumulator
// t = Σ e^{x−max}(x − max) (<= 0, so entropy = log Σ − t / Σ has no cancellation), positive
// count, weight sum, Σ w·x. Double whatever T is: they are merged once per tile and the loss is
// a difference.
struct RowStats {
  std::vector<double> max, sum, t, count, omega, weighted_logit;
  explicit RowStats(int64_t n)
      : max(n, kMinusInf), sum(n, 0), t(n, 0), count(n, 0), omega(n, 0), weighted_logit(n, 0) {}

  // Out of line on purpose: compiled once, for the baseline ISA, the merge rounds the same way
  // whichever clone of forward_tile calls it (inlined into the x86-64-v3/v4 clones, GCC would
  // contract `sum * exp(...) + tile_sum` into an FMA there, and the float64 results would
  // depend on the inliner's choices).
  __attribute__((noinline)) void add(int64_t a, double tile_max, double tile_sum, double tile_t,
                                     double c, double o, double wl) {
    count[a] += c;
    omega[a] += o;
    weighted_logit[a] += wl;
    if (tile_max == kMinusInf) return;
    if (tile_max > max[a]) {  // rescale (sum, t) to the new max: t' = e^d (t + d·sum)
      const double d = max[a] - tile_max, scale = std::exp(d);  // d = -inf before the first tile
      t[a] = (sum[a] > 0 ? scale * (t[a] + d * sum[a]) : 0.0) + tile_t;
      sum[a] = sum[a] * scale + tile_sum;
      max[a] = tile_max;
    } else {
      const double d = tile_max - max[a], scale = std::exp(d);
      t[a] += scale * (tile_t + d * tile_sum);
      sum[a] += tile_sum * scale;
    }
  }
  void merge(int64_t a, const RowStats& o) {
    add(a, o.max[a], o.sum[a], o.t[a], o.count[a], o.omega[a], o.weighted_logit[a]);
  }
};

// x − max floored where exp(x − max) is already negligible, so that the masked columns
// (x = −inf) add e·(x − max) = (tiny)·(finite) to t instead of 0·(−inf): −87 for float, where
// simd::exp clamps anyway (the sums are unchanged), and for double where exp is exactly 0.
template <typename T>
constexpr T kExpFloor = std::is_same_v<T, float> ? T(-87) : T(-746);

// A tile's contribution to the statistics of the rows (or columns) of one vector, lane by lane:
// Σ e^{x−m}, Σ e^{x−m}(x − m), positive count, Σ w, Σ w·x for logits x and weights w.
template <typename T>
struct TileSums {
  using V = vec_t<T>;
  V sum{}, ent{}, cnt{}, om{}, wl{};
  MODAN_INLINE void add(V x, V m, V w) {
    const V d = simd::vmax(x - m, simd::splat(kExpFloor<T>)), e = simd::exp(d);
    sum += e;
    ent += e * d;
    const auto positive = w > T(0);
    cnt += positive ? simd::splat(T(1)) : V{};
    om += w;
    wl += positive ? w * x : V{};
  }
};

// Statistics of the anchors among the tile's rows (reductions along each row) and, when
// `columns`, of those among its columns (reductions down the columns).
template <typename T>
MODAN_INLINE void forward_tile_body(const Problem& p, int64_t r0, int64_t nr, int64_t c0,
                                    int64_t nc, bool columns, int64_t ld, T* s, const T* w,
                                    T* column, RowStats& stats) {
  using V = vec_t<T>;
  constexpr int L = simd::lanes<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t width = padded(nc, L);
  for (int64_t r = 0; r < nr; ++r) {
    T* sr = s + r * ld;
    if (!p.is_anchor(r0 + r)) continue;
    const int64_t self = r0 + r - c0;
    T self_x = 0;
    if (self >= 0 && self < nc) self_x = sr[self], sr[self] = kNegInf;
    V vmax = simd::splat(kNegInf);
    for (int64_t c = 0; c < width; c += L) vmax = simd::vmax(vmax, simd::load(sr + c));
    const T m = simd::hmax<T>(vmax);
    TileSums<T> row;
    if (m != kNegInf)
      for (int64_t c = 0; c < width; c += L)
        row.add(simd::load(sr + c), simd::splat(m), simd::load(w + r * ld + c));
    stats.add(r0 + r - p.anchor_begin, m, simd::hsum<T>(row.sum), simd::hsum<T>(row.ent),
              simd::hsum<T>(row.cnt), simd::hsum<T>(row.om), simd::hsum<T>(row.wl));
    if (self >= 0 && self < nc) sr[self] = self_x;
  }
  if (!columns) return;
  T* cmax = column;
  T* csum = column + ld;
  T* cent = column + 2 * ld;
  T* ccnt = column + 3 * ld;
  T* com = column + 4 * ld;
  T* cwl = column + 5 * ld;
  for (int64_t c = 0; c < width; c += L) {
    V m = simd::splat(kNegInf);
    for (int64_t r = 0; r < nr; ++r) m = simd::vmax(m, simd::load(s + r * ld + c));
    simd::store(cmax + c, m);
    TileSums<T> col;
    for (int64_t r = 0; r < nr; ++r)
      col.add(simd::load(s + r * ld + c), m, simd::load(w + r * ld + c));
    simd::store(csum + c, col.sum), simd::store(cent + c, col.ent);
    simd::store(ccnt + c, col.cnt), simd::store(com + c, col.om), simd::store(cwl + c, col.wl);
  }
  for (int64_t c = 0; c < nc; ++c)
    if (p.is_anchor(c0 + c))
      stats.add(c0 + c - p.anchor_begin, cmax[c], csum[c], cent[c], ccnt[c], com[c], cwl[c]);
}
MODAN_CLONES void forward_tile(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                               bool columns, int64_t ld, float* s, const float* w, float* column,
                               RowStats& stats) {
  forward_tile_body(p, r0, nr, c0, nc, columns, ld, s, w, column, stats);
}
MODAN_CLONES void forward_tile(const Problem& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                               bool columns, int64_t ld, double* s, const double* w,
                               double* column, RowStats& stats) {
  forward_tile_body(p, r0, nr, c0, nc, columns, ld, s, w, column, stats);
}

template <typename T>
void forward(const Problem& p, const T* z, const int64_t* labels, T* loss, double* stats_out) {
  const int64_t anchors = p.anchors();
  const auto pairs = tile_pairs(p);
  const int64_t slots = thread_slots(pairs.size());
  const LabelWeights<T> weights(weight_problem(p), labels);
  std::vector<RowStats> slot_stats(slots, RowStats(anchors));
  std::vector<TileScratch<T>> scratch(slots, TileScratch<T>(p, /*backward=*/false));

  for_each_pair(pairs, slots, [&](int64_t slot, const TilePair& tp) {
    TileScratch<T>& t = scratch[slot];
    const int64_t r0 = tp.row_block * kTile, nr = block_rows(p, tp.row_block);
    const int64_t c0 = tp.col_block * kTile, nc = block_rows(p, tp.col_block);
    load_tile(p, weights, z, r0, nr, c0, nc, t);
    forward_tile(p, r0, nr, c0, nc,
                 tp.col_block != tp.row_block && block_has_anchor(p, tp.col_block), t.ld,
                 t.s.data(), t.w.data(), t.column.data(), slot_stats[slot]);
  });

  RowStats& total = slot_stats[0];
  for (int64_t slot = 1; slot < slots; ++slot)
    for (int64_t a = 0; a < anchors; ++a) total.merge(a, slot_stats[slot]);

  const double scale = p.temperature / p.base_temperature;
  for (int64_t a = 0; a < anchors; ++a) {
    double* st = stats_out + kStatsColumns * a;
    std::fill(st, st + kStatsColumns, 0.0);
    loss[a] = T(0);
    if (!p.is_anchor(p.anchor_begin + a)) continue;
    if (total.max[a] != kMinusInf) {  // the row has another row (M > 1)
      const double log_sum = std::log(total.sum[a]);
      st[kLse] = total.max[a] + log_sum;
      st[kEntropy] = log_sum - total.t[a] / total.sum[a];
    }
    if (total.count[a] == 0) continue;  // no positive: no loss, nothing to normalise
    const double norm = p.normalization == kByCount ? total.count[a] : total.omega[a];
    loss[a] = T(scale * (total.omega[a] * st[kLse] - total.weighted_logit[a]) / norm);
    st[kCount] = total.count[a], st[kOmega] = total.omega[a], st[kNorm] = norm;
  }
}

}  // namespace
}  // namespace modan_ext
