// The positive weight w_ab of a pair of rows inside the fused kernels: a float decision from
// the row records, and the exact decision of supcon_pair.h for near-ties (tabulated per call
// for <= 64 labels by tie_table_kernel).
#pragma once

#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "cuda/row_records.cuh"
#include "supcon_pair.h"

namespace modan_ext {
namespace cuda_impl {

// The exact decision and weight, in double, by the shared definition (rare: near-ties only).
// With <= 64 labels the decisions are tabulated once per call (tie_table_kernel) instead, which
// keeps double-precision division out of the hot kernels.
constexpr int kTieDim = 65;  // label counts 0..64
constexpr int kTieWords = (kTieDim * kTieDim * kTieDim + 31) / 32;

__global__ void tie_table_kernel(uint32_t* bits, double thr, int weighting) {
  const int word = blockIdx.x * blockDim.x + threadIdx.x;
  if (word >= kTieWords) return;
  uint32_t v = 0u;
  for (int b = 0; b < 32; ++b) {
    const int idx = word * 32 + b;
    if (idx >= kTieDim * kTieDim * kTieDim) break;
    const int ni = idx / (kTieDim * kTieDim), nj = (idx / kTieDim) % kTieDim, na = idx % kTieDim;
    if (na > ni || na > nj) continue;
    const double sim = label_similarity(weighting, na, ni, nj);
    if (positive_weight(sim, thr, weighting) > 0.0) v |= 1u << b;
  }
  bits[word] = v;
}

template <int LM>
__device__ __forceinline__ int pair_nand(const Params& p, const RowReg& r, const RowReg& c) {
  if constexpr (LM == kLGenN) {
    int nand = 0;
    if (r.img >= 0) {
      const int64_t* yi = p.labels + int64_t(r.img) * p.W;
      const int64_t* yj = p.labels + int64_t(c.img) * p.W;
      for (int64_t k = 0; k < p.W; ++k)
        nand += __popcll(static_cast<unsigned long long>(__ldg(yi + k) & __ldg(yj + k)));
    }
    return nand;
  } else {
    return __popc(r.lo & c.lo) + __popc(r.hi & c.hi);
  }
}

// The float similarity: n∧ / den (2 ulp). NaN for 0/0 (two empty label sets): every test on it
// is then false.
template <int LM>
__device__ __forceinline__ float pair_sim(const Params& p, const RowReg& r, const RowReg& c,
                                          int nand) {
  const float fn = static_cast<float>(nand);
  float den;
  if constexpr (LM == kLJac1) {
    den = (r.n + c.n) - fn;
  } else {
    den = fmaf(p.wd, r.sq * c.sq, fmaf(p.wc, fminf(r.n, c.n), fmaf(p.wb, fn, p.wa * (r.n + c.n))));
  }
  return __fdividef(fn, den);
}

// w_ab for row a and column b (b != a, the caller masks the diagonal): 1 for another view of the
// same image, else the positive weight (0 for a negative), decided in float. `tie` is set when
// the similarity is within the band around the threshold: then pair_w_exact must decide.
template <int LM>
__device__ __forceinline__ float pair_w_fast(const Params& p, const RowReg& r, const RowReg& c,
                                             bool& tie) {
  const bool same = r.img == c.img;
  if constexpr (LM == kLCid) {
    tie = false;
    return same ? 1.f : ((r.lo == c.lo && r.hi == c.hi) ? p.cid_w : 0.f);
  } else {
    const int nand = pair_nand<LM>(p, r, c);
    const float sim = pair_sim<LM>(p, r, c, nand);
    const float diff = sim - p.thr_f;
    const float w = (diff >= 0.f && nand > 0) ? (p.binw ? 1.f : sim) : 0.f;
    tie = fabsf(diff) <= p.band && nand > 0 && !same;
    return same ? 1.f : w;
  }
}

// The same weight with the exact decision of supcon_pair.h (rare: near-ties only). With <= 64
// labels the decisions come from the per-call table (no double division in the hot kernels);
// the value is the float similarity, right to 2 ulp.
template <int LM>
__device__ __forceinline__ float pair_w_exact(const Params& p, const RowReg& r, const RowReg& c) {
  if (r.img == c.img) return 1.f;
  const int nand = pair_nand<LM>(p, r, c);
  if (nand == 0) return 0.f;
  if constexpr (LM == kLGenN) {
    const double sim = label_similarity(p.weighting, nand, static_cast<int>(r.n),
                                        static_cast<int>(c.n));
    return static_cast<float>(positive_weight(sim, p.thr, p.weighting));
  } else {
    const int idx = (static_cast<int>(r.n) * kTieDim + static_cast<int>(c.n)) * kTieDim + nand;
    const bool pos = (__ldg(p.ties + (idx >> 5)) >> (idx & 31)) & 1u;
    return pos ? (p.binw ? 1.f : pair_sim<LM>(p, r, c, nand)) : 0.f;
  }
}

// Weights of one sub-tile, in the accumulator layout: w[j][2i+e] = w(row i, column 8j+2t+e).
// With an even number of views, columns 2t and 2t+1 are views of one image: one evaluation
// serves both (w[j][2i] holds it; the odd entries are not written).
template <int LM, int NJ, bool kPairs, bool kFull>
__device__ __forceinline__ void subtile_weights(float (&w)[NJ][4], const Params& p,
                                                const RowInfo* ci, int cbase,
                                                const RowReg (&rr)[2]) {
  bool anytie = false;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (kPairs && e == 1) continue;
      const RowReg c = col_rec<kFull>(ci + cbase + 8 * j + e);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        bool tie;
        w[j][2 * i + e] = pair_w_fast<LM>(p, rr[i], c, tie);
        anytie |= tie;
      }
    }
  }
  if constexpr (LM != kLCid) {
    if (__builtin_expect(anytie, 0)) {  // out of the hot path: redo the near-ties exactly
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (kPairs && e == 1) continue;
          const RowReg c = col_rec<kFull>(ci + cbase + 8 * j + e);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            bool tie;
            (void)pair_w_fast<LM>(p, rr[i], c, tie);
            if (tie) w[j][2 * i + e] = pair_w_exact<LM>(p, rr[i], c);
          }
        }
      }
    }
  }
}

}  // namespace cuda_impl
}  // namespace modan_ext
