// One sub-tile of S = Z Zᵀ on the tensor cores (the warp's 16 rows x 8·NJ columns), and the
// logit x = s / T that the forward and the backward both take from it.
#pragma once

#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "cuda/ptx.cuh"
#include "cuda/tile_loads.cuh"

namespace modan_ext {
namespace cuda_impl {

template <int MODE>
constexpr int kAcc = MODE == kTF32x3 ? 3 : 1;

// acc += A(warp's 16 rows, k < kmax) · B(rows 8NJ·h .. 8NJ·h + 8NJ − 1)ᵀ. For 3xTF32,
// acc[0] = big·big, acc[1] = a_big·b_small, acc[2] = a_small·b_big: exchanging a and b
// exchanges acc[1] and acc[2] and nothing else, so s = acc[0] + (acc[1] + acc[2]) is
// bit-symmetric (the backward relies on it).
template <int MODE, int NJ>
__device__ __forceinline__ void mma_chunk(float (&acc)[kAcc<MODE>][NJ][4],
                                          const typename Traits<MODE>::S* As,
                                          const typename Traits<MODE>::S* Bs, int warp, int lane,
                                          int h, int kmax) {
  using S = typename Traits<MODE>::S;
  constexpr int STR = Layout<S>::STR;
  const int mi = lane >> 3, r8 = lane & 7;
  if constexpr (!Traits<MODE>::kHalf) {
    const S* pa = As + (warp * 16 + (lane & 15)) * STR + (lane >> 4) * 4;
    const S* pb = Bs + (h * 8 * NJ + (mi >> 1) * 8 + r8) * STR + (mi & 1) * 4;
#pragma unroll 2
    for (int k0 = 0; k0 < kmax; k0 += 8) {
      uint32_t a[4], b[NJ / 2][4];
      ldsm_x4(a, pa + k0);
#pragma unroll
      for (int jp = 0; jp < NJ / 2; ++jp) ldsm_x4(b[jp], pb + jp * 16 * STR + k0);
      if constexpr (MODE == kTF32x3) {
        uint32_t ab[4], as[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) split_tf32(__uint_as_float(a[i]), ab[i], as[i]);
#pragma unroll
        for (int jp = 0; jp < NJ / 2; ++jp) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            uint32_t bb0, bs0, bb1, bs1;
            split_tf32(__uint_as_float(b[jp][2 * q]), bb0, bs0);
            split_tf32(__uint_as_float(b[jp][2 * q + 1]), bb1, bs1);
            const int j = 2 * jp + q;
            mma_tf32(acc[1][j], ab[0], ab[1], ab[2], ab[3], bs0, bs1);
            mma_tf32(acc[2][j], as[0], as[1], as[2], as[3], bb0, bb1);
            mma_tf32(acc[0][j], ab[0], ab[1], ab[2], ab[3], bb0, bb1);
          }
        }
      } else {  // TF32: the raw float32 bits (the tensor core ignores the low mantissa bits)
#pragma unroll
        for (int jp = 0; jp < NJ / 2; ++jp)
#pragma unroll
          for (int q = 0; q < 2; ++q)
            mma_tf32(acc[0][2 * jp + q], a[0], a[1], a[2], a[3], b[jp][2 * q], b[jp][2 * q + 1]);
      }
    }
  } else {
    const S* pa = As + (warp * 16 + (lane & 15)) * STR + (lane >> 4) * 8;
    const S* pb = Bs + (h * 8 * NJ + (mi >> 1) * 8 + r8) * STR + (mi & 1) * 8;
#pragma unroll 2
    for (int k0 = 0; k0 < kmax; k0 += 16) {
      uint32_t a[4], b[NJ / 2][4];
      ldsm_x4(a, pa + k0);
#pragma unroll
      for (int jp = 0; jp < NJ / 2; ++jp) ldsm_x4(b[jp], pb + jp * 16 * STR + k0);
#pragma unroll
      for (int jp = 0; jp < NJ / 2; ++jp)
#pragma unroll
        for (int q = 0; q < 2; ++q)
          mma_k16<MODE>(acc[0][2 * jp + q], a, b[jp][2 * q], b[jp][2 * q + 1]);
    }
  }
}

__device__ __forceinline__ int chunk_kmax(int64_t D, int kc, int kstep) {
  const int64_t rem = D - int64_t(kc) * DK;
  const int k = static_cast<int>(rem < DK ? rem : DK);
  return (k + kstep - 1) / kstep * kstep;
}

// s = sub-tile h (the warp's 16 rows x 8NJ columns) of column tile `c`. With nk == 1 the whole
// feature rows are already in As / Bs; with nk > 1 the D chunks are streamed through As / B0.
template <int MODE, int NJ>
__device__ __forceinline__ void similarity_sub(
    float (&s)[NJ][4], const Params& p, typename Traits<MODE>::S* As,
    const typename Traits<MODE>::S* Bs, typename Traits<MODE>::S* B0, int64_t arow0,
    int64_t astep, int avalid, int64_t c0, int cvalid, int warp, int lane, int h) {
  using S = typename Traits<MODE>::S;
  float acc[kAcc<MODE>][NJ][4];
#pragma unroll
  for (int i = 0; i < kAcc<MODE>; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const S* z = static_cast<const S*>(p.z);
  if (p.nk == 1) {
    mma_chunk<MODE, NJ>(acc, As, Bs, warp, lane, h, chunk_kmax(p.D, 0, Traits<MODE>::KSTEP));
  } else {
    for (int kc = 0; kc < p.nk; ++kc) {
      __syncthreads();  // the previous chunk (or half, or tile) is no longer read
      load_rows<S>(As, z, p.D, arow0, astep, avalid, int64_t(kc) * DK, p.vec);
      load_rows<S>(B0, z, p.D, c0, 1, cvalid, int64_t(kc) * DK, p.vec);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      mma_chunk<MODE, NJ>(acc, As, B0, warp, lane, h, chunk_kmax(p.D, kc, Traits<MODE>::KSTEP));
    }
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (MODE == kTF32x3)
        s[j][e] = acc[0][j][e] + (acc[1][j][e] + acc[2][j][e]);
      else
        s[j][e] = acc[0][j][e];
    }
}

// x = RN(s / T) as RN(s * (1/T)), never fused with what follows (fast-math lets nvcc contract
// x - lse into one FMA, which would round differently from the forward's max at large |x|):
// forward and backward see the very same x, so exp(x_ab − lse_a) <= 1 and equals 1 at the max.
__device__ __forceinline__ float logit(float s, float inv_t) { return __fmul_rn(s, inv_t); }

}  // namespace cuda_impl
}  // namespace modan_ext
