"""Ahead-of-time compilation of the Triton kernels for given GPU archs, without a GPU.

Compiles every autotune config of the search kernel (and the other kernels at their fixed blocks,
the fused residual / grouped kernel of vqkernels.triton.residual included) to cubin for sm_80 /
sm_90 and reads ptxas' own report: registers per thread, spill bytes, and Triton's shared-memory
size; from those, the CTAs that fit on one SM of that arch. Then it reads
the SASS of the cubin (vqkernels.triton.sass): tensor-core instructions per iteration of the hot
loop and their kind, the widest wgmma N, and the global loads in the hot loop whose value is used
before any tensor-core instruction covers their latency ("dependent loads"). A spill in the hot
loop costs more than any block-shape win, and a dependent load stalls every iteration, so the
test suite (tests/test_triton_aot.py) asserts there are none.

    python -m vqkernels.triton.aot            # the table for sm_80 and sm_90
    python -m vqkernels.triton.aot --cuda     # the same for the CUDA kernels (csrc/cuda, nvcc)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import re
import shutil
import tempfile
from typing import NamedTuple, Optional


def build_parser():
    from .. import _cli
    p = _cli.ArgumentParser(
        prog="python -m vqkernels.triton.aot", formatter_class=_cli.DefaultsHelpFormatter,
        description="Compile every Triton kernel config for sm_80 and sm_90 without a GPU and "
                    "print ptxas' registers, spills and shared memory, and the SASS hot-loop "
                    "analysis, one line per kernel and config (needs triton; many minutes on a "
                    "CPU). --cuda: the same for the CUDA kernels (needs nvcc and a source "
                    "checkout).")
    p.add_argument("--cuda", action="store_true", help="report the CUDA kernels instead")
    p.add_argument("--json", nargs=4, metavar=("KIND", "ARCH", "DTYPE", "D"),
                   help="(internal, reports_in_subprocess) one batch of reports as JSON: KIND is "
                        "search, other or residual")
    return p


if __name__ == "__main__":
    # --help and argument errors answer before triton is imported (seconds on a loaded CPU), and
    # a mistyped flag no longer starts the full compile.
    _ARGS = build_parser().parse_args()

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs as cfg
from . import kernels as K_
from . import sass

# Opt-in shared memory per block (bytes): the most a program may ask for on each arch.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


class Report(NamedTuple):
    kernel: str
    arch: int
    dtype: str
    D: int
    config: str
    registers: int
    spill_store: int
    spill_load: int
    shared: int
    mma: str  # "wgmma", "mma" or "none": whether the tensor cores were used, and how
    warps: int = 0
    ctas_per_sm: int = 0          # resident CTAs on one SM of `arch` (registers, smem, warps)
    # From the SASS (None where nvdisasm is missing): see vqkernels.triton.sass.LoopReport.
    tensor_ops: Optional[int] = None      # tensor-core instructions per hot-loop iteration
    tensor_kinds: Optional[str] = None
    wgmma_n: Optional[int] = None
    dependent_loads: Optional[list] = None
    calls: Optional[int] = None


def _compile(fn, signature: dict, constexprs: dict, div16: set, arch: int, num_warps: int,
             num_stages: int, maxnreg: Optional[int] = None, outer: bool = False):
    names = fn.arg_names
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"{fn.__name__}: no type given for {missing}")
    signature = {n: signature[n] for n in names}  # in argument order, as the JIT builds it
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div16}
    src = ASTSource(fn, signature, constexprs, attrs)
    target = GPUTarget("cuda", arch, 32)
    from triton.compiler import make_backend
    backend = make_backend(target)
    opts = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages,
                                  **({"maxnreg": maxnreg} if maxnreg else {})})
    log = io.StringIO()
    kn = triton.knobs
    saved = (kn.compilation.always_compile, kn.nvidia.dump_ptxas_log)
    kn.compilation.always_compile, kn.nvidia.dump_ptxas_log = True, True  # fresh ptxas report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=opts.__dict__)
    finally:
        kn.compilation.always_compile, kn.nvidia.dump_ptxas_log = saved
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        raise RuntimeError(f"could not read ptxas' report for {fn.__name__}:\n{text}")
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    nregs, smem = int(regs[-1]), compiled.metadata.shared
    loop = None
    if sass.tool("nvdisasm"):
        funcs = sass.parse(sass.disassemble(compiled.asm["cubin"]))
        if len(funcs) == 1:
            loop = sass.analyse(*next(iter(funcs.values())), outer=outer)
    extra = ((loop.tensor_ops, loop.tensor_kinds, loop.wgmma_n, list(loop.dependent_loads),
              loop.calls) if loop else (None,) * 5)
    return (nregs, int(spills[-1][0]), int(spills[-1][1]), smem, mma, num_warps,
            sass.ctas_per_sm(arch, nregs, smem, num_warps), *extra)


def _bound_consts(dtype: str) -> dict:
    unit, tiny, limit = K_.bound_units(dtype)
    return dict(UNIT=unit, TINY=tiny, LIMIT=limit)


def _row_sig(prefix: str, ptr: str) -> dict:
    # Contiguous rows: the element stride is 1, which Triton's JIT specializes to a constant.
    return {f"{prefix}_ptr": ptr, f"{prefix}_S": "i32", f"{prefix}_sb": "i32",
            f"{prefix}_ss": "i32"}


def compile_search(dtype: str, D: int, config: triton.Config, arch: int, fused: bool = True
                   ) -> Report:
    """The search kernel as the JIT would build it for contiguous (N, D) rows of `dtype`."""
    acc = "*fp64" if dtype == "float64" else "*fp32"
    p = _PTR[dtype]
    lay = cfg.d_layout(D, dtype)
    bd = lay.block_d
    tails = lay.tails + (0,) * (3 - len(lay.tails))
    sig = {"x_ptr": p, "N": "i32", "x_S": "i32", "D": "i32", "x_sb": "i32", "x_ss": "i32",
           "cb_ptr": p, "K": "i32", "cbp_ptr": p, "cbp_stride": "i32", "hn_ptr": acc,
           "e2_ptr": acc, **_row_sig("zq", p),
           "idx_ptr": "*i64", "err_ptr": acc, "cnt_ptr": "*i64",
           "nflag_ptr": "*i32", "frow_ptr": "*i64", "thr_ptr": acc,
           "pv1_ptr": acc, "pi1_ptr": "*i32", "pv2_ptr": acc, "TUNE_N": "i32"}
    const = dict(x_sd=1, zq_sd=1, ACC=tl.float64 if dtype == "float64" else tl.float32,
                 **_bound_consts(dtype),
                 PRECISION="tf32x3" if dtype == "float32" else "ieee", UPCAST=False, FUSED=fused,
                 WRITE_ZQ=True, BLOCK_D=bd, D_CHUNKS=lay.chunks, W1=tails[0], W2=tails[1],
                 W3=tails[2], EVEN_D=D >= bd * lay.chunks,
                 EPI_D=cfg.epilogue_d(bd), **config.kwargs, X_MODE=0, ZQ_MODE=0)
    # The codebook's row stride (the padded copy's, or D) is a multiple of 16 by construction.
    div16 = {k for k, v in sig.items() if v.startswith("*")} | {"K", "x_sb", "zq_sb", "TUNE_N",
                                                               "cbp_stride"}
    if D % 16 == 0:
        div16 |= {"D", "x_ss", "zq_ss"}
    # outer=True: with D chunked, the code-tile loop around the chunk loop holds the norms'
    # load (and anything added there later): a stall there is paid once per code tile.
    r = _compile(K_.vq_search_kernel, sig, const, div16, arch, config.num_warps,
                 config.num_stages, outer=True)
    pieces = (f"{bd}x{lay.chunks}" if lay.chunks > 1 else f"{bd}") + "".join(
        f"+{t}" for t in lay.tails)
    desc = (f"BLOCK_N={config.kwargs['BLOCK_N']} BLOCK_K={config.kwargs['BLOCK_K']} D:{pieces} "
            f"warps={config.num_warps} stages={config.num_stages}" + ("" if fused else " split"))
    return Report("vq_search", arch, dtype, D, desc, *r)


def compile_backward_rows(dtype: str, D: int, arch: int, atomic: bool) -> Report:
    acc = "*fp64" if dtype == "float64" else "*fp32"
    p = _PTR[dtype]
    from .launch import backward_blocks
    bd, bn, warps = backward_blocks(D)
    sig = {"x_ptr": p, "N": "i32", "x_S": "i32", "D": "i32", "x_sb": "i32", "x_ss": "i32",
           "cb_ptr": p, "idx_ptr": "*i64", "idx_stride": "i32", **_row_sig("gzq", p),
           "gcm_ptr": acc, "gcm_stride": "i32", "gcb_ptr": acc, "gcb_stride": "i32",
           **_row_sig("gz", p), "gcbout_ptr": acc}
    const = dict(x_sd=1, gzq_sd=1, gz_sd=1, ACC=tl.float64 if dtype == "float64" else tl.float32,
                 HAS_GZQ=True, HAS_GCM=True, WRITE_GZ=True, ATOMIC_CB=atomic, BLOCK_N=bn,
                 BLOCK_D=bd, X_MODE=0, GZQ_MODE=0, GZ_MODE=0)
    div16 = {k for k, v in sig.items() if v.startswith("*")}
    r = _compile(K_.vq_backward_rows_kernel, sig, const, div16, arch, warps, 2)
    return Report("vq_backward_rows", arch, dtype, D,
                  f"BLOCK_N={bn} BLOCK_D={bd} warps={warps}" + (" atomic" if atomic else ""), *r)


def compile_backward_codebook(dtype: str, D: int, arch: int) -> list[Report]:
    """The deterministic codebook gradient's two levels (pieces of sorted rows, then their join)."""
    acc = "*fp64" if dtype == "float64" else "*fp32"
    p = _PTR[dtype]
    bd = min(64, max(16, triton.next_power_of_2(D)))
    ACC = tl.float64 if dtype == "float64" else tl.float32
    from .launch import PIECE_ROWS, JOIN_BLOCK_P
    sig = {"x_ptr": p, "x_S": "i32", "D": "i32", "x_sb": "i32", "x_ss": "i32", "cb_ptr": p,
           "K": "i32", "order_ptr": "*i64", "start_ptr": "*i64", "piece_code_ptr": "*i64",
           "piece_base_ptr": "*i64", "part_base_ptr": "*i64", "part_ptr": acc,
           "gcb_ptr": acc, "gcb_stride": "i32", "out_ptr": acc}
    const = dict(x_sd=1, PIECE=PIECE_ROWS, ACC=ACC, BLOCK_R=32, BLOCK_D=bd, X_MODE=0)
    div16 = {k for k, v in sig.items() if v.startswith("*")}
    r = _compile(K_.vq_backward_codebook_kernel, sig, const, div16, arch, 4, 2)
    jsig = {"D": "i32", "piece_base_ptr": "*i64", "part_base_ptr": "*i64", "part_ptr": acc,
            "out_ptr": acc}
    jr = _compile(K_.vq_backward_codebook_join_kernel, jsig,
                  dict(ACC=ACC, BLOCK_P=JOIN_BLOCK_P, BLOCK_D=bd),
                  {k for k, v in jsig.items() if v.startswith("*")}, arch, 4, 2)
    return [Report("vq_backward_codebook", arch, dtype, D,
                   f"BLOCK_R=32 BLOCK_D={bd} PIECE={PIECE_ROWS} warps=4", *r),
            Report("vq_backward_cb_join", arch, dtype, D,
                   f"BLOCK_P={JOIN_BLOCK_P} BLOCK_D={bd} warps=4", *jr)]


