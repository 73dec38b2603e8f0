// The forward kernel: per-anchor log-sum-exp, entropy, positive count, weight sum and loss.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "cuda/label_weights.cuh"
#include "cuda/row_records.cuh"
#include "cuda/similarity.cuh"
#include "cuda/tile_loads.cuh"
#include "supcon_pair.h"
#include "supcon_problem.h"

namespace modan_ext {
namespace cuda_impl {

// Block: 64 anchors (compact index; with first_view_only every views-th row), all M columns, in
// column tiles of 64 (double-buffered through cp.async) and sub-tiles of 32 columns.
// Warp w: anchors 16w .. 16w+15; lane (g, t) holds rows g and g+8 and, per sub-tile, columns
// 8j + 2t + {0,1}, j = 0..3. Per row it keeps (max m, l = Σ e^{x−m}, t = Σ e^{x−m}(x − m)) and
// the positive count, Σ w and Σ w·x over its own columns; the 4 lanes of a quad are merged at the
// end. t <= 0 gives the entropy log l − t / l without cancellation (op contract v2).

struct FwdRow {
  float m, l, t, cnt, om, wx;
};

// x − m floored where e^{x−m} is 0 anyway (2^-288 underflows even without flush-to-zero), so that
// a masked column (x = −inf) adds 0·(finite) to t, not 0·(−inf).
constexpr float kExpFloor = -200.f;

// Rescales a running (l, t) from the max m to the max mu >= m: l e^d and e^d (t + d l),
// d = m − mu; nothing yet (m = −inf, l = t = 0) stays (0, 0).
__device__ __forceinline__ float rescaled_t(float m, float l, float t, float mu, float scale) {
  return l > 0.f ? scale * fmaf(m - mu, l, t) : 0.f;
}

// Folds one sub-tile (raw S values) into the per-row statistics. cbase = first local column of
// this lane in the tile (8NJ·h + 2t). With kMask, a column lc of the tile counts for row i only
// when lc < climit (past the last row otherwise) and lc != rl[i] (the row itself; rl = -1 when
// the row is not in this tile); without, every column counts (the caller knows the sub-tile has
// neither the diagonal nor the end of the matrix).
template <int LM, int NJ, bool kPairs, bool kMask>
__device__ __forceinline__ void fwd_subtile(const Params& p, const float (&s)[NJ][4],
                                            const RowInfo* ci, int cbase, int climit,
                                            const int (&rl)[2], const RowReg (&rr)[2],
                                            FwdRow (&st)[2]) {
  constexpr bool kFull = LM == kLGen1 || LM == kLGenN;  // the sqrt(n) field
  float w[NJ][4];
  subtile_weights<LM, NJ, kPairs, kFull>(w, p, ci, cbase, rr);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float xm[NJ][2];
    float mx = -INFINITY, cnt = 0.f, om = 0.f, wx = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      if constexpr (kPairs && !kMask) {  // both columns count and share one weight
        const float x0 = logit(s[j][2 * i], p.inv_t), x1 = logit(s[j][2 * i + 1], p.inv_t);
        const float wv = w[j][2 * i];
        xm[j][0] = x0, xm[j][1] = x1;
        mx = fmaxf(mx, fmaxf(x0, x1));
        cnt += wv > 0.f ? 2.f : 0.f;
        om = fmaf(2.f, wv, om);
        wx = fmaf(wv, x0 + x1, wx);
      } else {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = logit(s[j][2 * i + e], p.inv_t);
          const int lc = cbase + 8 * j + e;
          const bool valid = !kMask || (lc < climit && lc != rl[i]);
          const float wv = valid ? w[j][2 * i + (kPairs ? 0 : e)] : 0.f;
          xm[j][e] = valid ? x : -INFINITY;
          mx = fmaxf(mx, xm[j][e]);
          cnt += wv > 0.f ? 1.f : 0.f;
          om += wv;
          wx = fmaf(wv, x, wx);
        }
      }
    }
    const float mnew = fmaxf(st[i].m, mx);
    const float mu = mnew == -INFINITY ? 0.f : mnew;
    float sum = 0.f, tsum = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float d = fmaxf(xm[j][e] - mu, kExpFloor), ex = __expf(d);
        sum += ex;
        tsum = fmaf(ex, d, tsum);
      }
    const float scale = __expf(st[i].m - mu);
    st[i].t = rescaled_t(st[i].m, st[i].l, st[i].t, mu, scale) + tsum;
    st[i].l = fmaf(st[i].l, scale, sum);
    st[i].m = mnew;
    st[i].cnt += cnt;
    st[i].om += om;
    st[i].wx += wx;
  }
}

