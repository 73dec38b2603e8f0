// Fused CUDA kernel of modan_ext::supcon_fwd / supcon_bwd (contract: DEVELOPERS.md, math:
// paper-notes §1). LibTorch Stable ABI only; one build serves torch >= 2.11.
//
// Design (see also the comments at each kernel):
// * Two streaming passes over tiles of S = Z Zᵀ, never an M x M buffer. Extra memory: one
//   32-byte record per row (labels, counts, per-row backward coefficients), 256 bytes of flags and
//   a 34 KiB tie table (<= 64 labels); the backward's output is the gradient itself.
// * Row-owner scheduling, no floating-point atomics anywhere: a block owns BM = 64 rows (4 warps x
//   16 rows) and loops over all column tiles of BN = 64 in a fixed order. Forward: a warp owns its
//   16 rows' statistics (online log-sum-exp, positive count, weight sum, Σ w·x) over every column;
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
// * Label weights: per pair popcounts on the packed words, a float similarity, and the exact
//   double-precision decision of supcon_pair.h whenever the float is within 1e-5 (relative) of
//   the threshold (ties such as 1/3 vs 1/3 decide exactly as the reference): tabulated per call
//   for <= 64 labels, computed in place for more. With an even number of views, the two columns
//   a lane holds belong to one image and share one evaluation.
// * Non-finite features (or statistics): a scan sets a flag; the kernels then return at once and
//   every output entry is set to NaN.
#include <Python.h>  // first, as Python asks: the `_cuda` module stub at the end of this file

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "supcon_pair.h"

