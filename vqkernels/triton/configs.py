"""Block shapes for the search kernel: a small autotune set per input dtype, and the rules that
fix everything the autotuner does not choose.

Why these shapes. The search is a GEMM (rows x codes x D) whose epilogue reduces each distance
tile across its columns to the rows' running best two (a few registers per row). Its registers go
to the (BLOCK_N, BLOCK_K) distance tile plus the operand and pointer tiles. Compiled with ptxas
(python -m vqkernels.triton.aot), 128 x 64 on 8 warps takes 116 registers on sm_90 at D=256 for
16-bit input (it took 170 when every column kept its own running best and code); 3xTF32 for
fp32 input keeps the split operands in registers too, and fp64 takes two registers a value, so
those stay at 16 distances per thread. 128 x 128 tiles (64 distances per thread, n = 128 wgmma
on sm_90) compile without spills for 16-bit input; they are in the set, untimed on a GPU so far.
The codebook tile (BLOCK_K x BLOCK_D) is what the pipeline stages hold in
shared memory, next to the resident row tile.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import triton

# (BLOCK_N, BLOCK_K, num_warps, num_stages)
_SHAPES_16 = [
    (128, 64, 8, 3),   # the large-N workhorse: wgmma on sm_90, 32 distances per thread
    (128, 128, 8, 3),  # n = 128 wgmma on sm_90 (two warpgroups of 64 x 128): half the operand
                       # traffic per MAC of n = 64; 64 distances per thread. Two stages at D = 256.
    (64, 128, 8, 3),
    (64, 64, 4, 3),
    (32, 64, 4, 2),    # few rows per program: more programs when N is small
    (16, 128, 4, 3),   # a handful of rows (one image) against a large codebook, split along K
]
# fp32 runs 3xTF32 (three MMAs per product on hi/lo splits of both operands).
_SHAPES_32 = [
    (64, 32, 4, 3),
    (128, 32, 8, 3),
    (32, 64, 4, 3),
    (16, 64, 4, 3),
]
# fp64 goes through DMMA (sm_80+) at a small fraction of the 16-bit rate: modest tiles.
_SHAPES_64 = [
    (32, 64, 4, 2),
    (32, 32, 4, 2),
    (16, 64, 4, 2),
]

# Distances per thread (BLOCK_N * BLOCK_K / threads) each dtype can afford (see above).
_MAX_PER_THREAD = {2: 64, 4: 16, 8: 16}
# Shared memory a config may ask for when the device's limit is unknown: sm_80's opt-in limit.
DEFAULT_SMEM = 163 * 1024


def elem_bytes(dtype_name: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype_name]


class DLayout(NamedTuple):
    """How the search covers a row of width D, `padded` columns in all: either one resident main
    tile of `block_d` columns plus up to three narrower power-of-two `tails` (>= 16 columns), the
    row tile staying resident for the whole codebook sweep (padded: D rounded up to a multiple
    of 16), or `chunks` > 1 tiles of `block_d` streamed one by one with each code tile (padded:
    D rounded up to a multiple of block_d)."""
    block_d: int
    chunks: int
    tails: tuple
    padded: int

    @property
    def resident(self) -> int:
        """Columns of the row tile loaded once per program (0: streamed)."""
        return self.padded if self.chunks == 1 else 0


def _pow2_parts(n: int) -> list:
    """n (a multiple of 16) as decreasing powers of two: its binary digits."""
    return [1 << b for b in range(n.bit_length() - 1, 3, -1) if n >> b & 1]


def d_layout(D: int, dtype_name: str, block_d: Optional[int] = None) -> DLayout:
    """The D tiling of the search for rows of width D (see DLayout).

    Up to 512 bytes of a row stay resident (D <= 256 for 16-bit input, 128 for fp32, 64 for
    fp64); wider rows are streamed in 128-byte chunks (`block_d` forces the chunk width). The
    part below one tile is not padded to the next power of two (D = 129 ran 256-deep MMAs,
    D = 192 a third more than needed; review F12) but cut into power-of-two pieces down to 16,
    the K step of the 16-bit MMAs: 192 = 128 + 64, 129 -> 144 = 128 + 16. Each piece is one more
    tl.dot into the same accumulator. A D that is a multiple of 16 then runs exactly D deep and
    reads the caller's codebook in place; only other widths need the zero-padded copy. (A
    streamed D keeps whole chunks: see below.)"""
    esz = elem_bytes(dtype_name)
    padded = -(-max(D, 1) // 16) * 16
    if block_d is None:
        block_d = padded if padded * esz <= 512 else max(16, 128 // esz)
    while True:
        parts = _pow2_parts(padded)
        if padded > block_d:
            # Streamed: whole chunks, the last one zero-padded. Tails after the chunk loop cost a
            # prefetch (a tile loaded outside the pipelined loop is stored to shared memory at
            # once) and registers: ptxas spilled the 32 x 64 sm_90 config at D = 272; and this
            # path is bound by L2 traffic, not by the MMAs a tail would save (review F11).
            chunks = -(-padded // block_d)
            return DLayout(block_d, chunks, (), chunks * block_d)
        if len(parts) <= 4:           # resident: the largest part is the main tile, then up to
            return DLayout(parts[0], 1, tuple(parts[1:]), padded)   # three tails
        padded += parts[-1]           # more parts (only a forced block_d): round the smallest up


def block_d(D: int, dtype_name: str) -> int:
    """Width of the main D tile (see d_layout)."""
    return d_layout(D, dtype_name).block_d


def epilogue_d(bd: int) -> int:
    # The epilogue holds x, e1 and e2 chunks in fp32 for BLOCK_N rows: 32 wide keeps it small.
    return min(bd, 32)


def shapes(dtype_name: str):
    return {"float16": _SHAPES_16, "bfloat16": _SHAPES_16, "float32": _SHAPES_32,
            "float64": _SHAPES_64}[dtype_name]


def smem_estimate(bn: int, bk: int, stages: int, layout: DLayout, dtype_name: str) -> int:
    """Shared memory of a config (bytes), as Triton lays it out: each pipeline stage holds a
    codebook tile of every piece (and, with D chunked, a row chunk); the resident part of the
    row tile is held once. 3xTF32 keeps fp32 tiles twice over. Checked against the compiled
    kernels by tests/test_triton_aot.py."""
    esz = elem_bytes(dtype_name) * (2 if dtype_name == "float32" else 1)
    if layout.chunks == 1:
        stage = bk * layout.padded * esz
    else:  # a row chunk and a code chunk per stage
        stage = (bk + bn) * layout.block_d * esz
    return stages * stage + bn * layout.resident * esz


def fits(bn: int, bk: int, warps: int, stages: int, layout: DLayout, dtype_name: str,
         smem_limit: int = DEFAULT_SMEM) -> bool:
    per_thread = bn * bk / (32 * warps)
    if per_thread > _MAX_PER_THREAD[elem_bytes(dtype_name)]:
        return False
    return smem_estimate(bn, bk, stages, layout, dtype_name) <= smem_limit


def configs(dtype_name: str, D: int, smem_limit: int = DEFAULT_SMEM) -> list[triton.Config]:
    """The autotune set for one dtype and D on a device with `smem_limit` bytes per program.
    A shape that would not fit loses a pipeline stage before it is dropped."""
    lay = d_layout(D, dtype_name)
    out = []
    for bn, bk, w, s in shapes(dtype_name):
        while s > 2 and not fits(bn, bk, w, s, lay, dtype_name, smem_limit):
            s -= 1
        if fits(bn, bk, w, s, lay, dtype_name, smem_limit):
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    # Never empty: the smallest tile fits any device Triton supports.
    return out or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=2)]


def tune_bucket(N: int) -> int:
    """Autotune key for N: powers of two up to 2^16 rows; past that the best shape stops moving."""
    return min(triton.next_power_of_2(max(N, 1)), 1 << 16)


def choose_split(N: int, K: int, num_sms: int | None) -> int:
    """Programs along K. Splitting K only pays when the row blocks alone don't fill the GPU (few
    rows, large codebook); each split then keeps at least 8 codebook tiles of 128 to amortize its
    partial results, and the total aims at two waves."""
    if not num_sms:
        return 1
    row_blocks = triton.cdiv(N, 128)
    if row_blocks >= num_sms:
        return 1
    return max(1, min(triton.cdiv(2 * num_sms, row_blocks), K // (8 * 128)))