template <int MODE, int LM>
__global__ void __launch_bounds__(NT, 2) supcon_fwd_kernel(const Params p) {
  using S = typename Traits<MODE>::S;
  using L = Layout<S>;
  constexpr int NJ = 4;  // 8-column n-tiles per sub-tile
  if (*p.flag) return;  // non-finite input: the NaN fill kernel writes the outputs
  extern __shared__ __align__(16) unsigned char smem[];
  S* const As = reinterpret_cast<S*>(smem);
  S* const Bs0 = As + BM * L::STR;  // B buffer b: Bs0 + b * BM * L::STR
  RowInfo* const Ci0 = reinterpret_cast<RowInfo*>(As + 3 * BM * L::STR);  // Ci0 + b * BN

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t ta0 = int64_t(blockIdx.x) * BM;
  const int avalid = static_cast<int>(p.na - ta0 < BM ? p.na - ta0 : BM);
  const int64_t arow0 = p.a_first + ta0 * p.a_step;
  const int64_t rfirst = arow0, rlast = arow0 + int64_t(avalid - 1) * p.a_step;  // block's rows

  int64_t row[2];
  bool rok[2];
  RowReg rr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int lr = warp * 16 + g + 8 * i;
    rok[i] = lr < avalid;
    row[i] = arow0 + int64_t(lr) * p.a_step;
    rr[i] = row_reg(p.info, row[i], rok[i]);
  }
  FwdRow st[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) st[i] = FwdRow{-INFINITY, 0.f, 0.f, 0.f, 0.f, 0.f};

  const S* z = static_cast<const S*>(p.z);
  const int ncol = static_cast<int>((p.M + BN - 1) / BN);
  const bool vec = p.vec != 0;
  const bool pairs = (p.views & 1) == 0;  // columns 2t, 2t+1 always share an image
  if (p.nk == 1) {
    load_rows<S>(As, z, p.D, arow0, p.a_step, avalid, 0, vec);
    load_rows<S>(Bs0, z, p.D, 0, 1, static_cast<int>(p.M < BN ? p.M : BN), 0, vec);
    load_info(Ci0, p.info, 0, static_cast<int>(p.M < BN ? p.M : BN));
    cp_async_commit();
  }
  for (int c = 0; c < ncol; ++c) {
    const int buf = p.nk == 1 ? (c & 1) : 0;
    const int64_t c0 = int64_t(c) * BN;
    const int cvalid = static_cast<int>(p.M - c0 < BN ? p.M - c0 : BN);
    if (p.nk == 1) {
      if (c + 1 < ncol)
        load_column_tile<S>(Bs0 + (buf ^ 1) * BM * L::STR, Ci0 + (buf ^ 1) * BN, z, p, c0 + BN,
                            vec);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
    } else {
      __syncthreads();
      load_info(Ci0, p.info, c0, cvalid);
      cp_async_commit();  // waited for with the first chunk below
    }
    const RowInfo* ci = Ci0 + buf * BN;
    int rl[2];  // local column of each of this lane's rows in this tile, or -1
#pragma unroll
    for (int i = 0; i < 2; ++i) rl[i] = (row[i] >= c0 && row[i] < c0 + BN) ? int(row[i] - c0) : -1;
    const S* const bt = Bs0 + buf * BM * L::STR;
#pragma unroll 1
    for (int h = 0; h < BN / (8 * NJ); ++h) {
      float s[NJ][4];
      similarity_sub<MODE, NJ>(s, p, As, bt, Bs0, arow0, p.a_step, avalid, c0, cvalid, warp, lane,
                               h);
      // Masks only where the sub-tile reaches past the last row or may hold a diagonal entry.
      const int64_t cs = c0 + h * 8 * NJ;
      const bool masked = h * 8 * NJ + 8 * NJ > cvalid || (cs <= rlast && cs + 8 * NJ > rfirst);
      const int cbase = h * 8 * NJ + 2 * t;
      if (masked) {
        if (pairs)
          fwd_subtile<LM, NJ, true, true>(p, s, ci, cbase, cvalid, rl, rr, st);
        else
          fwd_subtile<LM, NJ, false, true>(p, s, ci, cbase, cvalid, rl, rr, st);
      } else {
        if (pairs)
          fwd_subtile<LM, NJ, true, false>(p, s, ci, cbase, cvalid, rl, rr, st);
        else
          fwd_subtile<LM, NJ, false, false>(p, s, ci, cbase, cvalid, rl, rr, st);
      }
    }
    if (p.nk == 1) __syncthreads();  // this tile's B / Ci buffer is refilled by the next prefetch
  }
  cp_async_wait<0>();

  // Merge the 4 lanes of each quad (fixed butterfly: deterministic), then lane t == 0 writes.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, st[i].m, off);
      const float l2 = __shfl_xor_sync(0xffffffffu, st[i].l, off);
      const float t2 = __shfl_xor_sync(0xffffffffu, st[i].t, off);
      const float mnew = fmaxf(st[i].m, m2);
      const float mu = mnew == -INFINITY ? 0.f : mnew;
      const float s1 = __expf(st[i].m - mu), s2 = __expf(m2 - mu);
      st[i].t = rescaled_t(st[i].m, st[i].l, st[i].t, mu, s1) + rescaled_t(m2, l2, t2, mu, s2);
      st[i].l = st[i].l * s1 + l2 * s2;
      st[i].m = mnew;
      st[i].cnt += __shfl_xor_sync(0xffffffffu, st[i].cnt, off);
      st[i].om += __shfl_xor_sync(0xffffffffu, st[i].om, off);
      st[i].wx += __shfl_xor_sync(0xffffffffu, st[i].wx, off);
    }
    if (t == 0 && rok[i]) {
      // lse and entropy in double (op contract v2): the backward subtracts lse from logits of
      // up to ~1e5 and more, where one float32 rounding of lse moves Σ_b p_ab off 1.
      const int64_t a = row[i] - p.abeg;
      const bool summed = st[i].m != -INFINITY;  // the row has another row (M > 1)
      const double log_l = summed ? log(double(st[i].l)) : 0.0;
      const double lse = summed ? double(st[i].m) + log_l : 0.0;
      const double entropy = summed ? log_l - double(st[i].t) / double(st[i].l) : 0.0;
      const bool counted = st[i].cnt > 0.f;
      const float norm = p.normalization == kByCount ? st[i].cnt : st[i].om;
      float loss = 0.f;
      if (counted)
        loss = static_cast<float>(p.t_over_tb * (double(st[i].om) * lse - double(st[i].wx)) /
                                  double(norm));
      p.loss[a] = loss;
      double* out = p.stats + kStatsColumns * a;
      out[kLse] = lse;
      out[kCount] = counted ? st[i].cnt : 0.0;
      out[kOmega] = counted ? st[i].om : 0.0;
      out[kNorm] = counted ? norm : 0.0;
      out[kEntropy] = entropy;
    }
  }
}

}  // namespace cuda_impl
}  // namespace modan_ext
