// The per-row records (RowInfo): built once per call by prep_rows_kernel, read by the fused
// kernels into registers (row_reg from global memory, col_rec from a shared-memory tile).
#pragma once

#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "supcon_pair.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace cuda_impl {

struct RowReg {
  uint32_t lo, hi;
  int img;
  float n, sq, lse, ca, cb;
};

__device__ __forceinline__ RowReg row_reg(const RowInfo* info, int64_t r, bool ok) {
  RowReg q;
  if (ok) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(info + r));
    const float4 b = __ldg(reinterpret_cast<const float4*>(info + r) + 1);
    q.lo = a.x, q.hi = a.y, q.img = static_cast<int>(a.z), q.n = __uint_as_float(a.w);
    q.sq = b.x, q.lse = b.y, q.ca = b.z, q.cb = b.w;
  } else {
    q.lo = q.hi = 0u, q.img = -1, q.n = 0.f, q.sq = 0.f;
    q.lse = __int_as_float(0x7f800000), q.ca = 0.f, q.cb = 0.f;
  }
  return q;
}

// A column's record, read from shared memory (the second half only when needed).
template <bool kFull>
__device__ __forceinline__ RowReg col_rec(const RowInfo* ci) {
  RowReg c;
  const uint4 a = *reinterpret_cast<const uint4*>(ci);
  c.lo = a.x, c.hi = a.y, c.img = static_cast<int>(a.z), c.n = __uint_as_float(a.w);
  c.sq = c.lse = c.ca = c.cb = 0.f;
  if constexpr (kFull) {
    const float4 b = *(reinterpret_cast<const float4*>(ci) + 1);
    c.sq = b.x, c.lse = b.y, c.ca = b.z, c.cb = b.w;
  }
  return c;
}

struct PrepParams {
  const int64_t* labels;
  int64_t M, W, views, label_kind;
  int64_t abeg, aend;
  int fvo;
  RowInfo* info;
  // backward only (stats == nullptr: forward)
  const double* stats;  // [Ma, kStatsColumns]
  const float* grad_loss;
  double base_temperature;
  unsigned* cmax;
};

__global__ void prep_rows_kernel(const PrepParams q) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float cm = 0.f;
  if (r < q.M) {
    const int64_t img = r / q.views;
    RowInfo ri;
    ri.img = static_cast<int32_t>(img);
    ri.lo = ri.hi = 0u;
    ri.n = 0.f;
    if (q.label_kind == kClassIds) {
      const uint64_t id = static_cast<uint64_t>(q.labels[img]);
      ri.lo = static_cast<uint32_t>(id), ri.hi = static_cast<uint32_t>(id >> 32);
    } else if (q.W == 1) {
      const uint64_t y = static_cast<uint64_t>(q.labels[img]);
      ri.lo = static_cast<uint32_t>(y), ri.hi = static_cast<uint32_t>(y >> 32);
      ri.n = static_cast<float>(__popcll(y));
    } else {
      int n = 0;
      for (int64_t k = 0; k < q.W; ++k)
        n += __popcll(static_cast<unsigned long long>(q.labels[img * q.W + k]));
      ri.n = static_cast<float>(n);
    }
    ri.sq = __fsqrt_rn(ri.n);
    ri.lse = __int_as_float(0x7f800000);
    ri.ca = ri.cb = 0.f;
    // is_anchor (supcon_problem.h) written out: the call compiles to other, equivalent machine
    // code here, which would need a GPU run to re-validate (csrc/cuda/sass_fingerprint.txt).
    if (q.stats != nullptr && r >= q.abeg && r < q.aend && (!q.fvo || r % q.views == 0)) {
      const double* st = q.stats + kStatsColumns * (r - q.abeg);
      if (st[kCount] > 0.0) {
        const double coef = double(q.grad_loss[r - q.abeg]) / (q.base_temperature * st[kNorm]);
        // lse = lse_hi + lse_lo: the kernels take exp(x − lse_hi) (float32), and
        // exp(−lse_lo) is folded into ca here, in double, so lse is never rounded to float32.
        const float lse_hi = __double2float_rn(st[kLse]);
        ri.cb = static_cast<float>(coef);
        ri.ca = static_cast<float>(coef * st[kOmega] * exp(double(lse_hi) - st[kLse]));
        ri.lse = lse_hi;
        cm = fabsf(ri.ca) + fabsf(ri.cb);
      }
    }
    q.info[r] = ri;
  }
  if (q.cmax != nullptr) {
    // max is exact and order-free: an integer atomic on the (non-negative) float bits.
    unsigned bits = __float_as_uint(cm);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const unsigned o = __shfl_xor_sync(0xffffffffu, bits, off);
      bits = o > bits ? o : bits;
    }
    if ((threadIdx.x & 31) == 0 && bits != 0u) atomicMax(q.cmax, bits);
  }
}

}  // namespace cuda_impl
}  // namespace modan_ext
