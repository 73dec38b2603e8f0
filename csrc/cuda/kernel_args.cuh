// From the op's arguments to the kernels': the checked problem, the compute and label modes,
// the parameter structs and the size of the workspace.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "cuda/float64.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/label_weights.cuh"
#include "cuda/workspace.cuh"
#include "supcon_pair.h"

namespace modan_ext {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

struct Problem {
  int64_t M, D, B, W, views, label_kind, abeg, aend, weighting, normalization;
  bool fvo;
  double temperature, base_temperature, threshold;
  int32_t device;
  ScalarType dtype;
  int64_t anchors() const { return aend - abeg; }
};

Problem check_problem(const Tensor& features, const Tensor& labels, int64_t label_kind,
                      int64_t views, int64_t abeg, int64_t aend, bool fvo, double temperature,
                      double base_temperature, double threshold, int64_t weighting,
                      int64_t normalization) {
  STD_TORCH_CHECK(features.is_cuda(), "modan_ext: the CUDA kernel got features on another device");
  STD_TORCH_CHECK(labels.is_cuda(), "modan_ext: the CUDA kernel got labels on another device");
  STD_TORCH_CHECK(labels.get_device_index() == features.get_device_index(),
                  "modan_ext: features and labels must be on the same CUDA device");
  const ScalarType dt = features.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double || dt == ScalarType::Half ||
                      dt == ScalarType::BFloat16,
                  "modan_ext: the CUDA kernel takes float32, float64, float16 or bfloat16 "
                  "features");
  STD_TORCH_CHECK(features.dim() == 2 && features.is_contiguous(),
                  "modan_ext: features must be a contiguous [M, D] tensor");
  STD_TORCH_CHECK(labels.scalar_type() == ScalarType::Long && labels.dim() == 2 &&
                      labels.is_contiguous(),
                  "modan_ext: labels must be a contiguous int64 [B, W] tensor");
  STD_TORCH_CHECK(label_kind == kMultiHot || label_kind == kClassIds,
                  "modan_ext: label_kind must be 0 (multi-hot) or 1 (class ids)");
  STD_TORCH_CHECK(label_kind == kMultiHot || labels.size(1) == 1,
                  "modan_ext: class-id labels must have shape [B, 1]");
  STD_TORCH_CHECK(views >= 1, "modan_ext: views must be >= 1");
  STD_TORCH_CHECK(labels.size(0) * views == features.size(0),
                  "modan_ext: labels.size(0) * views must equal features.size(0)");
  STD_TORCH_CHECK(0 <= abeg && abeg <= aend && aend <= features.size(0),
                  "modan_ext: the anchor range must lie within [0, M]");
  STD_TORCH_CHECK(features.size(0) < (int64_t(1) << 31) - BN,
                  "modan_ext: the CUDA kernel takes fewer than 2^31 rows");
  STD_TORCH_CHECK(temperature > 0 && base_temperature > 0 && std::isfinite(temperature) &&
                      std::isfinite(base_temperature),
                  "modan_ext: temperatures must be finite and > 0");
  STD_TORCH_CHECK(weighting >= kJaccard && weighting <= kBinary,
                  "modan_ext: weighting must be in 0..4");
  STD_TORCH_CHECK(normalization == kByCount || normalization == kByWeight,
                  "modan_ext: normalization must be 0 (count) or 1 (weight)");
  Problem p;
  p.M = features.size(0), p.D = features.size(1), p.B = labels.size(0), p.W = labels.size(1);
  p.views = views, p.label_kind = label_kind, p.abeg = abeg, p.aend = aend;
  p.weighting = weighting, p.normalization = normalization, p.fvo = fvo;
  p.temperature = temperature, p.base_temperature = base_temperature, p.threshold = threshold;
  p.device = features.get_device_index();
  p.dtype = dt;
  return p;
}

// Compact anchor list: rows a_first + t * a_step, t < na.
void anchor_list(const Problem& p, int64_t& first, int64_t& step, int64_t& na) {
  if (!p.fvo) {
    first = p.abeg, step = 1, na = p.aend - p.abeg;
    return;
  }
  first = (p.abeg + p.views - 1) / p.views * p.views;
  step = p.views;
  na = first < p.aend ? (p.aend - 1 - first) / p.views + 1 : 0;
}

int mode_of(ScalarType dt, bool allow_tf32) {
  if (dt == ScalarType::Half) return kF16;
  if (dt == ScalarType::BFloat16) return kBF16;
  return allow_tf32 ? kTF32 : kTF32x3;
}

int label_mode_of(const Problem& p) {
  if (p.label_kind == kClassIds) return kLCid;
  if (p.W <= 1) return (p.weighting == kJaccard || p.weighting == kBinary) ? kLJac1 : kLGen1;
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
  k.M = p.M, k.D = p.D, k.W = p.W, k.views = p.views;
  k.abeg = p.abeg, k.aend = p.aend, k.fvo = p.fvo ? 1 : 0;
  k.nk = p.D <= DK ? 1 : static_cast<int>((p.D + DK - 1) / DK);
  const size_t es = features.element_size();
  k.vec = (p.D > 0 && (p.D * int64_t(es)) % 16 == 0 &&
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
  k.cid_w = static_cast<float>(positive_weight(1.0, p.threshold, p.weighting));
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
  k.M = p.M, k.D = p.D, k.W = p.W, k.views = p.views, k.label_kind = p.label_kind;
  k.abeg = p.abeg;
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
  return p.M * int64_t(sizeof(RowInfo)) + (uses_ties(p) ? int64_t(kTieWords) * 4 : 0);
}

}  // namespace cuda_impl
}  // namespace modan_ext
