// From the checked problem (supcon_problem.h) to the kernels' arguments: the compute and label
// modes, the parameter structs and the size of the workspace.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#include "cuda/float64.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/label_weights.cuh"
#include "cuda/workspace.cuh"
#include "supcon_pair.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Compact anchor list: rows a_first + t * a_step, t < na.
void anchor_list(const Problem& p, int64_t& first, int64_t& step, int64_t& na) {
  if (!p.first_view_only) {
    first = p.anchor_begin, step = 1, na = p.anchor_end - p.anchor_begin;
    return;
  }
  first = (p.anchor_begin + p.views - 1) / p.views * p.views;
  step = p.views;
  na = first < p.anchor_end ? (p.anchor_end - 1 - first) / p.views + 1 : 0;
}

int mode_of(ScalarType dt, bool allow_tf32) {
  if (dt == ScalarType::Half) return kF16;
  if (dt == ScalarType::BFloat16) return kBF16;
  return allow_tf32 ? kTF32 : kTF32x3;
}

int label_mode_of(const Problem& p) {
  if (p.label_kind == kClassIds) return kLCid;
  if (p.words <= 1) return (p.weighting == kJaccard || p.weighting == kBinary) ? kLJac1 : kLGen1;
  return kLGenN;
}

Params base_params(const Problem& p, const Tensor& features, const Tensor& labels, void* info,
                   const Workspace& ws) {
  Params k{};
  k.z = features.const_data_ptr();
  k.labels = static_cast<const int64_t*>(labels.const_data_ptr());
  k.info = static_cast<const RowInfo*>(info);
  k.flag = ws.flag();
  k.cmax = ws.cmax();
  k.M = p.rows, k.D = p.dim, k.W = p.words, k.views = p.views;
  k.abeg = p.anchor_begin, k.aend = p.anchor_end, k.fvo = p.first_view_only ? 1 : 0;
  k.nk = p.dim <= DK ? 1 : static_cast<int>((p.dim + DK - 1) / DK);
  const size_t es = features.element_size();
  k.vec = (p.dim > 0 && (p.dim * int64_t(es)) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(k.z) % 16 == 0) ? 1 : 0;
  k.inv_t = static_cast<float>(1.0 / p.temperature);
  // Fast threshold: a similarity is >= 1/(2·64·W) when it is > 0, and <= 1, so clamping the
  // threshold into [1e-20, 2] changes no decision, and keeps the float band finite. (A NaN
  // threshold rejects nothing in positive_weight: `sim < NaN` is false; so is sim < 1e-20.)
  double thr_c = p.threshold;
  if (!(thr_c >= 1e-20)) thr_c = 1e-20;
  if (thr_c > 2.0) thr_c = 2.0;
  k.thr_f = static_cast<float>(thr_c);
  k.band = static_cast<float>(1e-5 * thr_c);
  k.thr = p.threshold;
  k.weighting = static_cast<int>(p.weighting);
  k.binw = p.weighting == kBinary ? 1 : 0;
  k.wa = k.wb = k.wc = k.wd = 0.f;
  switch (p.weighting) {
    case kDice: k.wa = 0.5f; break;
    case kCosine: k.wd = 1.f; break;
    case kOverlap: k.wc = 1.f; break;
    default: k.wa = 1.f, k.wb = -1.f; break;  // jaccard, binary
  }
  k.cid_w = static_cast<float>(same_class_weight(p.threshold, p.weighting));
  k.t_over_tb = p.temperature / p.base_temperature;
  k.normalization = static_cast<int>(p.normalization);
  return k;
}

Params64 params64(const Problem& p, const Tensor& features, const Tensor& labels,
                  const int32_t* counts, const Workspace& ws) {
  Params64 k{};
  k.z = static_cast<const double*>(features.const_data_ptr());
  k.labels = static_cast<const int64_t*>(labels.const_data_ptr());
  k.counts = counts;
  k.flag = ws.flag();
  k.M = p.rows, k.D = p.dim, k.W = p.words, k.views = p.views, k.label_kind = p.label_kind;
  k.abeg = p.anchor_begin;
  k.inv_t = 1.0 / p.temperature;
  k.thr = p.threshold;
  k.t_over_tb = p.temperature / p.base_temperature;
  k.weighting = static_cast<int>(p.weighting);
  k.normalization = static_cast<int>(p.normalization);
  return k;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool uses_ties(const Problem& p) {
  const int lm = label_mode_of(p);
  return lm == kLJac1 || lm == kLGen1;
}

// Workspace body of the float32 / half paths: the row records, then the tie table if used.
int64_t body_bytes(const Problem& p) {
  return p.rows * int64_t(sizeof(RowInfo)) + (uses_ties(p) ? int64_t(kTieWords) * 4 : 0);
}

}  // namespace cuda_impl
}  // namespace modan_ext
