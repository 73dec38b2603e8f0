// The backward kernel: grad = (G + Gᵀ) Z in one pass over the row tiles.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "cuda/label_weights.cuh"
#include "cuda/ptx.cuh"
#include "cuda/row_records.cuh"
#include "cuda/similarity.cuh"
#include "cuda/tile_loads.cuh"

namespace modan_ext {
namespace cuda_impl {

// Block: 64 contrast rows r0 .. r0+63 and feature columns [DK*y, DK*y + DK) of the gradient.
// For each column tile it recomputes S, turns it into H in registers (the layout of the S
// accumulators is the A-operand layout of the next product, up to a permutation of k that the
// B operand follows), and accumulates H Z_tile into 16 x 128 float32 accumulators per warp.

template <int MODE, int NJ>
__device__ __forceinline__ void hz_sub(float (&gacc)[16][4], const float (&hv)[NJ][4],
                                        const typename Traits<MODE>::S* Zs, int lane, int h,
                                        int ndt) {
  using S = typename Traits<MODE>::S;
  constexpr int STR = Layout<S>::STR;
  const int gq = lane >> 2, t = lane & 3;
  if constexpr (!Traits<MODE>::kHalf) {
    // k8 block kb = H columns 8kb..8kb+7 of the sub-tile; logical k slot t <-> column 2t, slot t+4
    // <-> column 2t+1, so a = (H[g][2t], H[g+8][2t], H[g][2t+1], H[g+8][2t+1]) and
    // b = (Z[2t][n], Z[2t+1][n]).
#pragma unroll
    for (int kb = 0; kb < NJ; ++kb) {
      const float* z0 = Zs + (h * 8 * NJ + kb * 8 + 2 * t) * STR + gq;
      if constexpr (MODE == kTF32x3) {
        uint32_t ab[4], as[4];
        split_tf32(hv[kb][0], ab[0], as[0]);
        split_tf32(hv[kb][2], ab[1], as[1]);
        split_tf32(hv[kb][1], ab[2], as[2]);
        split_tf32(hv[kb][3], ab[3], as[3]);
#pragma unroll
        for (int jg = 0; jg < 4; ++jg) {
          if (4 * jg >= ndt) break;  // past D: (zero-filled columns would only add zeros)
#pragma unroll
          for (int jd = 4 * jg; jd < 4 * jg + 4; ++jd) {
            uint32_t bb0, bs0, bb1, bs1;
            split_tf32(z0[jd * 8], bb0, bs0);
            split_tf32(z0[STR + jd * 8], bb1, bs1);
            mma_tf32(gacc[jd], as[0], as[1], as[2], as[3], bb0, bb1);
            mma_tf32(gacc[jd], ab[0], ab[1], ab[2], ab[3], bs0, bs1);
            mma_tf32(gacc[jd], ab[0], ab[1], ab[2], ab[3], bb0, bb1);
          }
        }
      } else {
        const uint32_t a0 = __float_as_uint(hv[kb][0]), a1 = __float_as_uint(hv[kb][2]);
        const uint32_t a2 = __float_as_uint(hv[kb][1]), a3 = __float_as_uint(hv[kb][3]);
#pragma unroll
        for (int jg = 0; jg < 4; ++jg) {
          if (4 * jg >= ndt) break;
#pragma unroll
          for (int jd = 4 * jg; jd < 4 * jg + 4; ++jd)
            mma_tf32(gacc[jd], a0, a1, a2, a3, __float_as_uint(z0[jd * 8]),
                     __float_as_uint(z0[STR + jd * 8]));
        }
      }
    }
  } else {
    const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int kb = 0; kb < NJ / 2; ++kb) {
      uint32_t hi[4], lo[4];
      pack_split<MODE>(hv[2 * kb][0], hv[2 * kb][1], hi[0], lo[0]);
      pack_split<MODE>(hv[2 * kb][2], hv[2 * kb][3], hi[1], lo[1]);
      pack_split<MODE>(hv[2 * kb + 1][0], hv[2 * kb + 1][1], hi[2], lo[2]);
      pack_split<MODE>(hv[2 * kb + 1][2], hv[2 * kb + 1][3], hi[3], lo[3]);
      const S* zp = Zs + (h * 8 * NJ + kb * 16 + (mi & 1) * 8 + r8) * STR + (mi >> 1) * 8;
#pragma unroll
      for (int jp = 0; jp < 8; ++jp) {
        if ((jp & 1) == 0 && 2 * jp >= ndt) break;  // groups of 4 n-tiles
        {
          uint32_t b[4];
          ldsm_x4_trans(b, zp + jp * 16);
          mma_k16<MODE>(gacc[2 * jp], lo, b[0], b[1]);
          mma_k16<MODE>(gacc[2 * jp], hi, b[0], b[1]);
          mma_k16<MODE>(gacc[2 * jp + 1], lo, b[2], b[3]);
          mma_k16<MODE>(gacc[2 * jp + 1], hi, b[2], b[3]);
        }
      }
    }
  }
}

template <int MODE>
__device__ __forceinline__ void store_pair(void* grad, int64_t idx, float v0, float v1,
                                           bool both, bool pair) {
  if constexpr (!Traits<MODE>::kHalf) {
    float* g = static_cast<float*>(grad) + idx;
    if (pair) {
      *reinterpret_cast<float2*>(g) = make_float2(v0, v1);
    } else {
      g[0] = v0;
      if (both) g[1] = v1;
    }
  } else if constexpr (MODE == kF16) {
    __half* g = static_cast<__half*>(grad) + idx;
    if (pair) {
      *reinterpret_cast<__half2*>(g) = __floats2half2_rn(v0, v1);
    } else {
      g[0] = __float2half_rn(v0);
      if (both) g[1] = __float2half_rn(v1);
    }
  } else {
    __nv_bfloat16* g = static_cast<__nv_bfloat16*>(grad) + idx;
    if (pair) {
      *reinterpret_cast<__nv_bfloat162*>(g) = __floats2bfloat162_rn(v0, v1);
    } else {
      g[0] = __float2bfloat16_rn(v0);
      if (both) g[1] = __float2bfloat16_rn(v1);
    }
  }
}

// Turns one sub-tile of raw S values into H (in place, times hscale):
// H_ab = ca_a exp(x − lse_a) + ca_b exp(x − lse_b) − (cb_a + cb_b) w_ab, 0 on the diagonal and
// past the last row. Rows without a coefficient have ca = cb = 0 and lse = +inf (exp -> 0).
template <int LM, int NJ, bool kPairs, bool kMask>
__device__ __forceinline__ void bwd_subtile(const Params& p, float (&s)[NJ][4],
                                            const RowInfo* ci, int cbase, int climit,
                                            const int (&rl)[2], const RowReg (&rr)[2],
                                            float hscale) {
  constexpr bool kFull = LM == kLGen1 || LM == kLGenN;  // the sqrt(n) field
  float w[NJ][4];
  subtile_weights<LM, NJ, kPairs, kFull>(w, p, ci, cbase, rr);
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int lc = cbase + 8 * j + e;
      const float4 cc = *(reinterpret_cast<const float4*>(ci + lc) + 1);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float x = logit(s[j][2 * i + e], p.inv_t);
        const float wv = w[j][2 * i + (kPairs ? 0 : e)];
        float hval = rr[i].ca * __expf(x - rr[i].lse) + cc.z * __expf(x - cc.y);
        hval = fmaf(-(rr[i].cb + cc.w), wv, hval);
        const bool valid = !kMask || (lc < climit && lc != rl[i]);
        s[j][2 * i + e] = valid ? hval * hscale : 0.f;
      }
    }
  }
}