def compile_merge(dtype: str, D: int, arch: int) -> Report:
    acc = "*fp64" if dtype == "float64" else "*fp32"
    p = _PTR[dtype]
    bd = cfg.epilogue_d(cfg.block_d(D, dtype))
    sig = {"x_ptr": p, "N": "i32", "x_S": "i32", "D": "i32", "x_sb": "i32", "x_ss": "i32",
           "cb_ptr": p, "K": "i32", "e2_ptr": acc, **_row_sig("zq", p), "idx_ptr": "*i64",
           "err_ptr": acc, "cnt_ptr": "*i64", "nflag_ptr": "*i32", "frow_ptr": "*i64",
           "thr_ptr": acc, "pv1_ptr": acc, "pi1_ptr": "*i32", "pv2_ptr": acc, "n_split": "i32"}
    const = dict(x_sd=1, zq_sd=1, ACC=tl.float64 if dtype == "float64" else tl.float32,
                 **_bound_consts(dtype), WRITE_ZQ=True, BLOCK_N=64, BLOCK_D=bd, X_MODE=0,
                 ZQ_MODE=0)
    div16 = {k for k, v in sig.items() if v.startswith("*")}
    r = _compile(K_.vq_merge_kernel, sig, const, div16, arch, 4, 2)
    return Report("vq_merge", arch, dtype, D, f"BLOCK_N=64 BLOCK_D={bd} warps=4", *r)


