// Fused CUDA kernel of modan_ext::supcon_fwd / supcon_bwd: the op entry points and their
// registration (contract and math: ARCHITECTURE.md, "The op contract"). LibTorch Stable ABI
// only; one build serves torch >= 2.11.
//
// The kernels live in the headers of this folder, one concern each, and compile in this one
// translation unit (csrc/cuda/sass_fingerprint.txt records their machine code):
//   kernel_traits.cuh  tiling, compute / label modes, row record, shared layout, Params
//   ptx.cuh            cp.async, ldmatrix, mma.sync wrappers, TF32 / 16-bit splits
//   tile_loads.cuh     feature tiles and row-record tiles into shared memory
//   row_records.cuh    the per-row records: prep_rows_kernel builds them, the kernels read them
//   label_weights.cuh  w_ab from the records, exact near-tie decisions (tie_table_kernel)
//   similarity.cuh     one sub-tile of S = Z Zᵀ on the tensor cores, the logit s / T
//   forward.cuh        supcon_fwd_kernel
//   backward.cuh       supcon_bwd_kernel
//   nonfinite.cuh      the NaN/Inf scan and the NaN fill
//   float64.cuh        the float64 FMA path
//   workspace.cuh, kernel_args.cuh, launch.cuh   host side: scratch memory, parameters, launches
//
// Design (see also the comments at each kernel):
// * Two streaming passes over tiles of S = Z Zᵀ, never an M x M buffer. Extra memory: one
//   32-byte record per row (labels, counts, per-row backward coefficients), 256 bytes of flags and
//   a 34 KiB tie table (<= 64 labels); the backward's output is the gradient itself.
// * Row-owner scheduling, no floating-point atomics anywhere: a block owns BM = 64 rows (4 warps x
//   16 rows) and loops over all column tiles of BN = 64 in a fixed order. Forward: a warp owns its
//   16 rows' statistics (online log-sum-exp and entropy, positive count, weight sum, Σ w·x) over
//   every column;
//   the 4 lanes of a quad that share a row are merged once at the end with a fixed butterfly.
//   Backward: grad = H Z with H = G + Gᵀ, H_ab built from s_ab and the statistics of *both* rows
//   (H_ab = ca_a p_ab + ca_b p_ba − (cb_a + cb_b) w_ab), so one pass over row tiles gives the whole
//   gradient with one S recomputation; a row tile without anchors visits only the column tiles
//   of the anchor range. Same input -> bit-identical output.
// * D <= 128: the block's rows stay in shared memory and column tiles stream through a double
//   buffer; D > 128: D is streamed in chunks of 128 (the backward splits the output columns over
//   blockIdx.y and recomputes S per chunk).
// * Tensor cores through mma.sync: float32 -> TF32 (allow_tf32) or 3xTF32 (big + small split,
//   float32-FMA accuracy); float16/bfloat16 -> m16n8k16 with float32 accumulation; the H Z
//   product keeps H at float32 accuracy (3xTF32, or an hi+lo split for 16-bit). float64 runs on a
//   plain FMA path (gradcheck). All reductions accumulate in float32 (float64 for float64).
// * Consistency: the backward recomputes every logit x_ab = RN(s_ab / T) bit-identically to the
//   forward (same tile code, same k order, and a 3xTF32 that is symmetric in a <-> b), so that
//   exp(x_ab − lse_a) is exactly the forward's p_ab even at |z| ~ 1e3 where one ulp of x is ~1.
//   lse itself leaves the forward in float64 (op contract v2) and reaches the backward as a
//   float32 lse_hi plus exp(−lse_lo) folded into the row's coefficient, never rounded.
// * Label weights: per pair popcounts on the packed words, a float similarity, and the exact
//   double-precision decision of supcon_pair.h whenever the float is within 1e-5 (relative) of
//   the threshold (ties such as 1/3 vs 1/3 decide exactly as the reference): tabulated per call
//   for <= 64 labels, computed in place for more. With an even number of views, the two columns
//   a lane holds belong to one image and share one evaluation.
// * Non-finite features (or statistics): a scan sets a flag; the kernels then return at once and
//   every output entry is set to NaN.
#include <Python.h>  // first, as Python asks: the `_cuda` module stub at the end of this file

