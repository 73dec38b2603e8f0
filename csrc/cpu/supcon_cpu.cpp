// Fused CPU kernel of modan_ext::supcon_fwd / supcon_bwd: the op entry points and their
// registration (contract: ARCHITECTURE.md, "The op contract").
//
// The similarity matrix S = Z Zᵀ is streamed in square tiles of kTile rows. S and the label
// weights are symmetric, so a tile pair (I, J) with J > I serves the anchors of I (reducing along
// rows) and those of J (reducing along columns); pairs with J < I are skipped when J holds
// anchors. Forward: per-anchor online log-sum-exp, entropy, positive count, weight sum and
// weighted logit sum. Backward: recompute the tile, form H = G + Gᵀ on it, accumulate H Z_J into the gradient of
// block I and Hᵀ Z_I into that of block J. Tile pairs are split into one contiguous run per
// thread slot; each slot owns its accumulators (O(M) forward, O(M·D) backward), merged in a fixed
// order, so results do not depend on thread timing, and its scratch, sized by the problem and
// freed when the call returns. Never an M x M buffer.
//
// The kernel lives in the headers of this folder, one concern each, all parts of this one
// translation unit (internal linkage):
//   matmul.h         matrix products through ATen's mm via the stable ABI
//   tiles.h          blocks, tile pairs, thread slots, per-slot scratch, the logits of a tile
//   label_weights.h  the label-weight tile of a tile pair
//   simd.h           64-byte vectors, exp, the per-ISA clones of the hot loops
//   forward.h        the forward: online per-anchor statistics, loss
//   backward.h       the backward: H = G + Gᵀ per tile, the gradient (G + Gᵀ) Z
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "cpu/backward.h"
#include "cpu/forward.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Devices and dtypes; everything else is checked once for both backends (supcon_problem.h).
void check_cpu_tensors(const Tensor& features, const Tensor& labels) {
  STD_TORCH_CHECK(features.device().type() == torch::headeronly::DeviceType::CPU &&
                      labels.device().type() == torch::headeronly::DeviceType::CPU,
                  "modan_ext: the CPU kernel got a tensor on another device");
  STD_TORCH_CHECK(features.scalar_type() == ScalarType::Float ||
                      features.scalar_type() == ScalarType::Double,
                  "modan_ext: the CPU kernel takes float32 or float64 features");
}

template <typename T>
bool all_finite(const T* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

template <typename T>
void fill_nan(const Tensor& t) {
  T* d = t.mutable_data_ptr<T>();
  std::fill(d, d + t.numel(), std::numeric_limits<T>::quiet_NaN());
}

template <typename T>
void forward_or_nan(const Problem& p, const Tensor& features, const Tensor& labels,
                    const Tensor& loss, const Tensor& stats) {
  if (!all_finite(features.const_data_ptr<T>(), features.numel())) {
    fill_nan<T>(loss), fill_nan<double>(stats);  // non-finite input: NaN out, never a wrong number
    return;
  }
  forward<T>(p, features.const_data_ptr<T>(), labels.const_data_ptr<int64_t>(),
             loss.mutable_data_ptr<T>(), stats.mutable_data_ptr<double>());
}

template <typename T>
void backward_or_nan(const Problem& p, const Tensor& grad_loss, const Tensor& features,
                     const Tensor& labels, const Tensor& stats, const Tensor& grad) {
  if (!all_finite(features.const_data_ptr<T>(), features.numel()) ||
      !all_finite(stats.const_data_ptr<double>(), stats.numel())) {
    fill_nan<T>(grad);
    return;
  }
  backward<T>(p, grad_loss.const_data_ptr<T>(), features.const_data_ptr<T>(),
              labels.const_data_ptr<int64_t>(), stats.const_data_ptr<double>(),
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
  Tensor stats = torch::stable::new_empty(features, {p.anchors(), kStatsColumns}, kStatsDtype);
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
