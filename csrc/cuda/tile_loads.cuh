// Global -> shared memory copies of feature tiles and row-record tiles (cp.async).
#pragma once

#include <cstdint>

#include "cuda/kernel_traits.cuh"
#include "cuda/ptx.cuh"

namespace modan_ext {
namespace cuda_impl {

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

// Feature rows and row records of the column tile starting at row c0 (zero past M), into one of
// the two buffers.
template <typename S>
__device__ __forceinline__ void load_column_tile(S* Bs, RowInfo* Ci, const S* z, const Params& p,
                                                 int64_t c0, bool vec) {
  const int nv = static_cast<int>(p.M - c0 < BN ? p.M - c0 : BN);
  load_rows<S>(Bs, z, p.D, c0, 1, nv, 0, vec);
  load_info(Ci, p.info, c0, nv);
}

}  // namespace cuda_impl
}  // namespace modan_ext
