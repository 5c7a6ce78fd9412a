"""Static reading of compiled GPU code (SASS), without a GPU: what the hot loop of a kernel does.

Used by the AOT report of the Triton kernels (vqkernels.triton.aot) and by the CUDA build check
(tests/test_cuda_sass.py, `python -m vqkernels.triton.aot --cuda`). Both give a cubin; nvdisasm
(shipped with Triton's NVIDIA backend, or the CUDA toolkit's) turns it into SASS, and this module
reads, per kernel:

  * the hot loop: the innermost loop (a backward branch and its target) that holds the
    tensor-core instructions; nested loops inside it (a copy loop, say) count as part of it;
  * the tensor-core instructions per iteration of that loop (HMMA = mma.sync, HGMMA = wgmma,
    DMMA = fp64 MMA, counted statically: a conditional block counts as if taken), and the widest
    wgmma N (HGMMA.64xNx16): n = 64 halves the operand reuse of n = 128-256;
  * dependent global loads: a global load (LDG / LD) inside the loop whose value is read later in
    the same iteration with no tensor-core instruction in between, so every iteration waits one
    memory latency with the tensor cores idle (F2: x loaded element by element and stored to
    shared memory at once; F6: the code norms loaded after the wgmma wait and used by the next
    FADD). A load whose value is only read in a later iteration (a prefetch) or whose latency is
    covered by MMAs is not dependent. cp.async (LDGSTS) is asynchronous and never counts;
  * calls in the loop (the 64-bit integer division is a subroutine call on the GPU).

These are static facts of one compile, not timings: they tell whether the structure a fast
kernel needs is there, and the tests fail when a change loses it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import NamedTuple, Optional

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
_FUNC = re.compile(r"^\s*\.text\.(\S+):")
_TARGET = re.compile(r"`\(([^)]+)\)")
_REG = re.compile(r"(?<![\w.])R(\d+)(\.64)?(?![\w])")
# Opcodes whose first operand is not a register they write.
_NO_DEST = ("ST", "RED", "LDGSTS", "BRA", "BAR", "CALL", "EXIT", "RET", "MEMBAR", "FENCE",
            "WARPGROUP", "DEPBAR", "LDGDEPBAR", "SYNCS", "UTMA", "ARRIVES", "ERRBAR", "CCTL",
            "BSYNC", "BSSY", "WARPSYNC", "NOP", "YIELD", "BMOV", "JMP", "BREAK", "UBLKCP")
TENSOR_OPS = ("HMMA", "HGMMA", "DMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "UTCHMMA")


class Instr(NamedTuple):
    addr: int
    pred: str        # "" or the guard, e.g. "!P0"
    op: str          # full opcode with modifiers, e.g. "LDG.E.U16"
    operands: tuple

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def width(self) -> int:
        """Registers a load writes / a store reads, from the opcode's size suffix."""
        mods = self.op.split(".")[1:]
        return 4 if "128" in mods else 2 if "64" in mods else 1

    def dests(self) -> set:
        if not self.operands or self.base.startswith(_NO_DEST) or self.base in ("ST", "STS",
                                                                                 "STG", "STL"):
            return set()
        return _regs(self.operands[0], self.width() if self.base in ("LDG", "LD", "LDS", "LDL",
                                                                     "LDC") else 1)

    def uses(self) -> set:
        ops = self.operands if (not self.operands or self.base.startswith(_NO_DEST)) \
            else self.operands[1:]
        out = set()
        for i, o in enumerate(ops):
            # A store's data operand (the last) is as wide as the store.
            w = self.width() if self.base.startswith("ST") and i == len(ops) - 1 else 1
            out |= _regs(o, w)
        if self.pred:
            out.add(self.pred.lstrip("!"))
        return out


def _regs(operand: str, width: int = 1) -> set:
    out = set()
    for m in _REG.finditer(operand):
        n = int(m.group(1))
        w = max(width, 2 if m.group(2) else 1)
        out |= {f"R{n + i}" for i in range(w)}
    return out


