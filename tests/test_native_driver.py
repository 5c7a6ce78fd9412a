"""The native CPU kernels through their C++ API, with no Python in the loop: .ci/native_checks.sh
builds tests/native/kernel_check.cpp with the kernel sources and runs it (see that file for what it
checks against its float64 brute force).

  host     built with the host compiler: every search build this CPU runs (x86-64: avx2 and the
           AVX-512 ones where the CPU has them; scalar everywhere);
  aarch64  cross-compiled (g++-aarch64-linux-gnu) and run under qemu-user: the NEON build, the
           default on aarch64, the int8 dot-product pass (neon_dot) and the portable one on qemu's
           `max` CPU; then the run-time detection on a Cortex-A72 model (no dot product), which must
           refuse neon_dot and keep auto on neon. qemu shows behaviour, not speed.
  x86-emulated  the AVX-512 builds (avx512bf16, avx512, avx512_i16, avx512_vnni_i16,
           avx512_vnni_i8: the script's EMULATED list) compiled against SIMD Everywhere (libsimde-dev) instead of AVX-512
           instructions and run on this CPU, which need not have them: the driver's checks of a
           real AVX-512 (bf16) CPU, answers bit for bit. Emulation checks behaviour, not speed, and
           cannot catch a bug in SIMDe (or csrc/cpu/simde_avx512.h's shims, which
           tests/native/simde_check.cpp holds to Intel's documented semantics first) or in the
           compiler's real AVX-512 code generation.

Each build the driver could not run is its own skipped test, with the driver's reason, so no path
goes unreported. Nothing is installed from here (VQK_NO_APT=1); .ci/native_checks.sh installs the
cross toolchain and SIMDe itself when run as root.
"""
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "native_checks.sh"
ISAS = ["avx512bf16", "avx512", "avx512_i16", "avx512_vnni_i16", "avx512_vnni_i8", "avx2", "avx2_i16",
        "avx2_i8", "neon", "neon_dot", "scalar"]
# Where the aarch64 target's second run (the CPU without the dot product) begins.
DETECT = "== aarch64: run-time detection"
# The builds the x86-emulated target runs through SIMDe: the script's EMULATED list, in order.
EMULATED = re.findall(r'^\s*"VQK_HAVE_\w+=(\w+)=',
                      SCRIPT.read_text().split("EMULATED=(", 1)[1].split(")", 1)[0], re.M)


def _missing(target):
    """Why `target` cannot be built and run here, or None."""
    if shutil.which("bash") is None:
        return "bash is not installed"
    if target in ("host", "x86-emulated"):
        cxx = os.environ.get("CXX", "g++")
        if not shutil.which(cxx):
            return f"no host C++ compiler ({cxx}) on PATH"
        if target == "host":
            return None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"the x86-emulated check builds on an x86-64 host only, not {platform.machine()}"
        if not Path("/usr/include/simde/x86/avx512.h").is_file():
            return "the x86-emulated check needs SIMDe (apt-get install -y libsimde-dev)"
        return None
    need = [p for p, tool in (("g++-aarch64-linux-gnu", "aarch64-linux-gnu-g++"),
                              ("qemu-user", "qemu-aarch64")) if shutil.which(tool) is None]
    if not need and not Path("/usr/aarch64-linux-gnu/lib").is_dir():
        need.append("libc6-dev-arm64-cross")
    if need:
        return f"the aarch64 cross check needs {', '.join(need)} (apt-get install -y {' '.join(need)})"
    return None


_RUNS = {}


def _run(target):
    """(returncode, output) of .ci/native_checks.sh <target>, run once per session."""
    if target not in _RUNS:
        env = dict(os.environ, VQK_NO_APT="1")
        env.pop("VQK_CPU_ISA", None)
        env.pop("VQK_DEBUG_APPROX_ONLY", None)
        p = subprocess.run(["bash", str(SCRIPT), target], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=1200)
        _RUNS[target] = (p.returncode, p.stdout + p.stderr)
    return _RUNS[target]


TARGETS = [pytest.param(t, id=t, marks=[pytest.mark.skip(reason=_missing(t))] if _missing(t) else [])
           for t in ("host", "aarch64", "x86-emulated")]
# Which builds each target can run: the emulated one builds only its list (and scalar).
TARGET_ISAS = [pytest.param(t.values[0], isa, id=f"{t.id}-{isa}", marks=t.marks)
               for t in TARGETS for isa in ISAS
               if t.id != "x86-emulated" or isa in EMULATED + ["scalar"]]


@pytest.mark.parametrize("target", TARGETS)
def test_native_driver_passes(target):
    rc, out = _run(target)
    tail = "\n".join(out.splitlines()[-60:])
    assert rc == 0, f".ci/native_checks.sh {target} failed (exit {rc}):\n{tail}"
    assert re.search(r"^OK: \d+ checks, 0 failed$", out, re.M), tail
    if target == "aarch64":
        # The NEON build ran and is what aarch64 picks by default.
        assert re.search(r"^auto: neon$", out, re.M), tail
        assert re.search(r"^builds run: .*\bneon\b", out, re.M), tail
        # On a CPU without FEAT_DotProd the run-time check refuses neon_dot and auto stays on neon.
        assert DETECT in out, tail
        detect = out.split(DETECT, 1)[1]
        assert re.search(r"^SKIP neon_dot: .*dot-product", detect, re.M), tail
        assert re.search(r"^auto: neon$", detect, re.M), tail
    if target == "x86-emulated":
        # The shims added to SIMDe passed their own check first; every emulated build ran (none
        # skipped), and auto picks the first, as on such a CPU.
        assert re.search(r"^simde shims: OK: \d+ checks, 0 failed$", out, re.M), tail
        assert EMULATED, "no EMULATED list found in .ci/native_checks.sh"
        ran = re.search(r"^builds run: (.*)$", out, re.M)
        assert ran and set(EMULATED + ["scalar"]) <= set(ran.group(1).split()), tail
        assert re.search(rf"^auto: {EMULATED[0]}$", out, re.M), tail


@pytest.mark.parametrize("target,isa", TARGET_ISAS)
def test_native_driver_isa(target, isa):
    """One test per (target, build): passed when the driver ran that build (its checks are in the
    driver's verdict above), skipped with the driver's own reason when it could not."""
    rc, out = _run(target)
    out = out.split(DETECT, 1)[0]  # the main run's verdict per build (the detection run skips some)
    skip = re.search(rf"^SKIP {isa}: (.*)$", out, re.M)
    if skip:
        also = " (its checks run emulated: the x86-emulated target)" if target == "host" and isa in EMULATED else ""
        pytest.skip(f"{target}: {skip.group(1)}{also}")
    ran = re.search(r"^builds run: (.*)$", out, re.M)
    assert ran, f"the driver did not finish (exit {rc}):\n" + "\n".join(out.splitlines()[-30:])
    assert isa in ran.group(1).split(), out
    assert rc == 0, f"{target}: the driver failed; see test_native_driver_passes"