#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <tuple>

#include "cuda/float64.cuh"
#include "cuda/kernel_args.cuh"
#include "cuda/launch.cuh"
#include "cuda/workspace.cuh"
#include "supcon_problem.h"

namespace modan_ext {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The CUDA kernel's own checks (devices, dtypes, sizes); the op contract's are in
// supcon_problem.h.
void check_cuda_tensors(const Tensor& features, const Tensor& labels) {
  STD_TORCH_CHECK(features.is_cuda(), "modan_ext: the CUDA kernel got features on another device");
  STD_TORCH_CHECK(labels.is_cuda(), "modan_ext: the CUDA kernel got labels on another device");
  STD_TORCH_CHECK(labels.get_device_index() == features.get_device_index(),
                  "modan_ext: features and labels must be on the same CUDA device");
  const ScalarType dt = features.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double || dt == ScalarType::Half ||
                      dt == ScalarType::BFloat16,
                  "modan_ext: the CUDA kernel takes float32, float64, float16 or bfloat16 "
                  "features");
}

void check_cuda_size(const Problem& p) {
  STD_TORCH_CHECK(p.rows < (int64_t(1) << 31) - BN,
                  "modan_ext: the CUDA kernel takes fewer than 2^31 rows");
}

std::tuple<Tensor, Tensor> supcon_fwd_cuda(Tensor features, Tensor labels, int64_t label_kind,
                                           int64_t views, int64_t anchor_begin,
                                           int64_t anchor_end, bool first_view_only,
                                           double temperature, double base_temperature,
                                           double threshold, int64_t weighting,
                                           int64_t normalization, bool allow_tf32) {
  check_cuda_tensors(features, labels);
  const Problem p = check_problem(features, labels, label_kind, views, anchor_begin, anchor_end,
                                  first_view_only, temperature, base_temperature, threshold,
                                  weighting, normalization);
  check_cuda_size(p);
  const int32_t device = features.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t Ma = p.anchors();
  Tensor loss = torch::stable::new_empty(features, {Ma}, loss_dtype(p.dtype));
  Tensor stats = torch::stable::new_empty(features, {Ma, kStatsColumns}, kStatsDtype);
  if (Ma == 0) return {loss, stats};
  const cudaStream_t stream = current_stream(device);
  const size_t os = p.dtype == ScalarType::Double ? 8 : 4;
  STD_CUDA_CHECK(cudaMemsetAsync(loss.mutable_data_ptr(), 0, Ma * os, stream));
  STD_CUDA_CHECK(cudaMemsetAsync(stats.mutable_data_ptr(), 0, Ma * kStatsColumns * 8, stream));
  int64_t a_first, a_step, na;
  anchor_list(p, a_first, a_step, na);

  if (p.dtype == ScalarType::Double) {
    Workspace ws = make_workspace(features, round_up(p.images * 4, 16), stream);
    scan_finite(features, ws.flag(), stream);
    int32_t* counts = static_cast<int32_t*>(ws.body());
    launch_counts64(p, labels, counts, stream);
    Params64 k = params64(p, features, labels, counts, ws);
    k.a_first = a_first, k.a_step = a_step, k.na = na;
    k.loss = static_cast<double*>(loss.mutable_data_ptr());
    k.stats = static_cast<double*>(stats.mutable_data_ptr());
    if (na > 0) launch_fwd64(k, stream);
    nan_fill(loss, ws.flag(), stream);
    nan_fill(stats, ws.flag(), stream);
    return {loss, stats};
  }

  Workspace ws = make_workspace(features, body_bytes(p), stream);
  scan_finite(features, ws.flag(), stream);
  RowInfo* info = static_cast<RowInfo*>(ws.body());
  prep_rows(p, labels, info, nullptr, nullptr, nullptr, stream);
  Params k = base_params(p, features, labels, info, ws);
  k.ties = tie_table(p, ws, stream);
  k.a_first = a_first, k.a_step = a_step, k.na = na;
  k.loss = static_cast<float*>(loss.mutable_data_ptr());
  k.stats = static_cast<double*>(stats.mutable_data_ptr());
  if (na > 0) dispatch<true>(mode_of(p.dtype, allow_tf32), label_mode_of(p), k, device, stream);
  nan_fill(loss, ws.flag(), stream);
  nan_fill(stats, ws.flag(), stream);
  return {loss, stats};
}