class Loop(NamedTuple):
    start: int       # index of the first instruction (the branch target)
    end: int         # index of the backward branch


class LoopReport(NamedTuple):
    instructions: int            # static instructions in the hot loop (0: no loop holds MMAs)
    tensor_ops: int              # tensor-core instructions per iteration (static)
    tensor_kinds: str            # e.g. "HGMMA.64x64x16.F32.BF16" (distinct, joined by "+")
    wgmma_n: int                 # widest wgmma N (0 without wgmma)
    dependent_loads: tuple       # ("LDG.E.U16 -> STS.U16", ...) see module docstring
    calls: int                   # subroutine calls in the loop


def parse(sass: str) -> dict:
    """{function name: (instructions, {label: index})} from `nvdisasm -c` output."""
    funcs: dict = {}
    cur = None
    for line in sass.splitlines():
        if m := _FUNC.match(line):
            cur = funcs.setdefault(m.group(1), ([], {}))
            continue
        if cur is None:
            continue
        if m := _LABEL.match(line.strip()):
            cur[1][m.group(1)] = len(cur[0])
            continue
        if m := _INSTR.match(line):
            text = m.group(2).strip()
            pred = ""
            if text.startswith("@"):
                pred, text = text[1:].split(None, 1)
            op, _, rest = text.partition(" ")
            operands = tuple(o.strip() for o in rest.split(",")) if rest.strip() else ()
            cur[0].append(Instr(int(m.group(1), 16), pred, op, operands))
    return funcs


def loops(instrs, labels) -> list[Loop]:
    out = []
    for i, ins in enumerate(instrs):
        if ins.base == "BRA" and ins.operands:
            t = _TARGET.search(ins.operands[-1])
            if t and t.group(1) in labels and labels[t.group(1)] <= i:
                out.append(Loop(labels[t.group(1)], i))
    return out


def is_tensor(ins: Instr) -> bool:
    return ins.base in TENSOR_OPS


def hot_loop(instrs, labels) -> Optional[Loop]:
    """The smallest loop holding a tensor-core instruction."""
    best = None
    for lp in loops(instrs, labels):
        if any(is_tensor(instrs[i]) for i in range(lp.start, lp.end + 1)):
            if best is None or lp.end - lp.start < best.end - best.start:
                best = lp
    return best


def dependent_loads(instrs, lp: Loop, labels: Optional[dict] = None) -> list[str]:
    """See the module docstring. The walk from a load follows the path the load is on: an
    unconditional forward branch inside the loop (the jump over the other side of an if/else)
    continues at its target, so code of the branch not taken is not mistaken for a use."""
    out = []
    for i in range(lp.start, lp.end + 1):
        ins = instrs[i]
        if ins.base not in ("LDG", "LD"):
            continue
        live = set(ins.dests())
        mma = 0
        j = i + 1
        while j <= lp.end:
            nxt = instrs[j]
            if is_tensor(nxt):
                mma += 1
            if nxt.uses() & live:
                if mma == 0:
                    out.append(f"{ins.op} -> {nxt.op}")
                break
            if not nxt.pred:
                live -= nxt.dests()
            if not live:
                break
            if labels and nxt.base == "BRA" and not nxt.pred and nxt.operands:
                t = _TARGET.search(nxt.operands[-1])
                k = labels.get(t.group(1)) if t else None
                if k is not None and j < k <= lp.end:
                    j = k
                    continue
            j += 1
    return out