template <int MODE, int LM>
__global__ void __launch_bounds__(NT, 2) supcon_bwd_kernel(const Params p) {
  using S = typename Traits<MODE>::S;
  using L = Layout<S>;
  // 8-column n-tiles per sub-tile: 3xTF32 holds three S accumulators next to the 64 gradient
  // accumulators, so it works on 16 columns at a time.
  constexpr int NJ = MODE == kTF32x3 ? 2 : 4;
  if (*p.flag) return;
  extern __shared__ __align__(16) unsigned char smem[];
  S* const As = reinterpret_cast<S*>(smem);
  S* const Bs0 = As + BM * L::STR;  // B buffer b: Bs0 + b * BM * L::STR
  RowInfo* const Ci0 = reinterpret_cast<RowInfo*>(As + 3 * BM * L::STR);  // Ci0 + b * BN

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int dchunk = blockIdx.y;
  const int rvalid = static_cast<int>(p.M - r0 < BM ? p.M - r0 : BM);

  int64_t row[2];
  bool rok[2];
  RowReg rr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int lr = warp * 16 + g + 8 * i;
    rok[i] = lr < rvalid;
    row[i] = r0 + lr;
    rr[i] = row_reg(p.info, row[i], rok[i]);
  }

  // Column tiles: all when this row tile holds an anchor (its G rows are dense), else only the
  // tiles of the anchor range (Gᵀ is zero off the anchor columns).
  bool has_anchor = false;
  {
    const int64_t lo = r0 > p.abeg ? r0 : p.abeg;
    const int64_t hi = (r0 + rvalid) < p.aend ? (r0 + rvalid) : p.aend;
    if (lo < hi) {
      if (!p.fvo) {
        has_anchor = true;
      } else {
        const int64_t f = (lo + p.views - 1) / p.views * p.views;
        has_anchor = f < hi;
      }
    }
  }
  const int ncol = static_cast<int>((p.M + BN - 1) / BN);
  const int cfirst = has_anchor ? 0 : static_cast<int>(p.abeg / BN);
  const int clast = has_anchor ? ncol : static_cast<int>((p.aend + BN - 1) / BN);

  // float16: scale H by a power of two so that |H| < 2^14 (no overflow, no early underflow).
  float hscale = 1.f, inv_scale = 1.f;
  if constexpr (MODE == kF16) {
    const float cmax = __uint_as_float(*p.cmax);
    if (cmax > 0.f && cmax < INFINITY) {
      const int e2 = static_cast<int>((__float_as_uint(2.f * cmax) >> 23) & 0xff) - 126;
      int e = 14 - e2;  // 2·cmax < 2^e2  ->  |H|·2^e < 2^14
      e = e < -100 ? -100 : (e > 100 ? 100 : e);
      hscale = __uint_as_float(uint32_t(e + 127) << 23);
      inv_scale = __uint_as_float(uint32_t(127 - e) << 23);
    }
  }

  const int64_t d0 = int64_t(dchunk) * DK;
  const int64_t drem = p.D - d0;
  const int ndt = static_cast<int>(((drem < DK ? drem : DK) + 7) / 8);  // 8-wide output tiles

  float gacc[16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) gacc[j][e] = 0.f;

  const S* z = static_cast<const S*>(p.z);
  const bool vec = p.vec != 0;
  const bool pairs = (p.views & 1) == 0;  // columns 2t, 2t+1 always share an image
  if (p.nk == 1 && cfirst < clast) {
    const int64_t c0 = int64_t(cfirst) * BN;
    const int nv = static_cast<int>(p.M - c0 < BN ? p.M - c0 : BN);
    load_rows<S>(As, z, p.D, r0, 1, rvalid, 0, vec);
    load_rows<S>(Bs0, z, p.D, c0, 1, nv, 0, vec);
    load_info(Ci0, p.info, c0, nv);
    cp_async_commit();
  }
  for (int c = cfirst; c < clast; ++c) {
    const int buf = p.nk == 1 ? ((c - cfirst) & 1) : 0;
    const int64_t c0 = int64_t(c) * BN;
    const int cvalid = static_cast<int>(p.M - c0 < BN ? p.M - c0 : BN);
    if (p.nk == 1) {
      if (c + 1 < clast)
        load_column_tile<S>(Bs0 + (buf ^ 1) * BM * L::STR, Ci0 + (buf ^ 1) * BN, z, p, c0 + BN,
                            vec);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
    } else {
      __syncthreads();
      load_info(Ci0, p.info, c0, cvalid);
      // Z of this tile, this block's D chunk, in the second B buffer.
      load_rows<S>(Bs0 + BM * L::STR, z, p.D, c0, 1, cvalid, d0, vec);
      cp_async_commit();
    }
    const RowInfo* ci = Ci0 + buf * BN;
    int rl[2];  // local column of each of this lane's rows in this tile, or -1
#pragma unroll
    for (int i = 0; i < 2; ++i) rl[i] = (row[i] >= c0 && row[i] < c0 + BN) ? int(row[i] - c0) : -1;
    const S* Zs = p.nk == 1 ? Bs0 + buf * BM * L::STR : (Bs0 + BM * L::STR);
    const S* const bt = Bs0 + buf * BM * L::STR;
#pragma unroll 1
    for (int h = 0; h < BN / (8 * NJ); ++h) {
      float s[NJ][4];
      similarity_sub<MODE, NJ>(s, p, As, bt, Bs0, r0, 1, rvalid, c0, cvalid, warp, lane, h);
      const int64_t cs = c0 + h * 8 * NJ;
      const bool masked = h * 8 * NJ + 8 * NJ > cvalid || (cs < r0 + rvalid && cs + 8 * NJ > r0);
      const int cbase = h * 8 * NJ + 2 * t;
      if (masked) {
        if (pairs)
          bwd_subtile<LM, NJ, true, true>(p, s, ci, cbase, cvalid, rl, rr, hscale);
        else
          bwd_subtile<LM, NJ, false, true>(p, s, ci, cbase, cvalid, rl, rr, hscale);
      } else {
        if (pairs)
          bwd_subtile<LM, NJ, true, false>(p, s, ci, cbase, cvalid, rl, rr, hscale);
        else
          bwd_subtile<LM, NJ, false, false>(p, s, ci, cbase, cvalid, rl, rr, hscale);
      }
      hz_sub<MODE, NJ>(gacc, s, Zs, lane, h, ndt);
    }
    if (p.nk == 1) __syncthreads();
  }
  cp_async_wait<0>();

  const bool pair_ok = (p.D % 2) == 0;
#pragma unroll
  for (int jd = 0; jd < 16; ++jd) {
    if (jd < ndt) {
      const int64_t d = d0 + jd * 8 + 2 * t;
      if (d < p.D) {
        const bool both = d + 1 < p.D;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (rok[i])
            store_pair<MODE>(p.grad, row[i] * p.D + d, gacc[jd][2 * i] * inv_scale,
                             gacc[jd][2 * i + 1] * inv_scale, both, pair_ok && both);
        }
      }
    }
  }
}

}  // namespace cuda_impl
}  // namespace modan_ext
