"""The backward kernel: grad = H Z, H = G + Gᵀ, one row-owner pass, no atomics.

G_ab = grad_loss_a ∂ℓ_a/∂s_ab = ca_a p_ab - cb_a w_ab for the anchors (op contract), so
  H_rc = ca_r p_rc + ca_c p_cr - (cb_r + cb_c) w_rc,
built from the per-row coefficients of *both* rows (`op.py` computes them from the statistics:
lse split into float32 hi + lo, ca, cb; +inf / 0 / 0 for rows without a coefficient). A program
owns BM rows and BD output columns and walks the column tiles in a fixed order, accumulating
H_tile · Z_tile in registers: every gradient element is written once, by one program (bit-for-bit
reproducible). A row block without anchors only visits the tiles of the anchor range (Gᵀ is zero
elsewhere). S is recomputed with the forward's tile code, so x is the forward's x, and
p = exp((x - lse_hi) - lse_lo) never rounds lse to float32 (the op contract, v2).

H Z: TF32 reads H's tf32 part (the TF32 contract); TF32X3 splits H into tf32 hi + lo in
registers and takes Z's planes (three products: float32 accuracy); 16-bit splits H into hi + lo
halves of the features' dtype (float16: after scaling by a power of two that keeps |H| < 2^14);
float64 is plain.
"""
import triton
import triton.language as tl

from .similarity import F64, TF32, TF32X3, load_block, round_tf32
from .tile import pair_tile, row_labels

COEFFICIENTS = tl.constexpr(4)  # lse_hi, lse_lo, ca, cb (Python: `.value`)


@triton.jit
def load_coefficients(coef_ptr, rows, valid):
    base = coef_ptr + rows.to(tl.int64) * COEFFICIENTS
    lse_hi = tl.load(base + 0, mask=valid, other=float("inf"))
    lse_lo = tl.load(base + 1, mask=valid, other=0.0)
    ca = tl.load(base + 2, mask=valid, other=0.0)
    cb = tl.load(base + 3, mask=valid, other=0.0)
    return lse_hi, lse_lo, ca, cb


@triton.jit
def hz_product(h, z, z_lo, acc, hscale, PREC: tl.constexpr):
    """acc += H Z for one column tile (z in the features' dtype; TF32X3: the hi and lo planes)."""
    if PREC == TF32X3:
        h_hi = round_tf32(h)
        h_lo = h - h_hi
        # Three products subtracted from acc one by one rather than chained through one
        # accumulator (`acc += dot` would be fused into such a chain): Triton gives the last
        # link of a chain another register layout than the others, and acc would then be
        # shuffled through shared memory twice a tile.
        acc -= tl.dot(-h_hi, z, input_precision="tf32")
        acc -= tl.dot(-h_hi, z_lo, input_precision="tf32")
        acc -= tl.dot(-h_lo, z, input_precision="tf32")
    elif PREC == TF32:
        acc = tl.dot(h, z, acc, input_precision="tf32")
    elif PREC == F64:
        acc = tl.dot(h, z, acc, input_precision="ieee")
    else:
        scaled = h * hscale
        hi = scaled.to(z.dtype)
        lo = (scaled - hi.to(tl.float32)).to(z.dtype)
        acc = tl.dot(hi, z, acc)
        acc = tl.dot(lo, z, acc)
    return acc


@triton.jit(do_not_specialize=["views", "anchor_begin", "anchor_end", "first_view_only",
                                "label_kind", "weighting", "cid_positive"])
def supcon_backward_kernel(z_ptr, zlo_ptr, labels_ptr, limits_ptr, params_ptr, coef_ptr, grad_ptr,
                           M, D, words, views, anchor_begin, anchor_end, first_view_only,
                           label_kind, weighting, cid_positive,
                           PREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           BD: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if PREC == F64 else tl.float32
    r0 = tl.program_id(0) * BM
    rows = r0 + tl.arange(0, BM)
    valid_r = rows < M
    img_r, n_r = row_labels(labels_ptr, rows, valid_r, views, words, label_kind)
    inv_t = tl.load(params_ptr)
    hscale = tl.load(params_ptr + 1)
    lse_hi_r, lse_lo_r, ca_r, cb_r = load_coefficients(coef_ptr, rows, valid_r)

    # Does this row block hold an anchor? Then its G rows are dense: every column tile.
    lo = tl.maximum(r0, anchor_begin)
    hi = tl.minimum(tl.minimum(r0 + BM, M), anchor_end)
    if first_view_only != 0:
        lo = (lo + views - 1) // views * views
    has_anchor = lo < hi
    c_begin = tl.where(has_anchor, 0, anchor_begin // BN * BN)
    c_end = tl.where(has_anchor, M, anchor_end)

    d0 = tl.program_id(1) * BD
    acc = tl.zeros((BM, BD), dtype=ACC)
    for c0 in range(c_begin, c_end, BN):
        cols, valid_c, x, pair, w, b, b_lo = pair_tile(
            z_ptr, zlo_ptr, labels_ptr, limits_ptr, M, D, words, views, label_kind, weighting,
            cid_positive, inv_t, rows, valid_r, img_r, n_r, c0, ONE_CHUNK, PREC, BN, BK, ACC)
        lse_hi_c, lse_lo_c, ca_c, cb_c = load_coefficients(coef_ptr, cols, valid_c)
        p_r = tl.exp((x - lse_hi_r[:, None]) - lse_lo_r[:, None])
        p_c = tl.exp((x - lse_hi_c[None, :]) - lse_lo_c[None, :])
        h = ca_r[:, None] * p_r + ca_c[None, :] * p_c - (cb_r[:, None] + cb_c[None, :]) * w
        h = tl.where(pair, h, 0.0)
        if ONE_CHUNK and BD == BK:
            z = b  # the B blocks of the similarity are this tile's Z blocks
            z_lo = b_lo
        else:
            z = load_block(z_ptr, cols, valid_c, D, d0, BD)
            if PREC == TF32X3:
                z_lo = load_block(zlo_ptr, cols, valid_c, D, d0, BD)
            else:
                z_lo = z
        acc = hz_product(h, z, z_lo, acc, hscale, PREC)

    out_cols = d0 + tl.arange(0, BD)
    inv_scale = tl.load(params_ptr + 2)
    offsets = rows.to(tl.int64)[:, None] * D + out_cols[None, :]
    tl.store(grad_ptr + offsets, (acc * inv_scale).to(grad_ptr.dtype.element_ty),
             mask=valid_r[:, None] & (out_cols < D)[None, :])
