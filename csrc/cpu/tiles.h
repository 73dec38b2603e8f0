// The CPU kernel's tiling: square blocks of kTile rows, the tile pairs that cover S = Z Zᵀ
// once (S is symmetric), their split over thread slots, and the per-slot scratch into which a
// tile of S and of the label weights is loaded.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/label_weights.h"
#include "cpu/matmul.h"
#include "cpu/simd.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace {

constexpr int64_t kTile = 256;  // rows per block: a 256 x 256 fp32 tile is 256 KiB (fits L2)

int64_t blocks(const Problem& p) { return (p.rows + kTile - 1) / kTile; }
int64_t block_rows(const Problem& p, int64_t b) { return std::min(kTile, p.rows - b * kTile); }
bool block_has_anchor(const Problem& p, int64_t b) {
  return b * kTile < p.anchor_end && (b + 1) * kTile > p.anchor_begin;
}
WeightProblem weight_problem(const Problem& p) {
  return {p.images, p.views, p.words, p.label_kind, p.weighting, p.threshold};
}

int64_t padded(int64_t n, int lanes) { return (n + lanes - 1) / lanes * lanes; }

// Scratch of one thread slot, sized by the problem and owned by the call (freed when it
// returns): a tile of logits (the backward turns it into H), of weights, the column statistics
// (forward), the padded per-column coefficients and the H·Z product (backward). Row stride `ld`:
// the widest tile rounded up to whole 64-byte vectors, so a small problem gets small tiles.
template <typename T>
struct TileScratch {
  static constexpr int64_t kColumnStats = 6;  // max, Σ e, Σ e·(x − max), count, Σ w, Σ w·x
  int64_t ld;
  std::vector<T> s, w, column, product;
  TileScratch(const Problem& p, bool backward)
      : ld(padded(std::min(kTile, p.rows), simd::lanes<float>)),
        s(std::min(kTile, p.rows) * ld),
        w(s.size()),
        column((backward ? 3 : kColumnStats) * ld),
        product(backward ? std::min(kTile, p.rows) * p.dim : 0) {}
};

// The logits x = S_IJ / T of a tile into s (row stride t.ld) and its weights into w; columns
// nc.. are padded with (-inf, 0) so that vector loops can run over whole vectors. x is rounded
// once, here, as s · (1/T), and stored: the forward and the backward both read it from this
// tile, so they see the very same x (a product left in a register could be contracted with the
// following `x − lse` into one FMA, which rounds differently; at |x| ~ 1e5 half an ulp of x
// already moves exp(x − lse) by 1%).
template <typename T>
void load_tile(const Problem& p, const LabelWeights<T>& weights, const T* z, int64_t r0,
               int64_t nr, int64_t c0, int64_t nc, TileScratch<T>& t) {
  const int64_t ld = t.ld;
  T* s = t.s.data();
  matmul_into(blob(s, nr, nc, ld, 1), blob(z + r0 * p.dim, nr, p.dim, p.dim, 1),
              blob(z + c0 * p.dim, p.dim, nc, 1, p.dim));
  const T inv_t = T(1.0 / p.temperature);
  const int64_t width = padded(nc, simd::lanes<T>);
  for (int64_t r = 0; r < nr; ++r) {
    T* x = s + r * ld;
    for (int64_t c = 0; c < nc; ++c) x[c] *= inv_t;
    std::fill(x + nc, x + width, -std::numeric_limits<T>::infinity());
  }
  weights.fill(t.w.data(), ld, r0, nr, c0, nc, width);
}

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

}  // namespace
}  // namespace modan_ext
