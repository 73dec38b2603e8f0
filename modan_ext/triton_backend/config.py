"""Which kernel variant and tile sizes serve a problem: one table, read by the launcher and by
the codegen check (so the check compiles exactly what runs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .similarity import BF16, F16, F64, TF32, TF32X3

PRECISION_NAMES = {TF32.value: "tf32", TF32X3.value: "tf32x3", F16.value: "fp16",
                   BF16.value: "bf16", F64.value: "fp64"}


def precision(dtype: torch.dtype, allow_tf32: bool) -> int:
    if dtype == torch.float32:
        return (TF32 if allow_tf32 else TF32X3).value
    return {torch.float16: F16, torch.bfloat16: BF16, torch.float64: F64}[dtype].value


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one kernel launch: rows BM, columns BN, feature block BK (the whole row when
    one_chunk), output columns BD (backward), warps and pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    block_d: int
    one_chunk: bool
    num_warps: int
    num_stages: int


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


# Feature dimension held whole in one K block (smallest and largest block): the row block's
# similarities take one tensor-core product per column tile. Above it K is streamed in blocks.
# Forward and backward use the same blocks, so that they compute every similarity alike. Few
# block sizes keep the number of compiled variants (and the codegen check) small; the largest
# are the largest without spills (fp16/bf16 D = 256 and fp64 D = 64 spill in the backward).
_ONE_CHUNK = {TF32.value: (64, 128), TF32X3.value: (64, 128), F16.value: (64, 128),
              BF16.value: (64, 128), F64.value: (32, 32)}
_STREAM_K = {TF32.value: 64, TF32X3.value: 32, F16.value: 64, BF16.value: 64, F64.value: 32}


def tiles(prec: int, dim: int, backward: bool) -> Tiles:
    """Chosen from sm_90 compilations (python -m modan_ext.triton_backend.codegen): 64 x 32
    tiles and 8 warps keep every variant free of spills; larger tiles spill in the epilogue
    (label weights, exponentials). The exact-float32 backward (TF32X3) splits the output columns
    in blocks of 64 (each block recomputes S): with all 128 in registers it spills."""
    smallest, largest = _ONE_CHUNK[prec]
    one_chunk = dim <= largest
    block_k = _pow2_at_least(dim, smallest) if one_chunk else _STREAM_K[prec]
    block_d = block_k if one_chunk else 64
    if backward and prec == TF32X3.value:
        block_d = min(block_d, 64)
    return Tiles(64, 32, block_k, block_d, one_chunk, 8, 2)