def compile_exact(dtype: str, D: int, arch: int) -> Report:
    """The exact re-search of the flagged rows, at the launcher's fixed blocks."""
    acc = "*fp64" if dtype == "float64" else "*fp32"
    p = _PTR[dtype]
    from .launch import EXACT_BLOCKS
    br, bk, bdx, exd = EXACT_BLOCKS
    bd = min(bdx, max(16, triton.next_power_of_2(D)))
    sig = {"x_ptr": p, "x_S": "i32", "D": "i32", "x_sb": "i32", "x_ss": "i32",
           "cb_ptr": p, "K": "i32", "hn_ptr": acc, **_row_sig("zq", p), "idx_ptr": "*i64",
           "err_ptr": acc, "cnt_ptr": "*i64", "nflag_ptr": "*i32", "frow_ptr": "*i64",
           "thr_ptr": acc}
    const = dict(x_sd=1, zq_sd=1, ACC=tl.float64 if dtype == "float64" else tl.float32,
                 PRECISION="tf32x3" if dtype == "float32" else "ieee", UPCAST=False,
                 WRITE_ZQ=True, BLOCK_R=br, BLOCK_K=bk, BLOCK_D=bd, EX_D=exd, X_MODE=0, ZQ_MODE=0)
    div16 = {k for k, v in sig.items() if v.startswith("*")}
    if D % 16 == 0:
        div16 |= {"D", "x_ss", "zq_ss"}
    r = _compile(K_.vq_exact_kernel, sig, const, div16, arch, 4, 2)
    return Report("vq_exact", arch, dtype, D, f"BLOCK_R={br} BLOCK_K={bk} BLOCK_D={bd} "
                  f"EX_D={exd} warps=4", *r)