Tensor supcon_bwd_cuda(Tensor grad_loss, Tensor features, Tensor labels, Tensor stats,
                       int64_t label_kind, int64_t views, int64_t anchor_begin,
                       int64_t anchor_end, bool first_view_only, double temperature,
                       double base_temperature, double threshold, int64_t weighting,
                       int64_t normalization, bool allow_tf32) {
  check_cuda_tensors(features, labels);
  const Problem p = check_problem(features, labels, label_kind, views, anchor_begin, anchor_end,
                                  first_view_only, temperature, base_temperature, threshold,
                                  weighting, normalization);
  check_cuda_size(p);
  check_backward(p, features, grad_loss, stats);
  const int64_t Ma = p.anchors();
  const int32_t device = features.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor grad = torch::stable::new_empty(features, {p.rows, p.dim}, p.dtype);
  if (p.rows == 0 || p.dim == 0) return grad;
  const cudaStream_t stream = current_stream(device);

  if (p.dtype == ScalarType::Double) {
    const int64_t counts_bytes = round_up(p.images * 4, 16);
    Workspace ws = make_workspace(features, counts_bytes + p.rows * 3 * 8, stream);
    scan_finite(features, ws.flag(), stream);
    scan_finite(stats, ws.flag(), stream);
    double* grad_ptr = static_cast<double*>(grad.mutable_data_ptr());
    if (Ma == 0) {
      STD_CUDA_CHECK(cudaMemsetAsync(grad_ptr, 0, p.rows * p.dim * 8, stream));
    } else {
      int32_t* counts = static_cast<int32_t*>(ws.body());
      double* coef =
          reinterpret_cast<double*>(static_cast<unsigned char*>(ws.body()) + counts_bytes);
      launch_counts64(p, labels, counts, stream);
      launch_coef64(p, stats, grad_loss, coef, stream);
      Params64 k = params64(p, features, labels, counts, ws);
      k.coef = coef;
      k.grad = grad_ptr;
      launch_bwd64(k, stream);
    }
    nan_fill(grad, ws.flag(), stream);
    return grad;
  }

  Workspace ws = make_workspace(features, body_bytes(p), stream);
  scan_finite(features, ws.flag(), stream);
  scan_finite(stats, ws.flag(), stream);
  if (Ma == 0) {
    STD_CUDA_CHECK(cudaMemsetAsync(grad.mutable_data_ptr(), 0,
                                   p.rows * p.dim * features.element_size(), stream));
  } else {
    RowInfo* info = static_cast<RowInfo*>(ws.body());
    prep_rows(p, labels, info, static_cast<const double*>(stats.const_data_ptr()),
              static_cast<const float*>(grad_loss.const_data_ptr()), ws.cmax(), stream);
    Params k = base_params(p, features, labels, info, ws);
    k.ties = tie_table(p, ws, stream);
    k.grad = grad.mutable_data_ptr();
    dispatch<false>(mode_of(p.dtype, allow_tf32), label_mode_of(p), k, device, stream);
  }
  nan_fill(grad, ws.flag(), stream);
  return grad;
}

}  // namespace cuda_impl
}  // namespace modan_ext

// `import modan_ext._cuda` (modan_ext/ops.py) loads this library, which runs the registration
// below; the schemas live in the `_C` library (csrc/supcon.cpp).
extern "C" {
PyMODINIT_FUNC PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY_IMPL(modan_ext, CUDA, m) {
  m.impl("supcon_fwd", TORCH_BOX(&modan_ext::cuda_impl::supcon_fwd_cuda));
  m.impl("supcon_bwd", TORCH_BOX(&modan_ext::cuda_impl::supcon_bwd_cuda));
}