namespace modan_ext {
namespace cuda_impl {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---- tiling -----------------------------------------------------------------------------------

constexpr int BM = 64;      // rows per block (4 warps x 16 rows)
constexpr int BN = 64;      // columns per tile (processed in sub-tiles of 8·NJ columns)
constexpr int NW = 4;       // warps per block
constexpr int NT = NW * 32; // threads per block
constexpr int DK = 128;     // feature columns held in shared memory per row (D > DK: chunks)

enum Mode : int { kTF32 = 0, kTF32x3 = 1, kF16 = 2, kBF16 = 3 };
// kLCid: class ids; kLJac1: <= 64 labels, Jaccard/binary; kLGen1: <= 64 labels, dice/cosine/
// overlap; kLGenN: > 64 labels (words read from global memory), any weighting.
enum LabelMode : int { kLCid = 0, kLJac1 = 1, kLGen1 = 2, kLGenN = 3 };

// One record per contrast row (32 bytes, two 16-byte halves).
struct alignas(16) RowInfo {
  uint32_t lo, hi;  // label word (<= 64 labels) or class id
  int32_t img;      // row / views
  float n;          // number of labels of the image (multi-hot)
  float sq;         // sqrt(n) (cosine)
  float lse;        // backward: log-sum-exp of the row, +inf when the row has no coefficient
  float ca, cb;     // backward: grad_loss·omega/(T_base·norm), grad_loss/(T_base·norm)
};
static_assert(sizeof(RowInfo) == 32, "RowInfo must be 32 bytes");

template <int MODE>
struct Traits {
  using S = float;  // storage type of a feature element
  static constexpr int KSTEP = 8;
  static constexpr bool kHalf = false;
};
template <>
struct Traits<kF16> {
  using S = uint16_t;
  static constexpr int KSTEP = 16;
  static constexpr bool kHalf = true;
};
template <>
struct Traits<kBF16> {
  using S = uint16_t;
  static constexpr int KSTEP = 16;
  static constexpr bool kHalf = true;
};

template <typename S>
struct Layout {
  static constexpr int EPC = 16 / static_cast<int>(sizeof(S));  // elements per 16-byte chunk
  static constexpr int STR = DK + EPC;  // row stride in smem: +16 bytes kills ldmatrix conflicts
  static constexpr int CPR = DK / EPC;  // 16-byte chunks per smem row
  static constexpr size_t kTileBytes = size_t(BM) * STR * sizeof(S);
  static constexpr size_t kSmemBytes = 3 * kTileBytes + 2 * BN * sizeof(RowInfo);
};

// Everything a kernel needs (passed by value).
struct Params {
  const void* z;            // features [M, D]
  const int64_t* labels;    // [B, W]
  const RowInfo* info;      // [M]
  const int* flag;          // non-zero: non-finite input
  const unsigned* cmax;     // backward, float16: max over rows of |ca| + |cb| (float bits)
  int64_t M, D, W, views;
  int64_t abeg, aend;
  int fvo;                  // first_view_only
  int64_t a_first, a_step, na;  // forward: compact anchor t is row a_first + t * a_step
  int nk;                   // ceil(D / DK) (>= 1)
  int vec;                  // 16-byte cp.async loads are legal
  float inv_t;              // 1 / T
  float thr_f, band;        // fast threshold test: |sim − thr_f| <= band -> exact path
  double thr;               // the exact threshold
  int weighting, binw;
  float wa, wb, wc, wd;     // generic denominators: wa (n_i+n_j) + wb n∧ + wc min + wd sqrt(n_i n_j)
  float cid_w;              // weight of two images with equal class ids
  const uint32_t* ties;     // <= 64 labels: exact positive bit of (n_i, n_j, n∧), kTieDim^3 bits
  float* loss;              // forward outputs (float32)
  float* stats;
  double t_over_tb;
  int normalization;
  void* grad;               // backward output [M, D], features' dtype
};

// ---- PTX helpers ------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int n = pred ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D += A(16x8, tf32) B(8x8, tf32). a0 (g,t) a1 (g+8,t) a2 (g,t+4) a3 (g+8,t+4); b0 (k=t,n=g)
// b1 (k=t+4,n=g); d0 (g,2t) d1 (g,2t+1) d2 (g+8,2t) d3 (g+8,2t+1). g = lane/4, t = lane%4.
__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// D += A(16x16) B(16x8), f16 or bf16 inputs, f32 accumulators (same D layout as above).
template <int MODE>
__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  if constexpr (MODE == kF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Round to the nearest tf32 (ties away from zero, as cvt.rna.tf32.f32, which sm_90 emulates
// with more instructions plus an Inf/NaN test we do not need: inputs are finite, or the whole
// result is replaced by NaN).
__device__ __forceinline__ uint32_t to_tf32(float x) {
  return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
}
// x ≈ big + small, both tf32, |x − big − small| <= 2^-22 |x|.
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(x - __uint_as_float(big));
}

// Two floats -> packed 16-bit pair (low half = first), rounded to nearest; and the residual pair.
template <int MODE>
__device__ __forceinline__ void pack_split(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  if constexpr (MODE == kF16) {
    const __half2 h = __floats2half2_rn(x0, x1);
    const __half2 l = __floats2half2_rn(x0 - __low2float(h), x1 - __high2float(h));
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - __low2float(h), x1 - __high2float(h));
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  }
}

// ---- tile loads -------------------------------------------------------------------------------

// smem rows r < 64 <- feature rows row0 + r*step (r < nvalid), columns col0 .. col0+DK-1;
// everything outside [0, nvalid) x [0, D) is zero-filled.
template <typename S>
__device__ __forceinline__ void load_rows(S* sm, const S* z, int64_t D, int64_t row0,
                                          int64_t step, int nvalid, int64_t col0, bool vec) {
  using L = Layout<S>;
  if (vec) {
#pragma unroll 4
    for (int i = threadIdx.x; i < BM * L::CPR; i += NT) {
      const int r = i / L::CPR, cc = i % L::CPR;
      const int64_t col = col0 + int64_t(cc) * L::EPC;
      const bool ok = r < nvalid && col < D;  // D is a multiple of EPC here
      const S* src = ok ? z + (row0 + r * step) * D + col : z;
      cp_async16(sm + r * L::STR + cc * L::EPC, src, ok);
    }
  } else {
    for (int i = threadIdx.x; i < BM * DK; i += NT) {
      const int r = i / DK, c = i % DK;
      const int64_t col = col0 + c;
      S v = S(0);
      if (r < nvalid && col < D) v = z[(row0 + r * step) * D + col];
      sm[r * L::STR + c] = v;
    }
  }
}

// Column records of rows c0 .. c0+63 (zero past nvalid). 128 threads x 16 bytes.
__device__ __forceinline__ void load_info(RowInfo* sm, const RowInfo* info, int64_t c0,
                                          int nvalid) {
  const int r = threadIdx.x >> 1, part = threadIdx.x & 1;
  const bool ok = r < nvalid;
  const char* src = reinterpret_cast<const char*>(ok ? info + c0 + r : info) + 16 * part;
  cp_async16(reinterpret_cast<char*>(sm + r) + 16 * part, src, ok);
}

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

// ---- label weights ----------------------------------------------------------------------------

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

// ---- the similarity tile ----------------------------------------------------------------------

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

// ---- forward ----------------------------------------------------------------------------------
//
// Block: 64 anchors (compact index; with first_view_only every views-th row), all M columns, in
// column tiles of 64 (double-buffered through cp.async) and sub-tiles of 32 columns.
// Warp w: anchors 16w .. 16w+15; lane (g, t) holds rows g and g+8 and, per sub-tile, columns
// 8j + 2t + {0,1}, j = 0..3. Per row it keeps (max, sum) of exp(x) and the positive count,
// Σ w and Σ w·x over its own columns; the 4 lanes of a quad are merged at the end.

struct FwdRow {
  float m, l, cnt, om, wx;
};

// x = RN(s / T) as RN(s * (1/T)), never fused with what follows (fast-math lets nvcc contract
// x - lse into one FMA, which would round differently from the forward's max at large |x|):
// forward and backward see the very same x, so exp(x_ab − lse_a) <= 1 and equals 1 at the max.
__device__ __forceinline__ float logit(float s, float inv_t) { return __fmul_rn(s, inv_t); }

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
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) sum += __expf(xm[j][e] - mu);
    st[i].l = fmaf(st[i].l, __expf(st[i].m - mu), sum);
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
  for (int i = 0; i < 2; ++i) st[i] = FwdRow{-INFINITY, 0.f, 0.f, 0.f, 0.f};

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
      if (c + 1 < ncol) {
        const int64_t c1 = c0 + BN;
        const int nv = static_cast<int>(p.M - c1 < BN ? p.M - c1 : BN);
        load_rows<S>(Bs0 + (buf ^ 1) * BM * L::STR, z, p.D, c1, 1, nv, 0, vec);
        load_info(Ci0 + (buf ^ 1) * BN, p.info, c1, nv);
      }
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
      const float mnew = fmaxf(st[i].m, m2);
      const float mu = mnew == -INFINITY ? 0.f : mnew;
      st[i].l = st[i].l * __expf(st[i].m - mu) + l2 * __expf(m2 - mu);
      st[i].m = mnew;
      st[i].cnt += __shfl_xor_sync(0xffffffffu, st[i].cnt, off);
      st[i].om += __shfl_xor_sync(0xffffffffu, st[i].om, off);
      st[i].wx += __shfl_xor_sync(0xffffffffu, st[i].wx, off);
    }
    if (t == 0 && rok[i]) {
      const int64_t a = row[i] - p.abeg;
      const float lse = st[i].m == -INFINITY ? 0.f : st[i].m + __logf(st[i].l);
      const bool counted = st[i].cnt > 0.f;
      const float norm = p.normalization == kByCount ? st[i].cnt : st[i].om;
      float loss = 0.f;
      if (counted)
        loss = static_cast<float>(p.t_over_tb *
                                  (double(st[i].om) * double(lse) - double(st[i].wx)) /
                                  double(norm));
      p.loss[a] = loss;
      float4 out = make_float4(lse, 0.f, 0.f, 0.f);
      if (counted) out = make_float4(lse, st[i].cnt, st[i].om, norm);
      reinterpret_cast<float4*>(p.stats)[a] = out;
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------
//
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
      if (c + 1 < clast) {
        const int64_t c1 = c0 + BN;
        const int nv = static_cast<int>(p.M - c1 < BN ? p.M - c1 : BN);
        load_rows<S>(Bs0 + (buf ^ 1) * BM * L::STR, z, p.D, c1, 1, nv, 0, vec);
        load_info(Ci0 + (buf ^ 1) * BN, p.info, c1, nv);
      }
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

// ---- small kernels: input scan, row records, NaN fill -----------------------------------------

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

struct PrepParams {
  const int64_t* labels;
  int64_t M, W, views, label_kind;
  int64_t abeg, aend;
  int fvo;
  RowInfo* info;
  // backward only (stats == nullptr: forward)
  const float* stats;
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
    if (q.stats != nullptr && r >= q.abeg && r < q.aend && (!q.fvo || r % q.views == 0)) {
      const int64_t a = r - q.abeg;
      const float cnt = q.stats[4 * a + 1];
      if (cnt > 0.f) {
        const double norm = q.stats[4 * a + 3];
        const double coef = double(q.grad_loss[a]) / (q.base_temperature * norm);
        ri.cb = static_cast<float>(coef);
        ri.ca = static_cast<float>(coef * double(q.stats[4 * a + 2]));
        ri.lse = q.stats[4 * a];
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

template <typename U>
__global__ void nan_fill_kernel(U* x, int64_t n, U nan_bits, const int* flag) {
  if (*flag == 0) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = nan_bits;
}

// ---- float64: plain FMA path (gradcheck) ------------------------------------------------------
//
// One warp per row; lanes stride over the columns; every dot product is a sequential FMA over k,
// so s_ab == s_ba bit for bit and the backward recomputes the forward's logits exactly.

struct Params64 {
  const double* z;
  const int64_t* labels;
  const int32_t* counts;  // per image
  const int* flag;
  const double* coef;     // backward: [M, 3] = (lse or +inf, ca, cb)
  int64_t M, D, W, views, label_kind;
  int64_t abeg, a_first, a_step, na;
  double inv_t, thr, t_over_tb;
  int weighting, normalization;
  double* loss;
  double* stats;
  double* grad;
};

__device__ __forceinline__ double dot64(const double* a, const double* b, int64_t D) {
  double s = 0.0;
  for (int64_t k = 0; k < D; ++k) s = fma(a[k], b[k], s);
  return s;
}

__global__ void counts64_kernel(const int64_t* labels, int64_t B, int64_t W, int32_t* counts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  int n = 0;
  for (int64_t k = 0; k < W; ++k) n += __popcll(static_cast<unsigned long long>(labels[i * W + k]));
  counts[i] = n;
}

__global__ void supcon_fwd64_kernel(const Params64 p) {
  const int64_t ta = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (ta >= p.na || *p.flag) return;  // whole warps
  const int64_t a = p.a_first + ta * p.a_step;
  const int64_t ia = a / p.views;
  const double* za = p.z + a * p.D;
  double m = -INFINITY, l = 0.0, cnt = 0.0, om = 0.0, wx = 0.0;
  for (int64_t b = lane; b < p.M; b += 32) {
    if (b == a) continue;
    const double x = __dmul_rn(dot64(za, p.z + b * p.D, p.D), p.inv_t);  // never contracted
    if (x > m) {
      l = l * exp(m - x) + 1.0;
      m = x;
    } else {
      l += exp(x - m);
    }
    const double w = pair_weight(p.labels, p.counts, p.W, p.label_kind, ia, b / p.views, p.thr,
                                 p.weighting);
    if (w > 0.0) cnt += 1.0, om += w, wx += w * x;
  }
  for (int off = 1; off < 32; off <<= 1) {
    const double m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const double l2 = __shfl_xor_sync(0xffffffffu, l, off);
    const double mn = fmax(m, m2);
    const double mu = mn == -INFINITY ? 0.0 : mn;
    l = l * exp(m - mu) + l2 * exp(m2 - mu);
    m = mn;
    cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
    om += __shfl_xor_sync(0xffffffffu, om, off);
    wx += __shfl_xor_sync(0xffffffffu, wx, off);
  }
  if (lane == 0) {
    const int64_t i = a - p.abeg;
    const double lse = m == -INFINITY ? 0.0 : m + log(l);
    const double norm = p.normalization == kByCount ? cnt : om;
    double* st = p.stats + 4 * i;
    st[0] = lse;
    if (cnt > 0.0) {
      p.loss[i] = p.t_over_tb * (om * lse - wx) / norm;
      st[1] = cnt, st[2] = om, st[3] = norm;
    } else {
      p.loss[i] = 0.0;
      st[1] = st[2] = st[3] = 0.0;
    }
  }
}

__global__ void coef64_kernel(const double* stats, const double* grad_loss, int64_t M,
                              int64_t abeg, int64_t aend, int64_t views, int fvo,
                              double base_temperature, double* coef) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= M) return;
  double lse = INFINITY, ca = 0.0, cb = 0.0;
  if (r >= abeg && r < aend && (!fvo || r % views == 0)) {
    const double* st = stats + 4 * (r - abeg);
    if (st[1] > 0.0) {
      cb = grad_loss[r - abeg] / (base_temperature * st[3]);
      ca = cb * st[2];
      lse = st[0];
    }
  }
  coef[3 * r] = lse, coef[3 * r + 1] = ca, coef[3 * r + 2] = cb;
}

constexpr int kWarps64 = 4;

__global__ void __launch_bounds__(32 * kWarps64) supcon_bwd64_kernel(const Params64 p) {
  __shared__ double hs[kWarps64][32];
  const int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps64 + wib;
  if (r >= p.M || *p.flag) return;  // whole warps
  const double* zr = p.z + r * p.D;
  const int64_t ir = r / p.views;
  const double lse_r = p.coef[3 * r], ca_r = p.coef[3 * r + 1], cb_r = p.coef[3 * r + 2];
  double* gr = p.grad + r * p.D;
  for (int64_t d = lane; d < p.D; d += 32) gr[d] = 0.0;
  for (int64_t b0 = 0; b0 < p.M; b0 += 32) {
    const int64_t b = b0 + lane;
    double hv = 0.0;
    if (b < p.M && b != r) {
      const double x = __dmul_rn(dot64(zr, p.z + b * p.D, p.D), p.inv_t);
      const double w = pair_weight(p.labels, p.counts, p.W, p.label_kind, ir, b / p.views,
                                   p.thr, p.weighting);
      hv = ca_r * exp(x - lse_r) + p.coef[3 * b + 1] * exp(x - p.coef[3 * b]) -
           (cb_r + p.coef[3 * b + 2]) * w;
    }
    hs[wib][lane] = hv;
    __syncwarp();
    const int nb = static_cast<int>(p.M - b0 < 32 ? p.M - b0 : 32);
    for (int64_t d = lane; d < p.D; d += 32) {
      double acc = gr[d];
      for (int j = 0; j < nb; ++j) acc = fma(hs[wib][j], p.z[(b0 + j) * p.D + d], acc);
      gr[d] = acc;
    }
    __syncwarp();
  }
}

// ---- host side --------------------------------------------------------------------------------

#define MODAN_CUDA_CHECK(expr) STD_CUDA_CHECK(expr)

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

struct Problem {
  int64_t M, D, B, W, views, label_kind, abeg, aend, weighting, normalization;
  bool fvo;
  double temperature, base_temperature, threshold;
  int32_t device;
  ScalarType dtype;
  int64_t anchors() const { return aend - abeg; }
};

Problem check_problem(const Tensor& features, const Tensor& labels, int64_t label_kind,
                      int64_t views, int64_t abeg, int64_t aend, bool fvo, double temperature,
                      double base_temperature, double threshold, int64_t weighting,
                      int64_t normalization) {
  STD_TORCH_CHECK(features.is_cuda(), "modan_ext: the CUDA kernel got features on another device");
  STD_TORCH_CHECK(labels.is_cuda(), "modan_ext: the CUDA kernel got labels on another device");
  STD_TORCH_CHECK(labels.get_device_index() == features.get_device_index(),
                  "modan_ext: features and labels must be on the same CUDA device");
  const ScalarType dt = features.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double || dt == ScalarType::Half ||
                      dt == ScalarType::BFloat16,
                  "modan_ext: the CUDA kernel takes float32, float64, float16 or bfloat16 "
                  "features");
  STD_TORCH_CHECK(features.dim() == 2 && features.is_contiguous(),
                  "modan_ext: features must be a contiguous [M, D] tensor");
  STD_TORCH_CHECK(labels.scalar_type() == ScalarType::Long && labels.dim() == 2 &&
                      labels.is_contiguous(),
                  "modan_ext: labels must be a contiguous int64 [B, W] tensor");
  STD_TORCH_CHECK(label_kind == kMultiHot || label_kind == kClassIds,
                  "modan_ext: label_kind must be 0 (multi-hot) or 1 (class ids)");
  STD_TORCH_CHECK(label_kind == kMultiHot || labels.size(1) == 1,
                  "modan_ext: class-id labels must have shape [B, 1]");
  STD_TORCH_CHECK(views >= 1, "modan_ext: views must be >= 1");
  STD_TORCH_CHECK(labels.size(0) * views == features.size(0),
                  "modan_ext: labels.size(0) * views must equal features.size(0)");
  STD_TORCH_CHECK(0 <= abeg && abeg <= aend && aend <= features.size(0),
                  "modan_ext: the anchor range must lie within [0, M]");
  STD_TORCH_CHECK(features.size(0) < (int64_t(1) << 31) - BN,
                  "modan_ext: the CUDA kernel takes fewer than 2^31 rows");
  STD_TORCH_CHECK(temperature > 0 && base_temperature > 0 && std::isfinite(temperature) &&
                      std::isfinite(base_temperature),
                  "modan_ext: temperatures must be finite and > 0");
  STD_TORCH_CHECK(weighting >= kJaccard && weighting <= kBinary,
                  "modan_ext: weighting must be in 0..4");
  STD_TORCH_CHECK(normalization == kByCount || normalization == kByWeight,
                  "modan_ext: normalization must be 0 (count) or 1 (weight)");
  Problem p;
  p.M = features.size(0), p.D = features.size(1), p.B = labels.size(0), p.W = labels.size(1);
  p.views = views, p.label_kind = label_kind, p.abeg = abeg, p.aend = aend;
  p.weighting = weighting, p.normalization = normalization, p.fvo = fvo;
  p.temperature = temperature, p.base_temperature = base_temperature, p.threshold = threshold;
  p.device = features.get_device_index();
  p.dtype = dt;
  return p;
}

// Workspace: [0, 256) flags (int flag, unsigned cmax), then the per-row records / buffers.
constexpr int64_t kWsHead = 256;

struct Workspace {
  Tensor buf;
  unsigned char* base;
  int* flag() const { return reinterpret_cast<int*>(base); }
  unsigned* cmax() const { return reinterpret_cast<unsigned*>(base + 4); }
  void* body() const { return base + kWsHead; }
};

Workspace make_workspace(const Tensor& like, int64_t body_bytes, cudaStream_t stream) {
  Workspace ws{torch::stable::new_empty(like, {kWsHead + body_bytes}, ScalarType::Byte), nullptr};
  ws.base = static_cast<unsigned char*>(ws.buf.mutable_data_ptr());
  MODAN_CUDA_CHECK(cudaMemsetAsync(ws.base, 0, kWsHead, stream));
  return ws;
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

// Compact anchor list: rows a_first + t * a_step, t < na.
void anchor_list(const Problem& p, int64_t& first, int64_t& step, int64_t& na) {
  if (!p.fvo) {
    first = p.abeg, step = 1, na = p.aend - p.abeg;
    return;
  }
  first = (p.abeg + p.views - 1) / p.views * p.views;
  step = p.views;
  na = first < p.aend ? (p.aend - 1 - first) / p.views + 1 : 0;
}

int mode_of(ScalarType dt, bool allow_tf32) {
  if (dt == ScalarType::Half) return kF16;
  if (dt == ScalarType::BFloat16) return kBF16;
  return allow_tf32 ? kTF32 : kTF32x3;
}

int label_mode_of(const Problem& p) {
  if (p.label_kind == kClassIds) return kLCid;
  if (p.W <= 1) return (p.weighting == kJaccard || p.weighting == kBinary) ? kLJac1 : kLGen1;
  return kLGenN;
}

Params base_params(const Problem& p, const Tensor& features, const Tensor& labels, void* info,
                   const Workspace& ws) {
  Params k{};
  k.z = features.const_data_ptr();
  k.labels = static_cast<const int64_t*>(labels.const_data_ptr());
  k.info = static_cast<const RowInfo*>(info);
  k.flag = ws.flag();
  k.cmax = ws.cmax();
  k.M = p.M, k.D = p.D, k.W = p.W, k.views = p.views;
  k.abeg = p.abeg, k.aend = p.aend, k.fvo = p.fvo ? 1 : 0;
  k.nk = p.D <= DK ? 1 : static_cast<int>((p.D + DK - 1) / DK);
  const size_t es = features.element_size();
  k.vec = (p.D > 0 && (p.D * int64_t(es)) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(k.z) % 16 == 0) ? 1 : 0;
  k.inv_t = static_cast<float>(1.0 / p.temperature);
  // Fast threshold: a similarity is >= 1/(2·64·W) when it is > 0, and <= 1, so clamping the
  // threshold into [1e-20, 2] changes no decision, and keeps the float band finite. (A NaN
  // threshold rejects nothing in positive_weight: `sim < NaN` is false; so is sim < 1e-20.)
  double thr_c = p.threshold;
  if (!(thr_c >= 1e-20)) thr_c = 1e-20;
  if (thr_c > 2.0) thr_c = 2.0;
  k.thr_f = static_cast<float>(thr_c);
  k.band = static_cast<float>(1e-5 * thr_c);
  k.thr = p.threshold;
  k.weighting = static_cast<int>(p.weighting);
  k.binw = p.weighting == kBinary ? 1 : 0;
  k.wa = k.wb = k.wc = k.wd = 0.f;
  switch (p.weighting) {
    case kDice: k.wa = 0.5f; break;
    case kCosine: k.wd = 1.f; break;
    case kOverlap: k.wc = 1.f; break;
    default: k.wa = 1.f, k.wb = -1.f; break;  // jaccard, binary
  }
  k.cid_w = static_cast<float>(positive_weight(1.0, p.threshold, p.weighting));
  k.t_over_tb = p.temperature / p.base_temperature;
  k.normalization = static_cast<int>(p.normalization);
  return k;
}

// cudaFuncSetAttribute is per device: remember, per kernel instantiation (`done` is a distinct
// static in each caller), the devices it was set on.
template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes, int32_t device, std::atomic<uint64_t> (&done)[4]) {
  const uint64_t bit = uint64_t(1) << (device & 63);
  auto& word = done[(device >> 6) & 3];
  if (word.load(std::memory_order_relaxed) & bit) return;
  MODAN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
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
  q.M = p.M, q.W = p.W, q.views = p.views, q.label_kind = p.label_kind;
  q.abeg = p.abeg, q.aend = p.aend, q.fvo = p.fvo ? 1 : 0;
  q.info = info;
  q.stats = stats, q.grad_loss = grad_loss;
  q.base_temperature = p.base_temperature;
  q.cmax = cmax;
  const int threads = 256;
  prep_rows_kernel<<<static_cast<unsigned>((p.M + threads - 1) / threads), threads, 0, stream>>>(q);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

Params64 params64(const Problem& p, const Tensor& features, const Tensor& labels,
                  const int32_t* counts, const Workspace& ws) {
  Params64 k{};
  k.z = static_cast<const double*>(features.const_data_ptr());
  k.labels = static_cast<const int64_t*>(labels.const_data_ptr());
  k.counts = counts;
  k.flag = ws.flag();
  k.M = p.M, k.D = p.D, k.W = p.W, k.views = p.views, k.label_kind = p.label_kind;
  k.abeg = p.abeg;
  k.inv_t = 1.0 / p.temperature;
  k.thr = p.threshold;
  k.t_over_tb = p.temperature / p.base_temperature;
  k.weighting = static_cast<int>(p.weighting);
  k.normalization = static_cast<int>(p.normalization);
  return k;
}

void launch_counts64(const Problem& p, const Tensor& labels, int32_t* counts,
                     cudaStream_t stream) {
  if (p.B == 0) return;
  counts64_kernel<<<static_cast<unsigned>((p.B + 255) / 256), 256, 0, stream>>>(
      static_cast<const int64_t*>(labels.const_data_ptr()), p.B, p.W, counts);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool uses_ties(const Problem& p) {
  const int lm = label_mode_of(p);
  return lm == kLJac1 || lm == kLGen1;
}

// Workspace body of the float32 / half paths: the row records, then the tie table if used.
int64_t body_bytes(const Problem& p) {
  return p.M * int64_t(sizeof(RowInfo)) + (uses_ties(p) ? int64_t(kTieWords) * 4 : 0);
}

const uint32_t* tie_table(const Problem& p, const Workspace& ws, cudaStream_t stream) {
  if (!uses_ties(p)) return nullptr;
  uint32_t* bits = reinterpret_cast<uint32_t*>(static_cast<unsigned char*>(ws.body()) +
                                               p.M * int64_t(sizeof(RowInfo)));
  tie_table_kernel<<<(kTieWords + 255) / 256, 256, 0, stream>>>(bits, p.threshold,
                                                                static_cast<int>(p.weighting));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

std::tuple<Tensor, Tensor> supcon_fwd_cuda(Tensor features, Tensor labels, int64_t label_kind,
                                           int64_t views, int64_t anchor_begin,
                                           int64_t anchor_end, bool first_view_only,
                                           double temperature, double base_temperature,
                                           double threshold, int64_t weighting,
                                           int64_t normalization, bool allow_tf32) {
  const Problem p = check_problem(features, labels, label_kind, views, anchor_begin, anchor_end,
                                  first_view_only, temperature, base_temperature, threshold,
                                  weighting, normalization);
  torch::stable::accelerator::DeviceGuard guard(p.device);
  const ScalarType out_dt = p.dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  const int64_t Ma = p.anchors();
  Tensor loss = torch::stable::new_empty(features, {Ma}, out_dt);
  Tensor stats = torch::stable::new_empty(features, {Ma, 4}, out_dt);
  if (Ma == 0) return {loss, stats};
  const cudaStream_t stream = current_stream(p.device);
  const size_t os = p.dtype == ScalarType::Double ? 8 : 4;
  MODAN_CUDA_CHECK(cudaMemsetAsync(loss.mutable_data_ptr(), 0, Ma * os, stream));
  MODAN_CUDA_CHECK(cudaMemsetAsync(stats.mutable_data_ptr(), 0, Ma * 4 * os, stream));
  int64_t a_first, a_step, na;
  anchor_list(p, a_first, a_step, na);

  if (p.dtype == ScalarType::Double) {
    Workspace ws = make_workspace(features, round_up(p.B * 4, 16), stream);
    scan_finite(features, ws.flag(), stream);
    int32_t* counts = static_cast<int32_t*>(ws.body());
    launch_counts64(p, labels, counts, stream);
    Params64 k = params64(p, features, labels, counts, ws);
    k.a_first = a_first, k.a_step = a_step, k.na = na;
    k.loss = static_cast<double*>(loss.mutable_data_ptr());
    k.stats = static_cast<double*>(stats.mutable_data_ptr());
    if (na > 0) {
      const int threads = 128;
      supcon_fwd64_kernel<<<static_cast<unsigned>((na * 32 + threads - 1) / threads), threads, 0,
                            stream>>>(k);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
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
  k.stats = static_cast<float*>(stats.mutable_data_ptr());
  if (na > 0) dispatch<true>(mode_of(p.dtype, allow_tf32), label_mode_of(p), k, p.device, stream);
  nan_fill(loss, ws.flag(), stream);
  nan_fill(stats, ws.flag(), stream);
  return {loss, stats};
}

Tensor supcon_bwd_cuda(Tensor grad_loss, Tensor features, Tensor labels, Tensor stats,
                       int64_t label_kind, int64_t views, int64_t anchor_begin,
                       int64_t anchor_end, bool first_view_only, double temperature,
                       double base_temperature, double threshold, int64_t weighting,
                       int64_t normalization, bool allow_tf32) {
  const Problem p = check_problem(features, labels, label_kind, views, anchor_begin, anchor_end,
                                  first_view_only, temperature, base_temperature, threshold,
                                  weighting, normalization);
  const ScalarType st_dt = p.dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  const int64_t Ma = p.anchors();
  STD_TORCH_CHECK(grad_loss.is_cuda() && grad_loss.get_device_index() == p.device &&
                      stats.is_cuda() && stats.get_device_index() == p.device,
                  "modan_ext: grad_loss and stats must be on the features' CUDA device");
  STD_TORCH_CHECK(grad_loss.scalar_type() == st_dt && grad_loss.dim() == 1 &&
                      grad_loss.size(0) == Ma && grad_loss.is_contiguous(),
                  "modan_ext: grad_loss must be a contiguous [Ma] tensor of the loss dtype "
                  "(float64 for float64 features, float32 otherwise)");
  STD_TORCH_CHECK(stats.scalar_type() == st_dt && stats.dim() == 2 && stats.size(0) == Ma &&
                      stats.size(1) == 4 && stats.is_contiguous(),
                  "modan_ext: stats must be the [Ma, 4] statistics from supcon_fwd");
  torch::stable::accelerator::DeviceGuard guard(p.device);
  Tensor grad = torch::stable::new_empty(features, {p.M, p.D}, p.dtype);
  if (p.M == 0 || p.D == 0) return grad;
  const cudaStream_t stream = current_stream(p.device);

  if (p.dtype == ScalarType::Double) {
    const int64_t counts_bytes = round_up(p.B * 4, 16);
    Workspace ws = make_workspace(features, counts_bytes + p.M * 3 * 8, stream);
    scan_finite(features, ws.flag(), stream);
    scan_finite(stats, ws.flag(), stream);
    double* grad_ptr = static_cast<double*>(grad.mutable_data_ptr());
    if (Ma == 0) {
      MODAN_CUDA_CHECK(cudaMemsetAsync(grad_ptr, 0, p.M * p.D * 8, stream));
    } else {
      int32_t* counts = static_cast<int32_t*>(ws.body());
      double* coef =
          reinterpret_cast<double*>(static_cast<unsigned char*>(ws.body()) + counts_bytes);
      launch_counts64(p, labels, counts, stream);
      coef64_kernel<<<static_cast<unsigned>((p.M + 255) / 256), 256, 0, stream>>>(
          static_cast<const double*>(stats.const_data_ptr()),
          static_cast<const double*>(grad_loss.const_data_ptr()), p.M, p.abeg, p.aend, p.views,
          p.fvo ? 1 : 0, p.base_temperature, coef);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      Params64 k = params64(p, features, labels, counts, ws);
      k.coef = coef;
      k.grad = grad_ptr;
      supcon_bwd64_kernel<<<static_cast<unsigned>((p.M + kWarps64 - 1) / kWarps64),
                            32 * kWarps64, 0, stream>>>(k);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
    nan_fill(grad, ws.flag(), stream);
    return grad;
  }

  Workspace ws = make_workspace(features, body_bytes(p), stream);
  scan_finite(features, ws.flag(), stream);
  scan_finite(stats, ws.flag(), stream);
  if (Ma == 0) {
    MODAN_CUDA_CHECK(cudaMemsetAsync(grad.mutable_data_ptr(), 0,
                                     p.M * p.D * features.element_size(), stream));
  } else {
    RowInfo* info = static_cast<RowInfo*>(ws.body());
    prep_rows(p, labels, info, static_cast<const float*>(stats.const_data_ptr()),
              static_cast<const float*>(grad_loss.const_data_ptr()), ws.cmax(), stream);
    Params k = base_params(p, features, labels, info, ws);
    k.ties = tie_table(p, ws, stream);
    k.grad = grad.mutable_data_ptr();
    dispatch<false>(mode_of(p.dtype, allow_tf32), label_mode_of(p), k, p.device, stream);
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