def compile_residual(D: int, arch: int, block_n: int, block_k: int, num_warps: int = 4,
                     has_act: bool = False, grouped: bool = False, block_dc: int = 0,
                     num_stages: int = 0) -> Report:
    """The fused residual kernel (vqkernels.triton.residual) as its launcher builds it for fp32
    rows of width D: all stages per row block (or, `grouped`, one group per program)."""
    from . import residual as R
    sig = {"x_ptr": "*fp32", "N": "i32", "D": "i32", "x_stride": "i32", "res_ptr": "*fp32",
           "cb_ptr": "*fp32",
           "koff_ptr": "*i64", "hn_ptr": "*fp32", "e2_ptr": "*fp32", "act_ptr": "*i64",
           "zq_ptr": "*fp32", "idx_ptr": "*i64", "err_ptr": "*fp32", "nflag_ptr": "*i32",
           "S": "i32"}
    bd = block_dc or R.block_d(D)
    const = dict(HAS_ACT=has_act, GROUPED=grouped, PRECISION="tf32x3", **_bound_consts("float32"),
                 BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=bd)
    div16 = {k for k, v in sig.items() if v.startswith("*")}
    if D % 16 == 0:
        div16 |= {"D", "x_stride"}
    stages = num_stages or R.NUM_STAGES
    r = _compile(R.rvq_kernel, sig, const, div16, arch, num_warps, stages, R.MAXNREG)
    return Report("rvq_grouped" if grouped else "rvq_fused", arch, "float32", D,
                  f"BLOCK_N={block_n} BLOCK_K={block_k} BLOCK_D={bd} warps={num_warps} "
                  f"stages={stages}" + (" active" if has_act else ""), *r)


# D of the residual kernel's report: DAC-like (unaligned, one chunk) and a 16-aligned D of 8 chunks
# (D is a runtime argument: 128 compiles to the same code as 256).
RESIDUAL_DS = (8, 256)


