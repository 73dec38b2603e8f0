"""What both kernels compute for a tile of (row, column) pairs, in one place: so the backward
sees the forward's very logits and weights (op contract v2: p = exp(x - lse) with the forward's x).
"""
import triton
import triton.language as tl

from .labels import MULTI_HOT, label_counts, pair_weights
from .similarity import logits, similarity


@triton.jit
def row_labels(labels_ptr, rows, valid, views, words, label_kind):
    """(image, number of labels) of each row (the count for multi-hot labels only)."""
    images = rows // views
    if label_kind == MULTI_HOT:
        count = label_counts(labels_ptr, images, valid, words)
    else:
        count = tl.zeros(rows.shape, dtype=tl.int32)
    return images, count


@triton.jit
def pair_tile(z_ptr, zlo_ptr, labels_ptr, limits_ptr, M, D, words, views, label_kind,
              weighting, cid_positive, inv_t, rows, valid_r, img_r, n_r, c0,
              ONE_CHUNK: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, ACC: tl.constexpr):
    """Columns c0 .. c0 + BN of the rows' block: (cols, valid_c, x, pair, w, b, b_lo) with x the
    logits, pair the mask of pairs that count (distinct rows, both in range), w the positive
    weights (0 off `pair`), b / b_lo the columns' feature blocks (see `similarity`)."""
    cols = c0 + tl.arange(0, BN)
    valid_c = cols < M
    s, b, b_lo = similarity(z_ptr, zlo_ptr, D, rows, valid_r, cols, valid_c, ONE_CHUNK, PREC,
                            BK, ACC)
    x = logits(s, inv_t)
    pair = valid_r[:, None] & valid_c[None, :] & (rows[:, None] != cols[None, :])
    w = pair_weights(labels_ptr, limits_ptr, words, label_kind, weighting, cid_positive,
                     img_r, n_r, valid_r, cols // views, valid_c, ACC)
    return cols, valid_c, x, pair, tl.where(pair, w, 0.0), b, b_lo
