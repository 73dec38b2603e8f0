// The non-finite policy's kernels: a scan that flags NaN/Inf inputs, and the fill that then
// sets every output entry to NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace modan_ext {
namespace cuda_impl {

// flag |= 1 when any element is NaN/Inf (exponent bits all set: immune to fast-math).
template <typename U, U kExp>
__global__ void finite_scan_kernel(const U* x, int64_t n, int* flag) {
  bool bad = false;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    bad |= (x[i] & kExp) == kExp;
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(flag, 1);
}
// Same on 16-byte vectors (x 16-byte aligned, n16 vectors).
template <typename U, U kExp>
__global__ void finite_scan_vec_kernel(const uint4* x, int64_t n16, int* flag) {
  constexpr int kPer = 16 / sizeof(U);
  bool bad = false;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride) {
    const uint4 v = __ldg(x + i);
    U u[kPer];
    memcpy(u, &v, 16);
#pragma unroll
    for (int k = 0; k < kPer; ++k) bad |= (u[k] & kExp) == kExp;
  }
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(flag, 1);
}

template <typename U>
__global__ void nan_fill_kernel(U* x, int64_t n, U nan_bits, const int* flag) {
  if (*flag == 0) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = nan_bits;
}

}  // namespace cuda_impl
}  // namespace modan_ext
