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

// flag |= non-finite(tensor); the tensor is contiguous.
void scan_finite(const Tensor& x, int* flag, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const void* ptr = x.const_data_ptr();
  const size_t es = x.element_size();
  const bool aligned = (reinterpret_cast<uintptr_t>(ptr) % 16) == 0 && (n * es) % 16 == 0;
  const int threads = 256;
  if (aligned) {
    const int64_t n16 = n * es / 16;
    const int blocks = blocks_for(n16, threads, 2048);
    const uint4* v = static_cast<const uint4*>(ptr);
    if (es == 8)
      finite_scan_vec_kernel<uint64_t, 0x7ff0000000000000ull>
          <<<blocks, threads, 0, stream>>>(v, n16, flag);
    else if (es == 4)
      finite_scan_vec_kernel<uint32_t, 0x7f800000u><<<blocks, threads, 0, stream>>>(v, n16, flag);
    else if (x.scalar_type() == ScalarType::Half)
      finite_scan_vec_kernel<uint16_t, uint16_t(0x7c00)>
          <<<blocks, threads, 0, stream>>>(v, n16, flag);
    else
      finite_scan_vec_kernel<uint16_t, uint16_t(0x7f80)>
          <<<blocks, threads, 0, stream>>>(v, n16, flag);
  } else {
    const int blocks = blocks_for(n, threads, 2048);
    if (es == 8)
      finite_scan_kernel<uint64_t, 0x7ff0000000000000ull><<<blocks, threads, 0, stream>>>(
          static_cast<const uint64_t*>(ptr), n, flag);
    else if (es == 4)
      finite_scan_kernel<uint32_t, 0x7f800000u><<<blocks, threads, 0, stream>>>(
          static_cast<const uint32_t*>(ptr), n, flag);
    else if (x.scalar_type() == ScalarType::Half)
      finite_scan_kernel<uint16_t, uint16_t(0x7c00)><<<blocks, threads, 0, stream>>>(
          static_cast<const uint16_t*>(ptr), n, flag);
    else
      finite_scan_kernel<uint16_t, uint16_t(0x7f80)><<<blocks, threads, 0, stream>>>(
          static_cast<const uint16_t*>(ptr), n, flag);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void nan_fill(const Tensor& x, const int* flag, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const int threads = 256, blocks = blocks_for(n, threads, 1024);
  void* ptr = x.mutable_data_ptr();
  switch (x.scalar_type()) {
    case ScalarType::Double:
      nan_fill_kernel<uint64_t><<<blocks, threads, 0, stream>>>(
          static_cast<uint64_t*>(ptr), n, 0x7ff8000000000000ull, flag);
      break;
    case ScalarType::Float:
      nan_fill_kernel<uint32_t><<<blocks, threads, 0, stream>>>(static_cast<uint32_t*>(ptr), n,
                                                                0x7fc00000u, flag);
      break;
    case ScalarType::Half:
      nan_fill_kernel<uint16_t><<<blocks, threads, 0, stream>>>(static_cast<uint16_t*>(ptr), n,
                                                                uint16_t(0x7e00), flag);
      break;
    default:  // BFloat16
      nan_fill_kernel<uint16_t><<<blocks, threads, 0, stream>>>(static_cast<uint16_t*>(ptr), n,
                                                                uint16_t(0x7fc0), flag);
      break;
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
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

template <int MODE, int LM>
void launch_fwd(const Params& k, int32_t device, cudaStream_t stream) {
  using S = typename Traits<MODE>::S;
  const size_t smem = Layout<S>::kSmemBytes;
  auto kernel = supcon_fwd_kernel<MODE, LM>;
  static std::atomic<uint64_t> done[4]{};
  set_smem(kernel, smem, device, done);
  const dim3 grid(static_cast<unsigned>((k.na + BM - 1) / BM));
  kernel<<<grid, NT, smem, stream>>>(k);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int MODE, int LM>
void launch_bwd(const Params& k, int32_t device, cudaStream_t stream) {
  using S = typename Traits<MODE>::S;
  const size_t smem = Layout<S>::kSmemBytes;
  auto kernel = supcon_bwd_kernel<MODE, LM>;
  static std::atomic<uint64_t> done[4]{};
  set_smem(kernel, smem, device, done);
  const dim3 grid(static_cast<unsigned>((k.M + BM - 1) / BM), static_cast<unsigned>(k.nk));
  kernel<<<grid, NT, smem, stream>>>(k);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kFwd, int MODE>
void dispatch_labels(int lm, const Params& k, int32_t device, cudaStream_t stream) {
  switch (lm) {
    case kLCid: kFwd ? launch_fwd<MODE, kLCid>(k, device, stream)
                     : launch_bwd<MODE, kLCid>(k, device, stream); break;
    case kLJac1: kFwd ? launch_fwd<MODE, kLJac1>(k, device, stream)
                      : launch_bwd<MODE, kLJac1>(k, device, stream); break;
    case kLGen1: kFwd ? launch_fwd<MODE, kLGen1>(k, device, stream)
                      : launch_bwd<MODE, kLGen1>(k, device, stream); break;
    default: kFwd ? launch_fwd<MODE, kLGenN>(k, device, stream)
                  : launch_bwd<MODE, kLGenN>(k, device, stream); break;
  }
}

template <bool kFwd>
void dispatch(int mode, int lm, const Params& k, int32_t device, cudaStream_t stream) {
  switch (mode) {
    case kTF32: dispatch_labels<kFwd, kTF32>(lm, k, device, stream); break;
    case kTF32x3: dispatch_labels<kFwd, kTF32x3>(lm, k, device, stream); break;
    case kF16: dispatch_labels<kFwd, kF16>(lm, k, device, stream); break;
    default: dispatch_labels<kFwd, kBF16>(lm, k, device, stream); break;
  }
}

void prep_rows(const Problem& p, const Tensor& labels, RowInfo* info, const float* stats,
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
  prep_rows_kernel<<<static_cast<unsigned>((p.rows + threads - 1) / threads), threads, 0, stream>>>(q);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_counts64(const Problem& p, const Tensor& labels, int32_t* counts,
                     cudaStream_t stream) {
  if (p.images == 0) return;
  counts64_kernel<<<static_cast<unsigned>((p.images + 255) / 256), 256, 0, stream>>>(
      static_cast<const int64_t*>(labels.const_data_ptr()), p.images, p.words, counts);
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