def residual_reports(arch: int, dtype: str = "float32", D: int = 128):
    """The residual kernel at the block shapes its launcher picks for D (with and without
    quantizer dropout), and the grouped launch."""
    from . import residual as R
    bn, bk, w = R.blocks(D)
    return [compile_residual(D, arch, bn, bk, w), compile_residual(D, arch, bn, bk, w, True),
            compile_residual(D, arch, bn, bk, w, grouped=True)]


# (dtype, D) pairs whose search configs are compiled: for 16-bit a small D, the widest resident D,
# a D between powers of two (128 + 64), an unaligned one (padded copy, three pieces 128 + 64 +
# 16) and a chunked D; fp32 resident and chunked; fp64. (fp16 compiles to the same code as bf16
# but for the MMA type.)
SEARCH_CASES = [
    ("bfloat16", 64), ("bfloat16", 256), ("bfloat16", 192), ("bfloat16", 200),
    ("bfloat16", 512),
    ("float32", 64), ("float32", 256), ("float64", 64),
]


def search_reports(arch: int, dtype: str, D: int):
    return [compile_search(dtype, D, c, arch) for c in cfg.configs(dtype, D, SMEM_LIMIT[arch])]


def other_reports(arch: int, dtype: str, D: int = 256):
    """The split-K search (first config), its merge, the exact re-search and the two backward
    kernels."""
    c = cfg.configs(dtype, D, SMEM_LIMIT[arch])[0]
    return [compile_search(dtype, D, c, arch, fused=False), compile_merge(dtype, D, arch),
            compile_exact(dtype, D, arch),
            compile_backward_rows(dtype, D, arch, atomic=True),
            *compile_backward_codebook(dtype, D, arch)]


def all_reports(archs=(80, 90)):
    for arch in archs:
        for dtype, D in SEARCH_CASES:
            yield from search_reports(arch, dtype, D)
        for dtype in ("bfloat16", "float32", "float64"):
            yield from other_reports(arch, dtype)
        for D in RESIDUAL_DS:
            yield from residual_reports(arch, "float32", D)


def format_report(r: Report) -> str:
    head = (f"sm_{r.arch} {r.kernel:<21} {r.dtype:<8} D={r.D:<4} {r.config:<52} "
            f"regs={r.registers:<3} spill={r.spill_store}/{r.spill_load} "
            f"smem={r.shared // 1024}KiB ctas/SM={r.ctas_per_sm} {r.mma}")
    if r.tensor_ops is None:
        return head + " (no nvdisasm: no SASS facts)"
    dep = len(r.dependent_loads)
    return (head + f" loop: {r.tensor_ops} {r.tensor_kinds or 'no tensor op'}"
            + (f" n={r.wgmma_n}" if r.wgmma_n else "")
            + f" dependent-loads={dep}" + (f" ({r.dependent_loads[0]})" if dep else "")
            + (f" calls={r.calls}" if r.calls else ""))


# ------------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda): the same facts from nvcc's cubins, through cuobjdump and nvdisasm.

CUDA_SOURCES = ("forward_mma.cu", "forward_simt.cu", "vq_cuda.cu", "backward.cu")
_CUDA_DTYPES = {"__nv_bfloat16": "bfloat16", "__half": "float16", "float": "float32",
                "double": "float64"}
# (BM, BN, BK, STAGES) of the search kernels' block tiles (csrc/cuda/common.cuh Cfg, the micros).
_CUDA_TILES = {"bfloat16": (128, 128, 32, 3), "float16": (128, 128, 32, 3),
               "float32": (128, 128, 16, 3), "float64": (64, 64, 8, 3)}


def cuda_search_smem(dtype: str, D: int, resident: bool) -> int:
    """Dynamic shared memory of the CUDA search kernel (mirrors SearchSmem::bytes, search.cuh):
    the rows' offsets, STAGES codebook chunks with 16-byte padded rows, and x (resident for all of
    D, or STAGES staged chunks)."""
    bm, bn, bk, stages = _CUDA_TILES[dtype]
    esz = cfg.elem_bytes(dtype)
    vk = 16 // esz
    dp = triton.cdiv(D, bk) * bk
    cs = bk + vk
    x = bm * (dp + vk) * esz if resident else stages * bm * cs * esz
    return bm * 8 + stages * bn * cs * esz + x


