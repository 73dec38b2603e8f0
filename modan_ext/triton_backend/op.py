"""The ops `modan_ext::triton_supcon_fwd` / `triton_supcon_bwd`: the arguments of the C++ ops
`supcon_fwd` / `supcon_bwd` (ARCHITECTURE.md, "The op contract"), op contract v2.

Each op checks the raw problem (as the C++ ops check theirs), prepares the small
per-call tables with torch (threshold limits, per-row backward coefficients), launches one Triton
kernel, and finishes the per-row statistics in float64 with torch. Compiled, they are
`torch.library.triton_op`s: torch.compile traces through them down to the kernels. Interpreted
(TRITON_INTERPRET=1), they are opaque custom ops with the same Python as their fake kernel.

v2 outputs: loss [Ma] (float64 for float64 features, else float32) and stats [Ma, 5] float64 =
(lse, count, omega, norm, entropy); every entry NaN when a feature is not finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .. import ops
from ..options import FEATURE_DTYPES, WEIGHTING_CODES
from . import config, runtime, thresholds
from .backward import COEFFICIENTS, supcon_backward_kernel
from .forward import STATS, supcon_forward_kernel
from .labels import CLASS_IDS, MULTI_HOT
from .similarity import F16, TF32X3

NUM_WEIGHTINGS = len(WEIGHTING_CODES)
MAX_ROWS = 2**31 - 2**16  # row indices are int32 in the kernels


def _fail(message: str):
    raise RuntimeError(f"modan_ext (triton): {message}")


def check_problem(features, labels, label_kind, views, anchor_begin, anchor_end, temperature,
                  base_temperature, weighting, normalization) -> None:
    """The raw-op checks of the op contract (a clear error, never a kernel fault)."""
    runtime.check_device(features)
    if labels.device != features.device:
        _fail(f"labels are on {labels.device} but features on {features.device}")
    if features.dtype not in FEATURE_DTYPES:
        _fail(f"features must be float16, bfloat16, float32 or float64; got {features.dtype}")
    if features.dim() != 2 or not features.is_contiguous():
        _fail(f"features must be a contiguous [M, D] tensor; got shape {tuple(features.shape)}")
    if labels.dtype != torch.int64 or labels.dim() != 2 or not labels.is_contiguous():
        _fail("labels must be a contiguous int64 [B, W] tensor")
    if label_kind not in (MULTI_HOT.value, CLASS_IDS.value):
        _fail(f"label_kind must be {MULTI_HOT.value} (multi-hot) or {CLASS_IDS.value} (class "
              f"ids); got {label_kind}")
    if labels.size(1) < 1 or (label_kind == CLASS_IDS.value and labels.size(1) != 1):
        _fail(f"labels must have shape [B, 1] for class ids and [B, W >= 1] for multi-hot; got "
              f"{tuple(labels.shape)}")
    if views < 1:
        _fail(f"views must be >= 1; got {views}")
    rows = features.size(0)
    if rows % views != 0 or rows // views != labels.size(0):
        _fail(f"features.size(0) = {rows} must be labels.size(0) = {labels.size(0)} times "
              f"views = {views}")
    if rows > MAX_ROWS:
        _fail(f"at most {MAX_ROWS} rows; got {rows}")
    if not 0 <= anchor_begin <= anchor_end <= rows:
        _fail(f"the anchor range [{anchor_begin}, {anchor_end}) must lie within [0, {rows}]")
    for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
        if not (math.isfinite(value) and value > 0):
            _fail(f"{name} must be finite and > 0; got {value}")
    if not 0 <= weighting < NUM_WEIGHTINGS:
        _fail(f"weighting must be in 0..{NUM_WEIGHTINGS - 1}; got {weighting}")
    if normalization not in (0, 1):
        _fail(f"normalization must be 0 (count) or 1 (weight); got {normalization}")


ROW_ALIGN = 16  # elements: the kernels' row loads vectorise (and fit their registers) only so


def padded(features: torch.Tensor) -> torch.Tensor:
    """The features with rows zero-padded to a multiple of ROW_ALIGN elements (a copy, O(M·D),
    only when D is not one already): zero columns change no similarity, and the kernels then
    always read aligned rows (unaligned ones spill registers on sm_90; see codegen.py)."""
    extra = -features.shape[1] % ROW_ALIGN
    return torch.nn.functional.pad(features, (0, extra)) if extra else features


def tf32_planes(features: torch.Tensor, prec: int):
    """(hi, lo) operand planes of the features for the kernels: for TF32X3, hi = the nearest
    tf32 (ties away from zero, as cvt.rna.tf32.f32) and lo = features - hi, exactly (O(M·D)
    memory, made once per call so that no kernel splits blocks in registers); otherwise the
    features themselves, twice."""
    if prec != TF32X3.value:
        return features, features
    bits = (features.view(torch.int32) + 0x1000) & -0x2000  # -0x2000 == 0xFFFFE000
    hi = bits.view(torch.float32)
    return hi, features - hi


def _accumulation_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _anchors(views, anchor_begin, anchor_end, first_view_only):
    """(first anchor row, row step, number of anchors) of the anchor range."""
    if not first_view_only:
        return anchor_begin, 1, anchor_end - anchor_begin
    first = (anchor_begin + views - 1) // views * views
    return first, views, torch.sym_max(0, (anchor_end - first + views - 1) // views)


@dataclass
class Launch:
    """What both kernels take besides the problem: precision, tiles, the label rule's table and
    class-id flag, and the feature planes."""
    prec: int
    tiles: config.Tiles
    limits: torch.Tensor
    cid_positive: int
    hi: torch.Tensor  # the (padded) features, or their tf32 hi plane
    lo: torch.Tensor

    @property
    def dim(self) -> int:
        return self.hi.shape[1]


def prepare(features, labels, label_kind, views, anchor_begin, anchor_end, temperature,
            base_temperature, threshold, weighting, normalization, allow_tf32,
            backward: bool) -> Launch:
    """Check the raw problem and build the kernels' per-call inputs."""
    check_problem(features, labels, label_kind, views, anchor_begin, anchor_end, temperature,
                  base_temperature, weighting, normalization)
    prec = config.precision(features.dtype, allow_tf32)
    words = labels.size(1) if label_kind == MULTI_HOT.value else 1
    limits = thresholds.positive_limits(weighting, threshold, words, features.device)
    cid_positive = int(1.0 >= threshold)  # class ids: sim = 1 is a positive iff 1 >= threshold
    hi, lo = tf32_planes(padded(features), prec)
    return Launch(prec, config.tiles(prec, hi.shape[1], backward), limits, cid_positive, hi, lo)


