// Per-pair label similarity and positive weight: the one definition shared by the CPU and CUDA
// kernels (ARCHITECTURE.md, "The op contract"). Everything here is header-only and host+device.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MODAN_HD __host__ __device__ __forceinline__
#else
#define MODAN_HD inline
#endif

namespace modan_ext {

enum Weighting : int64_t { kJaccard = 0, kDice = 1, kCosine = 2, kOverlap = 3, kBinary = 4 };
enum Normalization : int64_t { kByCount = 0, kByWeight = 1 };
enum LabelKind : int64_t { kMultiHot = 0, kClassIds = 1 };

MODAN_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}

// Label similarity of two multi-hot rows from their popcounts; 0 whenever the denominator is 0.
// Always double, whatever the feature dtype: the threshold test `sim >= threshold` must decide
// exactly as the float64 reference does (e.g. 1/3 against threshold 1/3), and IEEE division and
// sqrt of small integers are correctly rounded in both.
MODAN_HD double label_similarity(int64_t weighting, int n_and, int n_i, int n_j) {
  if (n_and == 0) return 0.0;
  switch (weighting) {
    case kDice:
      return double(2 * n_and) / double(n_i + n_j);
    case kCosine:
      return double(n_and) / sqrt(double(n_i) * double(n_j));
    case kOverlap:
      return double(n_and) / double(n_i < n_j ? n_i : n_j);
    default:  // kJaccard, kBinary (binary thresholds the Jaccard similarity)
      return double(n_and) / double(n_i + n_j - n_and);
  }
}

// Weight of a positive of another image (0: not a positive).
MODAN_HD double positive_weight(double sim, double threshold, int64_t weighting) {
  if (!(sim > 0.0) || sim < threshold) return 0.0;
  return weighting == kBinary ? 1.0 : sim;
}

// Weight of another image with the anchor's class id (class-id labels: sim = 1 for equal ids,
// else 0, then the multi-hot rule): 1, or 0 when threshold > 1.
MODAN_HD double same_class_weight(double threshold, int64_t weighting) {
  return positive_weight(1.0, threshold, weighting);
}

// The weight of contrast image j for anchor image i (1 for the same image: its other views are
// always positives), reading packed labels (row stride `words`) and per-image popcounts
// (`label_count`, multi-hot only).
MODAN_HD double pair_weight(const int64_t* labels, const int32_t* label_count, int64_t words,
                            int64_t label_kind, int64_t i, int64_t j, double threshold,
                            int64_t weighting) {
  if (i == j) return 1.0;
  if (label_kind == kClassIds)
    return labels[i] == labels[j] ? same_class_weight(threshold, weighting) : 0.0;
  const int64_t* yi = labels + i * words;
  const int64_t* yj = labels + j * words;
  int n_and = 0;
  for (int64_t w = 0; w < words; ++w) n_and += popcount64(static_cast<uint64_t>(yi[w] & yj[w]));
  return positive_weight(label_similarity(weighting, n_and, label_count[i], label_count[j]),
                         threshold, weighting);
}

}  // namespace modan_ext
