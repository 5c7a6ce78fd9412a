"""The native CPU kernel's instruction-set paths, which of them this machine can run, and why not.

Shared by the CPU test files (each forced path is tested wherever the CPU allows) and by conftest's
report header, which names every path that could not run here with the kernel's own reason -- so a
skip is never silent.
"""
import os

import pytest

from vqkernels import native

# Every path the package knows, fastest first (x86-64 and aarch64 together: a machine runs a subset).
ISAS = ["avx512bf16", "avx512", "avx512_i16", "avx512_vnni_i16", "avx512_vnni_i8", "avx2", "avx2_i16",
        "avx2_i8", "neon", "neon_dot", "scalar"]


def isa_skip_reason(isa):
    """None when this machine runs `isa` when forced through VQK_CPU_ISA; else the reason."""
    status = native.cpu_status()
    if status is not None:
        return f"native CPU kernel: {status}"
    old = os.environ.get("VQK_CPU_ISA")
    os.environ["VQK_CPU_ISA"] = isa
    try:
        got = native.module().cpu_isa()
        return None if got == isa else f"VQK_CPU_ISA={isa} ran the {got} kernels"
    except (RuntimeError, ValueError) as e:
        return str(e)
    finally:
        if old is None:
            del os.environ["VQK_CPU_ISA"]
        else:
            os.environ["VQK_CPU_ISA"] = old


SKIP_REASONS = {isa: isa_skip_reason(isa) for isa in ISAS}

ISA_PARAMS = [pytest.param(i, id=i, marks=[] if SKIP_REASONS[i] is None else
                           [pytest.mark.skip(reason=f"cannot run the {i} kernels here: {SKIP_REASONS[i]}")])
              for i in ISAS]


def report_lines():
    ran = [i for i in ISAS if SKIP_REASONS[i] is None]
    lines = [f"  CPU kernel paths tested here: {', '.join(ran) or 'none'}"]
    for i, r in SKIP_REASONS.items():
        if r:
            where = " (its kernel checks run under qemu-aarch64: .ci/native_checks.sh aarch64)" \
                if i in ("neon", "neon_dot") else \
                " (its kernel checks run emulated through SIMDe, behaviour only: .ci/native_checks.sh" \
                " x86-emulated)" if i.startswith("avx512") else ""
            lines.append(f"  CPU kernel path {i} NOT tested here: {r}{where}")
    return lines
