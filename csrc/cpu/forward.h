// The CPU forward: per-anchor online log-sum-exp, positive count, weight sum and weighted
// logit sum over the tile pairs, then the loss and the statistics of each anchor.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
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

}  // namespace
}  // namespace modan_ext