def analyse(instrs, labels, outer: bool = False) -> LoopReport:
    """The hot loop's facts. `outer`: the dependent loads of every loop around it are added,
    marked "outer:" (a D-chunked search runs its chunk loop inside the code-tile loop, which
    holds the norms' load: a stall there is paid once per code tile)."""
    lp = hot_loop(instrs, labels)
    if lp is None:
        return LoopReport(0, 0, "", 0, (), 0)
    body = instrs[lp.start:lp.end + 1]
    kinds = sorted({i.op for i in body if is_tensor(i)})
    ns = [int(m.group(1)) for i in body if i.base == "HGMMA"
          for m in [re.match(r"HGMMA\.\d+x(\d+)x", i.op)] if m]
    dep = dependent_loads(instrs, lp, labels)
    if outer:
        for o in loops(instrs, labels):
            if o != lp and o.start <= lp.start and lp.end <= o.end:
                dep += [f"outer: {d}" for d in dependent_loads(instrs, o, labels)
                        if f"outer: {d}" not in dep]
    return LoopReport(len(body), sum(is_tensor(i) for i in body), "+".join(kinds),
                      max(ns, default=0), tuple(dep), sum(_is_call(i, labels) for i in body))


def _is_call(ins: Instr, labels) -> bool:
    """A call of a subroutine (the 64-bit division, say). ptxas also emits CALL to a label of the
    same function as a way to reconverge a branch; that is control flow, not a call."""
    if ins.base != "CALL" or not ins.operands:
        return False
    t = _TARGET.search(ins.operands[-1])
    return not (t and t.group(1) in labels)


def count_ops(instrs, prefix: str) -> int:
    """Instructions of the whole function whose opcode starts with `prefix` (e.g. "LDG.E.U16")."""
    return sum(i.op.startswith(prefix) for i in instrs)


# ------------------------------------------------------------------------------------------------
# Tools and occupancy.

def tool(name: str) -> Optional[str]:
    """Path of nvdisasm / cuobjdump: Triton's bundled copy first, then the CUDA toolkit's."""
    try:
        import triton
        p = getattr(triton.knobs.nvidia, name).path
        if p and os.path.exists(p):
            return p
    except Exception:  # no triton, or a triton without knobs: fall back to PATH
        pass
    for cand in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and os.path.exists(cand):
            return cand
    return None


def disassemble(cubin: bytes) -> str:
    nd = tool("nvdisasm")
    if nd is None:
        raise FileNotFoundError("nvdisasm not found (Triton's NVIDIA backend or the CUDA toolkit)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nd, "-c", f.name], check=True, capture_output=True,
                              text=True).stdout


_RES_FUNC = re.compile(r"^\s*Function (\S+):")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin_path: str) -> dict:
    """{function: (registers, stack, static shared, local)} from `cuobjdump -res-usage`."""
    cu = tool("cuobjdump")
    if cu is None:
        raise FileNotFoundError("cuobjdump not found (Triton's NVIDIA backend or the CUDA toolkit)")
    text = subprocess.run([cu, "-res-usage", cubin_path], check=True, capture_output=True,
                          text=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        if m := _RES_FUNC.match(line):
            cur = m.group(1)
        elif (m := _RES.search(line)) and cur:
            out[cur] = tuple(int(v) for v in m.groups())
    return out


# Per SM: registers, shared memory (bytes, what CTAs can use), warps, CTAs; shared memory each CTA
# loses to the system (1 KiB on sm_80+).
SM_LIMITS = {80: (65536, 164 * 1024, 64, 32), 86: (65536, 100 * 1024, 48, 16),
             89: (65536, 100 * 1024, 48, 24), 90: (65536, 228 * 1024, 64, 32)}
_CTA_RESERVED = 1024


def ctas_per_sm(arch: int, regs: int, smem: int, warps: int) -> int:
    """Resident CTAs per SM (the occupancy calculator's rule: registers are allocated per warp in
    256-register units; each CTA also loses 1 KiB of shared memory to the system)."""
    rf, sm, max_w, max_c = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (rf // per_warp) // warps
    by_smem = sm // (smem + _CTA_RESERVED) if smem else max_c
    return max(0, min(by_regs, by_smem, max_w // warps, max_c))