def _finish_forward(raw, temperature, base_temperature, normalization, finite, loss_dtype):
    """loss [Ma], stats [Ma, 5] in float64 from the kernel's raw accumulators [Ma, 6]."""
    m, l, t, count, omega, q = raw.double().unbind(1)
    summed = l > 0  # the row has another row (M > 1) and is an anchor
    safe_l = torch.where(summed, l, torch.ones_like(l))
    log_l = torch.where(summed, torch.log(safe_l), torch.zeros_like(l))
    lse = torch.where(summed, m + log_l, torch.zeros_like(l))
    entropy = torch.where(summed, (log_l - t / safe_l).clamp_min(0), torch.zeros_like(l))
    counted = count > 0
    zero = torch.zeros_like(l)
    norm = torch.where(counted, count if normalization == 0 else omega, zero)
    loss = torch.where(counted, (temperature / base_temperature) * (omega * log_l - q)
                       / torch.where(counted, norm, torch.ones_like(l)), zero)
    stats = torch.stack([lse, torch.where(counted, count, zero), torch.where(counted, omega, zero),
                         norm, entropy], dim=1)
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(finite, loss, nan).to(loss_dtype)
    stats = torch.where(finite, stats, torch.full_like(stats, float("nan")))
    return loss, stats


def supcon_fwd(features: torch.Tensor, labels: torch.Tensor, label_kind: int, views: int,
               anchor_begin: int, anchor_end: int, first_view_only: bool, temperature: float,
               base_temperature: float, threshold: float, weighting: int, normalization: int,
               allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    run = prepare(features, labels, label_kind, views, anchor_begin, anchor_end, temperature,
                  base_temperature, threshold, weighting, normalization, allow_tf32, False)
    rows = features.shape[0]
    acc_dtype = _accumulation_dtype(features)
    a_first, a_step, n_anchors = _anchors(views, anchor_begin, anchor_end, first_view_only)
    params = torch.full((1,), 1.0 / temperature, dtype=acc_dtype, device=features.device)
    raw = torch.zeros(anchor_end - anchor_begin, STATS.value, dtype=acc_dtype,
                      device=features.device)
    tiles = run.tiles
    grid = (torch.sym_max(1, triton.cdiv(n_anchors, tiles.block_m)),)
    runtime.launch(supcon_forward_kernel, grid, run.hi, run.lo, labels, run.limits, params, raw,
                   rows, run.dim, labels.size(1), views, anchor_begin, a_first, a_step, n_anchors,
                   label_kind, weighting, run.cid_positive,
                   PREC=run.prec, ONE_CHUNK=tiles.one_chunk, BM=tiles.block_m,
                   BN=tiles.block_n, BK=tiles.block_k, num_warps=tiles.num_warps,
                   num_stages=tiles.num_stages)
    finite = torch.isfinite(features).all()
    loss_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    return _finish_forward(raw, temperature, base_temperature, normalization, finite,
                           loss_dtype)


def _row_coefficients(grad_loss, stats, rows, anchor_begin, anchor_end, base_temperature,
                      acc_dtype):
    """[M, 4] (lse_hi, lse_lo, ca, cb) per row: ca = grad_loss omega / (T_base norm),
    cb = grad_loss / (T_base norm) for counted anchors; lse = lse_hi + lse_lo with lse_hi the
    accumulation dtype's rounding of the float64 lse. Other rows: (+inf, 0, 0, 0)."""
    lse, count, omega, norm = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
    counted = count > 0
    coef = torch.where(counted, grad_loss.double()
                       / (base_temperature * torch.where(counted, norm, torch.ones_like(norm))),
                       torch.zeros_like(norm))
    inf = torch.full_like(lse, float("inf"))
    lse_hi = torch.where(counted, lse, inf).to(acc_dtype)
    lse_lo = torch.where(counted, lse - lse_hi.double(), torch.zeros_like(lse)).to(acc_dtype)
    part = torch.stack([lse_hi, lse_lo, (coef * omega).to(acc_dtype), coef.to(acc_dtype)], dim=1)
    out = torch.zeros(rows, COEFFICIENTS.value, dtype=acc_dtype, device=stats.device)
    out[:, 0] = float("inf")
    out[anchor_begin:anchor_end] = part
    return out


def _hz_scale(coef: torch.Tensor, prec: int) -> torch.Tensor:
    """float16: a power of two s with s·|H| < 2^14 (|H| <= 2 max(|ca| + |cb|)), so that H's hi
    and lo halves neither overflow nor lose their small entries; 1 otherwise."""
    one = torch.ones((), dtype=coef.dtype, device=coef.device)
    if prec != F16.value:
        return one
    bound = (coef[:, 2].abs() + coef[:, 3].abs()).amax() if coef.shape[0] else one
    _, exponent = torch.frexp(2 * bound.clamp_min(torch.finfo(torch.float32).tiny))
    exponent = (14 - exponent).clamp(-100, 100)
    scale = torch.ldexp(one, exponent)
    return torch.where(torch.isfinite(bound) & (bound > 0), scale, one)


def supcon_bwd(grad_loss: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
               stats: torch.Tensor, label_kind: int, views: int, anchor_begin: int,
               anchor_end: int, first_view_only: bool, temperature: float,
               base_temperature: float, threshold: float, weighting: int, normalization: int,
               allow_tf32: bool) -> torch.Tensor:
    run = prepare(features, labels, label_kind, views, anchor_begin, anchor_end, temperature,
                  base_temperature, threshold, weighting, normalization, allow_tf32, True)
    anchors = anchor_end - anchor_begin
    if stats.shape != (anchors, 5) or grad_loss.shape != (anchors,):
        _fail(f"stats must be [{anchors}, 5] and grad_loss [{anchors}] (the forward's outputs); "
              f"got {tuple(stats.shape)} and {tuple(grad_loss.shape)}")
    rows, dim = features.shape
    acc_dtype = _accumulation_dtype(features)
    coef = _row_coefficients(grad_loss, stats, rows, anchor_begin, anchor_end, base_temperature,
                             acc_dtype)
    scale = _hz_scale(coef, run.prec)
    inv_t = torch.full((), 1.0 / temperature, dtype=acc_dtype, device=features.device)
    params = torch.stack([inv_t, scale, 1 / scale])
    grad = torch.empty(rows, run.dim, dtype=features.dtype, device=features.device)
    tiles = run.tiles
    grid = (triton.cdiv(rows, tiles.block_m), triton.cdiv(run.dim, tiles.block_d))
    runtime.launch(supcon_backward_kernel, grid, run.hi, run.lo, labels, run.limits, params,
                   coef, grad, rows, run.dim, labels.size(1), views, anchor_begin, anchor_end,
                   int(first_view_only), label_kind, weighting, run.cid_positive,
                   PREC=run.prec, ONE_CHUNK=tiles.one_chunk, BM=tiles.block_m,
                   BN=tiles.block_n, BK=tiles.block_k, BD=tiles.block_d,
                   num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if run.dim != dim:
        grad = grad[:, :dim].contiguous()
    finite = torch.isfinite(features).all()
    return torch.where(finite, grad, torch.full_like(grad, float("nan")))


# ---- registration --------------------------------------------------------------------------------

def _register(name: str, fn):
    if runtime.INTERPRETED:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # runtime.launch skips the kernels on fake tensors
        return op
    return torch.library.triton_op(name, fn, mutates_args=())


triton_supcon_fwd = _register("modan_ext::triton_supcon_fwd", supcon_fwd)
triton_supcon_bwd = _register("modan_ext::triton_supcon_bwd", supcon_bwd)


# The autograd formula, saving the inputs and refusing double backward are the C++ ops' own
# (modan_ext.ops).
triton_supcon_fwd.register_autograd(ops.backward_formula("triton_supcon_bwd"),
                                    setup_context=ops._setup_context)
triton_supcon_bwd.register_autograd(ops._no_double_backward, setup_context=ops._remember_nothing)
