"""The forward kernel: per-anchor online statistics over every column of S, one pass.

A program owns BM anchors (compact index t; row a_first + t * a_step, so first_view_only and a
distributed rank's anchor range are just other a_first / a_step / n_anchors) and walks all M
columns in tiles of BN, in a fixed order: no atomics, the same input gives the same bits.
Per anchor it keeps, with m the running maximum of x = s / T over the other rows:
  l = Σ e^{x-m},  t = Σ e^{x-m} (x - m)  (<= 0),  count = |P(a)|,  omega = Σ_{P(a)} w,
  q = Σ_{P(a)} w (x - m)  (<= 0),
each rescaled when m grows (l, t multiplicatively as in an online softmax; q additively). It writes
them raw, [Ma, 6] in the accumulation dtype; `op.py` finishes in float64:
lse = m + log l, entropy = log l - t / l, loss = T / T_base (omega log l - q) / norm. No term of
the loss is a difference of two large numbers, even at |x| ~ 1e6.
"""
import triton
import triton.language as tl

from .similarity import F64
from .tile import pair_tile, row_labels

STATS = tl.constexpr(6)  # m, l, t, count, omega, q (Python: `.value`)


@triton.jit(do_not_specialize=["views", "anchor_begin", "a_first", "a_step", "n_anchors",
                                "label_kind", "weighting", "cid_positive"])
def supcon_forward_kernel(z_ptr, zlo_ptr, labels_ptr, limits_ptr, params_ptr, out_ptr,
                          M, D, words, views, anchor_begin, a_first, a_step, n_anchors,
                          label_kind, weighting, cid_positive,
                          PREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if PREC == F64 else tl.float32
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    valid_a = t < n_anchors
    rows_a = a_first + t * a_step
    img_a, n_a = row_labels(labels_ptr, rows_a, valid_a, views, words, label_kind)
    inv_t = tl.load(params_ptr)

    m = tl.full((BM,), float("-inf"), ACC)
    l = tl.zeros((BM,), dtype=ACC)
    tsum = tl.zeros((BM,), dtype=ACC)
    count = tl.zeros((BM,), dtype=ACC)
    omega = tl.zeros((BM,), dtype=ACC)
    q = tl.zeros((BM,), dtype=ACC)
    for c0 in range(0, M, BN):
        _, _, x, pair, w, _, _ = pair_tile(z_ptr, zlo_ptr, labels_ptr, limits_ptr, M, D, words,
                                           views, label_kind, weighting, cid_positive, inv_t,
                                           rows_a, valid_a, img_a, n_a, c0, ONE_CHUNK, PREC, BN,
                                           BK, ACC)
        x = tl.where(pair, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no column yet: any finite ref
        # While no column was seen (m = -inf) l, t, omega and q are all 0: any finite shift
        # leaves them so.
        shift = tl.where(m == float("-inf"), 0.0, m - m_ref)  # <= 0
        alpha = tl.exp(shift)
        d = x - m_ref[:, None]  # -inf on masked pairs
        e = tl.exp(d)
        d = tl.where(pair, d, 0.0)
        tsum = alpha * (tsum + shift * l) + tl.sum(e * d, axis=1)
        l = l * alpha + tl.sum(e, axis=1)
        q = q + omega * shift + tl.sum(w * d, axis=1)
        count += tl.sum(tl.where(w > 0, 1.0, 0.0).to(ACC), axis=1)
        omega += tl.sum(w, axis=1)
        m = m_new

    out = out_ptr + (rows_a - anchor_begin).to(tl.int64) * STATS
    tl.store(out + 0, m, mask=valid_a)
    tl.store(out + 1, l, mask=valid_a)
    tl.store(out + 2, tsum, mask=valid_a)
    tl.store(out + 3, count, mask=valid_a)
    tl.store(out + 4, omega, mask=valid_a)
    tl.store(out + 5, q, mask=valid_a)
