// Tiling of the fused kernels: block and tile sizes, the compute modes and label modes that
// instantiate them, the per-row record, the shared-memory layout and the kernels' parameters.
#pragma once

#include <cstddef>
#include <cstdint>

namespace modan_ext {
namespace cuda_impl {

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
  float lse;        // backward: lse_hi = float32(lse), +inf when the row has no coefficient
  float ca, cb;     // backward: grad_loss·omega·exp(−lse_lo)/(T_base·norm), grad_loss/(T_base·norm)
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
  float* loss;              // forward outputs: loss (float32), stats [Ma, 5] (float64)
  double* stats;
  double t_over_tb;
  int normalization;
  void* grad;               // backward output [M, D], features' dtype
};

}  // namespace cuda_impl
}  // namespace modan_ext
