// Tiles of positive weights w_ab between rows of the image-major batch (ARCHITECTURE.md, "The
// op contract"): 1 between views of one image, 0 on the diagonal, else the thresholded label
// similarity from supcon_pair.h.
//
// Images are first mapped to keys: the class id, or the index of their distinct label set. With
// few distinct sets (the paper's label space has 27) the weight of a pair is a lookup in a
// [sets x sets] table, and a tile is filled by gathering one row per distinct key and copying it
// to the rows that share the key.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "supcon_pair.h"

namespace modan_ext {

constexpr int64_t kMaxTableLabelSets = 1024;

struct WeightProblem {
  int64_t images, views, words, label_kind, weighting;
  double threshold;
};

template <typename T>
class LabelWeights {
 public:
  LabelWeights(const WeightProblem& p, const int64_t* labels)
      : p_(p), labels_(labels),
        same_class_(static_cast<T>(same_class_weight(p.threshold, p.weighting))) {
    key_.resize(p.images);
    if (p.label_kind == kClassIds) {
      std::copy(labels, labels + p.images, key_.begin());
      return;
    }
    count_.resize(p.images);
    for (int64_t i = 0; i < p.images; ++i) {
      int c = 0;
      for (int64_t w = 0; w < p.words; ++w)
        c += popcount64(static_cast<uint64_t>(labels[i * p.words + w]));
      count_[i] = c;
    }
    std::vector<int64_t> order(p.images);
    std::iota(order.begin(), order.end(), 0);
    auto row = [&](int64_t i) { return labels + i * p.words; };
    auto less = [&](int64_t a, int64_t b) {
      return std::lexicographical_compare(row(a), row(a) + p.words, row(b), row(b) + p.words);
    };
    std::sort(order.begin(), order.end(), less);
    std::vector<int64_t> representative;
    for (int64_t k = 0; k < p.images; ++k) {
      if (k == 0 || less(order[k - 1], order[k])) representative.push_back(order[k]);
      key_[order[k]] = static_cast<int64_t>(representative.size()) - 1;
    }
    sets_ = static_cast<int64_t>(representative.size());
    if (sets_ > kMaxTableLabelSets) return;  // too many distinct sets: popcounts per pair
    table_.resize(sets_ * sets_);
    for (int64_t a = 0; a < sets_; ++a) {
      for (int64_t b = 0; b < sets_; ++b) {
        const int64_t i = representative[a], j = representative[b];
        int n_and = 0;
        for (int64_t w = 0; w < p.words; ++w)
          n_and += popcount64(static_cast<uint64_t>(row(i)[w] & row(j)[w]));
        // Two different images with one label set: their real similarity (0 if empty).
        const double sim = label_similarity(p.weighting, n_and, count_[i], count_[j]);
        table_[a * sets_ + b] = static_cast<T>(positive_weight(sim, p.threshold, p.weighting));
      }
    }
  }

  // w[r * ld + c] = weight of rows r0 + r (r < nr) and c0 + c (c < nc); columns nc..padded-1
  // are set to 0 so that vector loops may run over whole vectors.
  void fill(T* w, int64_t ld, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
            int64_t padded) const {
    thread_local std::vector<int64_t> col_key;
    thread_local std::vector<int32_t> cached_row;  // per key: tile row holding its weights
    col_key.resize(nc);
    const int64_t V = p_.views;
    for (int64_t c = 0; c < nc; ++c) col_key[c] = key_[(c0 + c) / V];
    if (!table_.empty()) cached_row.assign(sets_, -1);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t image = (r0 + r) / V, key = key_[image];
      T* out = w + r * ld;
      if (p_.label_kind == kClassIds) {
        for (int64_t c = 0; c < nc; ++c) out[c] = col_key[c] == key ? same_class_ : T(0);
      } else if (!table_.empty()) {
        // Rows are filled before their same-image fix-up below, so copy from a clean row.
        int32_t& source = cached_row[key];
        if (source >= 0) {
          std::memcpy(out, w + source * ld, nc * sizeof(T));
          fix_same_image((r0 + source) / V, c0, nc, /*undo=*/true, out);
        } else {
          const T* table_row = table_.data() + key * sets_;
          for (int64_t c = 0; c < nc; ++c) out[c] = table_row[col_key[c]];
          source = static_cast<int32_t>(r);
        }
      } else {
        for (int64_t c = 0; c < nc; ++c)
          out[c] = static_cast<T>(pair_weight(labels_, count_.data(), p_.words, p_.label_kind,
                                              image, (c0 + c) / V, p_.threshold, p_.weighting));
      }
      std::fill(out + nc, out + padded, T(0));
      fix_same_image(image, c0, nc, /*undo=*/false, out);
      if (r0 + r >= c0 && r0 + r < c0 + nc) out[r0 + r - c0] = T(0);
    }
  }

 private:
  // The views of `image` are positives of each other with weight 1. With undo, restores in
  // `out` the table weights that the copied row had before its own fix-up.
  void fix_same_image(int64_t image, int64_t c0, int64_t nc, bool undo, T* out) const {
    const int64_t V = p_.views;
    const int64_t first = std::max(image * V, c0), last = std::min(image * V + V, c0 + nc);
    if (first >= last) return;
    if (!undo) {
      for (int64_t c = first; c < last; ++c) out[c - c0] = T(1);
      return;
    }
    const T table_weight = table_[key_[image] * sets_ + key_[image]];
    for (int64_t c = first; c < last; ++c) out[c - c0] = table_weight;
  }

  const WeightProblem p_;
  const int64_t* labels_;
  std::vector<int64_t> key_;    // per image: class id or label-set index
  std::vector<int32_t> count_;  // per image: number of labels (multi-hot)
  const T same_class_;          // class ids: weight of another image with the same id
  std::vector<T> table_;        // [sets x sets] weights between distinct label sets
  int64_t sets_ = 0;
};

}  // namespace modan_ext
