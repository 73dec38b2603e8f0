"""Device side of the similarities: tiles of S = Z Zᵀ on tensor cores, and the logits x = s / T.

Precisions (`PREC`, a constexpr; `config.precision` picks it):
* TF32: float32 features with torch.backends.cuda.matmul.allow_tf32; the tensor core reads the
  tf32 part of each operand (truncation), as in TF32 matmuls.
* TF32X3: float32 features otherwise: z = hi + lo with hi = tf32(z) (planes made once per call
  by `op.tf32_planes`); S = hi·hiᵀ + (hi·loᵀ + lo·hiᵀ) in three accumulators (float32-FMA
  accuracy). Summed in that order, exchanging the two operands exchanges the two small terms
  only, so s_ab == s_ba bit for bit (Triton's own "tf32x3" adds them into one accumulator one
  after the other, which is not symmetric).
* F16, BF16: 16-bit operands, float32 accumulators. F64: float64 throughout (DMMA on sm_90).

Both kernels compute every logit with `logits` from the same tiles, so the backward sees the very
x of the forward (the op contract requires it: p_ab = exp(x_ab - lse_a) then sums to 1 to rounding
even where one ulp of x is large), and uses s_ab for s_ba (symmetric products).
"""
import triton
import triton.language as tl

# Precision codes (tl.constexpr so that kernels may read them; Python: `.value`).
TF32 = tl.constexpr(0)
TF32X3 = tl.constexpr(1)
F16 = tl.constexpr(2)
BF16 = tl.constexpr(3)
F64 = tl.constexpr(4)


@triton.jit
def round_tf32(x):
    """Nearest tf32 (ties away from zero), kept in a float32 (see also `op.tf32_planes`)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def load_block(z_ptr, rows, valid, D, k0, BK: tl.constexpr):
    """Z[rows, k0 : k0 + BK], zero outside the valid rows and past D."""
    cols = k0 + tl.arange(0, BK)
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    return tl.load(z_ptr + offsets, mask=valid[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def dot_nt(a_hi, a_lo, b_hi, b_lo, acc, acc_hl, acc_lh, PREC: tl.constexpr):
    """acc (+ the two TF32X3 cross terms) += A Bᵀ for one K block."""
    if PREC == TF32X3:
        acc = tl.dot(a_hi, tl.trans(b_hi), acc, input_precision="tf32")
        acc_hl = tl.dot(a_hi, tl.trans(b_lo), acc_hl, input_precision="tf32")
        acc_lh = tl.dot(a_lo, tl.trans(b_hi), acc_lh, input_precision="tf32")
    elif PREC == TF32:
        acc = tl.dot(a_hi, tl.trans(b_hi), acc, input_precision="tf32")
    elif PREC == F64:
        acc = tl.dot(a_hi, tl.trans(b_hi), acc, input_precision="ieee")
    else:
        acc = tl.dot(a_hi, tl.trans(b_hi), acc)
    return acc, acc_hl, acc_lh


@triton.jit
def similarity(z_ptr, zlo_ptr, D, rows_a, valid_a, rows_b, valid_b,
               ONE_CHUNK: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr,
               ACC: tl.constexpr):
    """(s, b, b_lo): s[BM, BN] = Z[rows_a] · Z[rows_b]ᵀ accumulated in ACC, and the B blocks.

    z_ptr holds the features (TF32X3: their tf32 hi plane, zlo_ptr the lo plane; the planes come
    from global memory, so blocks go straight to shared memory for the tensor cores with no split
    in registers). ONE_CHUNK (D <= BK): one K block, returned for the caller to reuse;
    otherwise K is streamed in blocks of BK (the returned blocks are dummies). A is reloaded for
    every column tile rather than held in registers, which go to the epilogue."""
    BM: tl.constexpr = rows_a.shape[0]
    BN: tl.constexpr = rows_b.shape[0]
    acc = tl.zeros((BM, BN), dtype=ACC)
    if PREC == TF32X3:
        acc_hl = tl.zeros((BM, BN), dtype=ACC)
        acc_lh = tl.zeros((BM, BN), dtype=ACC)
    else:
        acc_hl = tl.zeros((1, 1), dtype=ACC)
        acc_lh = tl.zeros((1, 1), dtype=ACC)
    if ONE_CHUNK:
        b = load_block(z_ptr, rows_b, valid_b, D, 0, BK)
        a = load_block(z_ptr, rows_a, valid_a, D, 0, BK)
        if PREC == TF32X3:
            b_lo = load_block(zlo_ptr, rows_b, valid_b, D, 0, BK)
            a_lo = load_block(zlo_ptr, rows_a, valid_a, D, 0, BK)
        else:
            b_lo = b
            a_lo = a
        acc, acc_hl, acc_lh = dot_nt(a, a_lo, b, b_lo, acc, acc_hl, acc_lh, PREC)
    else:
        b = tl.zeros((1, 1), dtype=ACC)  # nothing to reuse: the caller loads its own blocks
        b_lo = b
        for k0 in range(0, D, BK):
            p = load_block(z_ptr, rows_a, valid_a, D, k0, BK)
            q = load_block(z_ptr, rows_b, valid_b, D, k0, BK)
            if PREC == TF32X3:
                p_lo = load_block(zlo_ptr, rows_a, valid_a, D, k0, BK)
                q_lo = load_block(zlo_ptr, rows_b, valid_b, D, k0, BK)
            else:
                p_lo = p
                q_lo = q
            acc, acc_hl, acc_lh = dot_nt(p, p_lo, q, q_lo, acc, acc_hl, acc_lh, PREC)
    if PREC == TF32X3:
        acc = acc + (acc_hl + acc_lh)
    return acc, b, b_lo


@triton.jit
def logits(s, inv_t):
    """x = s / T as RN(s * (1/T)). An explicit fma with a zero addend: the compiler may fuse a
    plain product into a later subtraction (x - max in the forward, x - lse in the backward),
    which would round x differently in the two kernels."""
    return tl.fma(s, inv_t, 0.0)
