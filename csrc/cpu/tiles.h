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
