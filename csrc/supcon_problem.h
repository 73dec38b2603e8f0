// The canonical problem of modan_ext::supcon_fwd / supcon_bwd and the one check of the ops' raw
// arguments, shared by the CPU and CUDA kernels (ARCHITECTURE.md, "The op contract"). The ops
// can be called directly through torch.ops, past the Python layer's validation, so every
// argument is checked here; a backend adds only what is its own (device, dtypes, size limits).
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "supcon_pair.h"

namespace modan_ext {

// Row r is an anchor: inside [anchor_begin, anchor_end), and the first view of its image when
// first_view_only (rows are image-major: row r is view r % views of image r / views).
MODAN_HD bool is_anchor(int64_t r, int64_t anchor_begin, int64_t anchor_end, bool first_view_only,
                        int64_t views) {
  return r >= anchor_begin && r < anchor_end && (!first_view_only || r % views == 0);
}

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// dtype of loss and grad_loss: float64 for float64 features, float32 otherwise.
inline ScalarType loss_dtype(ScalarType features) {
  return features == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// The columns of stats [Ma, kStatsColumns], float64 for every feature dtype (op contract v2):
// lse = log Σ_{k≠a} exp(s_ak/T) (0 without another row), count = |P(a)|, omega = Σ_{b∈P(a)} w_ab,
// norm = count or omega, entropy = H(p_a) = lse − Σ_k p_ak s_ak/T. count, omega and norm are 0
// for anchors without a positive; all five are 0 for rows that are not anchors. The backward
// reads lse unrounded (float32 would move Σ_b p_ab off 1 by up to half an ulp of lse); the
// Python layer turns (omega, norm, entropy) into the temperature's gradient.
enum StatsColumn : int64_t { kLse = 0, kCount = 1, kOmega = 2, kNorm = 3, kEntropy = 4 };
constexpr int64_t kStatsColumns = 5;
constexpr ScalarType kStatsDtype = ScalarType::Double;

struct Problem {
  int64_t rows, dim, images, words, views;  // M, D, B, W, V: features [M, D], labels [B, W]
  int64_t label_kind, anchor_begin, anchor_end;
  bool first_view_only;
  double temperature, base_temperature, threshold;
  int64_t weighting, normalization;
  ScalarType dtype;  // of the features

  int64_t anchors() const { return anchor_end - anchor_begin; }
  bool is_anchor(int64_t r) const {
    return modan_ext::is_anchor(r, anchor_begin, anchor_end, first_view_only, views);
  }
};

// The arguments both ops share, after the backend has checked devices and dtypes.
inline Problem check_problem(const Tensor& features, const Tensor& labels, int64_t label_kind,
                             int64_t views, int64_t anchor_begin, int64_t anchor_end,
                             bool first_view_only, double temperature, double base_temperature,
                             double threshold, int64_t weighting, int64_t normalization) {
  STD_TORCH_CHECK(features.dim() == 2 && features.is_contiguous(),
                  "modan_ext: features must be a contiguous [M, D] tensor");
  STD_TORCH_CHECK(labels.scalar_type() == ScalarType::Long && labels.dim() == 2 &&
                      labels.is_contiguous(),
                  "modan_ext: labels must be a contiguous int64 [B, W] tensor");
  STD_TORCH_CHECK(label_kind == kMultiHot || label_kind == kClassIds,
                  "modan_ext: label_kind must be 0 (multi-hot) or 1 (class ids), got ", label_kind);
  STD_TORCH_CHECK(label_kind == kMultiHot || labels.size(1) == 1,
                  "modan_ext: class-id labels must have shape [B, 1], got [", labels.size(0), ", ",
                  labels.size(1), "]");
  const int64_t rows = features.size(0), images = labels.size(0);
  STD_TORCH_CHECK(views >= 1, "modan_ext: views must be >= 1, got ", views);
  // Division, not images * views == rows: that product overflows for huge views.
  STD_TORCH_CHECK(rows % views == 0 && rows / views == images, "modan_ext: features.size(0) (",
                  rows, ") must be views (", views, ") times labels.size(0) (", images, ")");
  STD_TORCH_CHECK(0 <= anchor_begin && anchor_begin <= anchor_end && anchor_end <= rows,
                  "modan_ext: the anchor range [", anchor_begin, ", ", anchor_end,
                  ") must lie within [0, ", rows, "]");
  STD_TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
                  "modan_ext: temperature must be finite and > 0, got ", temperature);
  STD_TORCH_CHECK(std::isfinite(base_temperature) && base_temperature > 0,
                  "modan_ext: base_temperature must be finite and > 0, got ", base_temperature);
  STD_TORCH_CHECK(weighting >= kJaccard && weighting <= kBinary,
                  "modan_ext: weighting must be in 0..4, got ", weighting);
  STD_TORCH_CHECK(normalization == kByCount || normalization == kByWeight,
                  "modan_ext: normalization must be 0 (count) or 1 (weight), got ", normalization);
  return Problem{rows, features.size(1), images, labels.size(1), views, label_kind, anchor_begin,
                 anchor_end, first_view_only, temperature, base_temperature, threshold, weighting,
                 normalization, features.scalar_type()};
}

// supcon_bwd's own arguments: grad_loss [Ma] and the stats [Ma, 5] of supcon_fwd.
inline void check_backward(const Problem& p, const Tensor& features, const Tensor& grad_loss,
                           const Tensor& stats) {
  STD_TORCH_CHECK(grad_loss.device() == features.device() && stats.device() == features.device(),
                  "modan_ext: grad_loss and stats must be on the features' device");
  const ScalarType dtype = loss_dtype(p.dtype);
  STD_TORCH_CHECK(grad_loss.scalar_type() == dtype && grad_loss.dim() == 1 &&
                      grad_loss.size(0) == p.anchors() && grad_loss.is_contiguous(),
                  "modan_ext: grad_loss must be a contiguous [Ma] tensor of the loss dtype "
                  "(float64 for float64 features, float32 otherwise)");
  STD_TORCH_CHECK(stats.scalar_type() == kStatsDtype && stats.dim() == 2 &&
                      stats.size(0) == p.anchors() && stats.size(1) == kStatsColumns &&
                      stats.is_contiguous(),
                  "modan_ext: stats must be the contiguous float64 [Ma, 5] statistics from "
                  "supcon_fwd");
}

}  // namespace modan_ext
