// Host-side launches of every kernel on the current stream, and the dispatch of the fused
// kernels over their template instances (compute mode x label mode).
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <atomic>
#include <cstdint>

#include "cuda/backward.cuh"
#include "cuda/float64.cuh"
#include "cuda/forward.cuh"
#include "cuda/kernel_args.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/label_weights.cuh"
#include "cuda/nonfinite.cuh"
#include "cuda/row_records.cuh"
#include "cuda/workspace.cuh"

namespace modan_ext {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline cudaStream_t current_stream(int32_t device) {
  void* s = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &s) == AOTI_TORCH_SUCCESS,
                  "modan_ext: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(s);
}

inline int blocks_for(int64_t n, int threads, int64_t cap = 4096) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<int>(b < cap ? b : cap);
}

// flag |= non-finite(x) for n contiguous elements of type U (exponent mask kExp); by 16-byte
// vectors when the memory allows.
template <typename U, U kExp>
void scan_finite_as(const void* x, int64_t n, int* flag, cudaStream_t stream) {
  const int threads = 256;
  const int64_t bytes = n * int64_t(sizeof(U));
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && bytes % 16 == 0) {
    finite_scan_vec_kernel<U, kExp><<<blocks_for(bytes / 16, threads, 2048), threads, 0, stream>>>(
        static_cast<const uint4*>(x), bytes / 16, flag);
  } else {
    finite_scan_kernel<U, kExp><<<blocks_for(n, threads, 2048), threads, 0, stream>>>(
        static_cast<const U*>(x), n, flag);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// flag |= non-finite(tensor); the tensor is contiguous.
void scan_finite(const Tensor& x, int* flag, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const void* ptr = x.const_data_ptr();
  switch (x.scalar_type()) {
    case ScalarType::Double:
      return scan_finite_as<uint64_t, 0x7ff0000000000000ull>(ptr, n, flag, stream);
    case ScalarType::Float:
      return scan_finite_as<uint32_t, 0x7f800000u>(ptr, n, flag, stream);
    case ScalarType::Half:
      return scan_finite_as<uint16_t, uint16_t(0x7c00)>(ptr, n, flag, stream);
    default:  // BFloat16
      return scan_finite_as<uint16_t, uint16_t(0x7f80)>(ptr, n, flag, stream);
  }
}

template <typename U>
void nan_fill_as(void* x, int64_t n, U nan_bits, const int* flag, cudaStream_t stream) {
  const int threads = 256;
  nan_fill_kernel<U><<<blocks_for(n, threads, 1024), threads, 0, stream>>>(static_cast<U*>(x), n,
                                                                           nan_bits, flag);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// Every entry of the (contiguous) tensor := NaN when *flag is set (read on the device).
void nan_fill(const Tensor& x, const int* flag, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  void* ptr = x.mutable_data_ptr();
  switch (x.scalar_type()) {
    case ScalarType::Double:
      return nan_fill_as<uint64_t>(ptr, n, 0x7ff8000000000000ull, flag, stream);
    case ScalarType::Float:
      return nan_fill_as<uint32_t>(ptr, n, 0x7fc00000u, flag, stream);
    case ScalarType::Half:
      return nan_fill_as<uint16_t>(ptr, n, uint16_t(0x7e00), flag, stream);
    default:  // BFloat16
      return nan_fill_as<uint16_t>(ptr, n, uint16_t(0x7fc0), flag, stream);
  }
}

// cudaFuncSetAttribute is per device: remember, per kernel instantiation (`done` is a distinct
// static in each caller), the devices it was set on.
template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes, int32_t device, std::atomic<uint64_t> (&done)[4]) {
  const uint64_t bit = uint64_t(1) << (device & 63);
  auto& word = done[(device >> 6) & 3];
  if (word.load(std::memory_order_relaxed) & bit) return;
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  word.fetch_or(bit, std::memory_order_relaxed);
}

// One fused kernel instance: forward, a block per 64 anchors; backward, a block per 64 rows and
// DK-column chunk of the gradient.
template <bool kFwd, int MODE, int LM>
void launch_fused(const Params& k, int32_t device, cudaStream_t stream) {
  const size_t smem = Layout<typename Traits<MODE>::S>::kSmemBytes;
  auto kernel = kFwd ? supcon_fwd_kernel<MODE, LM> : supcon_bwd_kernel<MODE, LM>;
  static std::atomic<uint64_t> done[4]{};
  set_smem(kernel, smem, device, done);
  const dim3 grid = kFwd ? dim3(static_cast<unsigned>((k.na + BM - 1) / BM))
                         : dim3(static_cast<unsigned>((k.M + BM - 1) / BM),
                                static_cast<unsigned>(k.nk));
  kernel<<<grid, NT, smem, stream>>>(k);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kFwd, int MODE>
void dispatch_labels(int lm, const Params& k, int32_t device, cudaStream_t stream) {
  switch (lm) {
    case kLCid: return launch_fused<kFwd, MODE, kLCid>(k, device, stream);
    case kLJac1: return launch_fused<kFwd, MODE, kLJac1>(k, device, stream);
    case kLGen1: return launch_fused<kFwd, MODE, kLGen1>(k, device, stream);
    default: return launch_fused<kFwd, MODE, kLGenN>(k, device, stream);
  }
}

template <bool kFwd>
void dispatch(int mode, int lm, const Params& k, int32_t device, cudaStream_t stream) {
  switch (mode) {
    case kTF32: return dispatch_labels<kFwd, kTF32>(lm, k, device, stream);
    case kTF32x3: return dispatch_labels<kFwd, kTF32x3>(lm, k, device, stream);
    case kF16: return dispatch_labels<kFwd, kF16>(lm, k, device, stream);
    default: return dispatch_labels<kFwd, kBF16>(lm, k, device, stream);
  }
}

void prep_rows(const Problem& p, const Tensor& labels, RowInfo* info, const double* stats,
               const float* grad_loss, unsigned* cmax, cudaStream_t stream) {
  PrepParams q{};
  q.labels = static_cast<const int64_t*>(labels.const_data_ptr());
  q.M = p.rows, q.W = p.words, q.views = p.views, q.label_kind = p.label_kind;
  q.abeg = p.anchor_begin, q.aend = p.anchor_end, q.fvo = p.first_view_only ? 1 : 0;
  q.info = info;
  q.stats = stats, q.grad_loss = grad_loss;
  q.base_temperature = p.base_temperature;
  q.cmax = cmax;
  const int threads = 256;
  prep_rows_kernel<<<static_cast<unsigned>((p.rows + threads - 1) / threads), threads, 0,
                     stream>>>(q);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_counts64(const Problem& p, const Tensor& labels, int32_t* counts,
                     cudaStream_t stream) {
  if (p.images == 0) return;
  counts64_kernel<<<static_cast<unsigned>((p.images + 255) / 256), 256, 0, stream>>>(
      static_cast<const int64_t*>(labels.const_data_ptr()), p.images, p.words, counts);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fwd64(const Params64& k, cudaStream_t stream) {
  const int threads = 128;  // a warp per anchor
  supcon_fwd64_kernel<<<static_cast<unsigned>((k.na * 32 + threads - 1) / threads), threads, 0,
                        stream>>>(k);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// coef [M, 3] = (lse or +inf, ca, cb) per row, from the forward's stats and grad_loss.
void launch_coef64(const Problem& p, const Tensor& stats, const Tensor& grad_loss, double* coef,
                   cudaStream_t stream) {
  coef64_kernel<<<static_cast<unsigned>((p.rows + 255) / 256), 256, 0, stream>>>(
      static_cast<const double*>(stats.const_data_ptr()),
      static_cast<const double*>(grad_loss.const_data_ptr()), p.rows, p.anchor_begin,
      p.anchor_end, p.views, p.first_view_only ? 1 : 0, p.base_temperature, coef);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd64(const Params64& k, cudaStream_t stream) {
  supcon_bwd64_kernel<<<static_cast<unsigned>((k.M + kWarps64 - 1) / kWarps64), 32 * kWarps64, 0,
                        stream>>>(k);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

const uint32_t* tie_table(const Problem& p, const Workspace& ws, cudaStream_t stream) {
  if (!uses_ties(p)) return nullptr;
  uint32_t* bits = reinterpret_cast<uint32_t*>(static_cast<unsigned char*>(ws.body()) +
                                               p.rows * int64_t(sizeof(RowInfo)));
  tie_table_kernel<<<(kTieWords + 255) / 256, 256, 0, stream>>>(bits, p.threshold,
                                                                static_cast<int>(p.weighting));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

}  // namespace cuda_impl
}  // namespace modan_ext