def _cuda_name(mangled: str) -> tuple[str, str, str]:
    """(kernel, dtype, variant) of a mangled vqk::cu kernel name, best effort."""
    kernel = re.search(r"vqk2cu\d*?(\d+)([a-z_]+)", mangled)
    name = kernel.group(2)[:int(kernel.group(1))] if kernel else mangled[:40]
    dtype = next((v for k, v in _CUDA_DTYPES.items() if k in mangled), "")
    if not dtype:  # plain types are mangled as one letter: f (float), d (double)
        m = re.search(r"I([fd])", mangled)
        dtype = {"f": "float32", "d": "float64"}.get(m.group(1), "") if m else ""
    variant = ""
    if name == "search_kernel":
        m = re.search(r"Lb([01])ELb([01])EEEvNS0_9FwdParams", mangled)
        xres, xv = (m.group(1), m.group(2)) if m else ("?", "?")
        variant = ("x resident" if xres == "1" else
                   "x staged cp.async" if xv == "1" else "x staged scalar (strided x)")
    elif m := re.search(r"ILb([01])E", mangled):
        variant = "atomic" if m.group(1) == "1" else "plain"
    return name, dtype, variant


def cuda_reports(cubin_path: str, arch: int, D: int = 256) -> list[Report]:
    """One Report per kernel of a cubin compiled from csrc/cuda. Shared memory is the static
    amount plus, for the search kernels, the dynamic amount they ask for at this D."""
    usage = sass.resource_usage(cubin_path)
    with open(cubin_path, "rb") as f:
        funcs = sass.parse(sass.disassemble(f.read()))
    out = []
    for mangled, (regs, stack, static, local) in sorted(usage.items()):
        if mangled not in funcs:
            continue
        name, dtype, variant = _cuda_name(mangled)
        smem = static
        if name == "search_kernel" and dtype:
            smem += cuda_search_smem(dtype, D, variant == "x resident")
        loop = sass.analyse(*funcs[mangled])
        mma = ("wgmma" if "HGMMA" in loop.tensor_kinds else
               "mma" if loop.tensor_ops else "none")
        out.append(Report(name, arch, dtype, D, variant + ("" if stack + local == 0 else
                                                           f" stack={stack} local={local}"),
                          regs, stack, local, smem, mma, 8,  # kThreads = 256 everywhere
                          sass.ctas_per_sm(arch, regs, smem, 8), loop.tensor_ops,
                          loop.tensor_kinds, loop.wgmma_n, list(loop.dependent_loads),
                          loop.calls))
    return out


def compile_cuda(source: str, arch: int, out_dir: str) -> str:
    """csrc/cuda/<source> to a cubin for sm_<arch> with the build's flags; its path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = os.path.join(root, "csrc", "cuda", source)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: the CUDA report needs a source checkout")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: the CUDA report needs the CUDA toolkit")
    out = os.path.join(out_dir, f"{os.path.splitext(source)[0]}.sm_{arch}.cubin")
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DVQK_WITH_CUDA",
           f"-I{os.path.join(root, 'csrc', 'include')}", f"-arch=sm_{arch}", "-cubin", "-o", out,
           src]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def reports_in_subprocess(kind: str, arch: int, dtype: str, D: int) -> list[Report]:
    """search_reports / other_reports run in a fresh interpreter without TRITON_INTERPRET: under
    the interpreter every @triton.jit function (triton.language's own included) is an
    interpreted one, which cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "vqkernels.triton.aot", "--json", kind, str(arch),
                          dtype, str(D)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"AOT compile failed:\n{out.stderr[-4000:]}")
    return [Report(*r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _main(a):
    if a.json:
        kind, arch, dtype, D = a.json[0], int(a.json[1]), a.json[2], int(a.json[3])
        fn = {"search": search_reports, "other": other_reports,
              "residual": residual_reports}[kind]
        with contextlib.redirect_stdout(sys.stderr):
            reps = fn(arch, dtype, D)
        print(json.dumps([list(r) for r in reps]))
        return
    if a.cuda:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in (80, 90):
                for src in CUDA_SOURCES:
                    for rep in cuda_reports(compile_cuda(src, arch, tmp), arch):
                        print(format_report(rep), flush=True)
        return
    for rep in all_reports():
        print(format_report(rep), flush=True)


if __name__ == "__main__":
    _main(_ARGS)
