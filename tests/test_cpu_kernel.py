"""The native CPU kernel (csrc/cpu) against the float64 reference, on every instruction-set path.

Each test runs with every search build this CPU can execute, forced through VQK_CPU_ISA, and with
one and two threads. Outputs are poisoned before the kernel runs (NaN, out-of-range sentinels) and
checked to be fully written. The generic backend tests (test_backends.py) cover the public API; this
file covers what is particular to the CPU kernel: its tiles and panels (shapes around their sizes),
its layouts (channel-first, strided, batch boundaries inside a tile), its threads (bitwise the same
for any count) and its exact tie and NaN rules.
"""
import os

import pytest
import torch

import adversarial as A
import vqkernels
from vqkernels import backends, native, reference
from vqkernels._layout import NULL_VIEW, RowPlan
from helpers import FLOAT_DTYPES, WEIRD_SHAPES, assert_search_ok, make_inputs, wait_for_child
from cpu_isas import ISA_PARAMS, SKIP_REASONS

pytestmark = pytest.mark.skipif(native.cpu_status() is not None,
                                reason=f"native CPU kernel: {native.cpu_status()}")

# Rows per tile are 48 (avx512), 24 (avx2, avx2_i16), 20 (neon), 4 (scalar); codes per panel 8, 4, 4, 4. These shapes put
# N and K on both sides of those, and make enough work (> a few MFLOP) for a second thread to start.
TILE_SHAPES = [(47, 7, 5), (48, 8, 16), (49, 9, 17), (97, 33, 31), (1000, 100, 70),
               (2000, 257, 33), (3001, 64, 129)]


@pytest.fixture(params=ISA_PARAMS)
def isa(request, monkeypatch):
    monkeypatch.setenv("VQK_CPU_ISA", request.param)
    assert native.module().cpu_isa() == request.param
    return request.param


def _poisoned(t):
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-7)


def forward_raw(z, codebook, dim=-1, threads=None, zq=True):
    """The CPU kernel called directly, every output poisoned first. Returns (z_q, idx, sqerr, counts)."""
    plan = RowPlan(z, dim)
    cb = codebook.contiguous()
    K = cb.shape[0]
    xv = plan.view(z)
    z_q, zqv = plan.empty_like(z)
    _poisoned(z_q)
    idx = _poisoned(torch.empty(plan.lead, dtype=torch.long))
    err = _poisoned(torch.empty(plan.lead, dtype=reference.acc_dtype(z.dtype)))
    counts = _poisoned(torch.empty(K, dtype=torch.long))
    native.module().cpu_forward(native.dtype_code(z.dtype), xv.as_args(), cb.data_ptr(), K,
                                zqv.as_args() if zq else NULL_VIEW, idx.data_ptr(),
                                err.data_ptr(), counts.data_ptr(), threads or torch.get_num_threads())
    return (z_q if zq else None), idx, err, counts


def backward_raw(z, codebook, indices, grad_zq, g_cb, g_cm, dim=-1, threads=None):
    """The CPU backward called directly with poisoned outputs. Returns (grad_z, grad_codebook)."""
    plan = RowPlan(z, dim)
    acc = reference.acc_dtype(z.dtype)
    cb = codebook.contiguous()
    xv = plan.view(z)
    gzqv = plan.view(grad_zq) if grad_zq is not None else None
    idx = indices.contiguous()
    g_cb = g_cb.to(acc).contiguous() if g_cb is not None else None
    g_cm = g_cm.to(acc).contiguous() if g_cm is not None else None
    grad_z, gzv = plan.empty_like(z)
    _poisoned(grad_z)
    grad_cb = _poisoned(torch.empty(cb.shape, dtype=acc))
    native.module().cpu_backward(
        native.dtype_code(z.dtype), xv.as_args(), cb.data_ptr(), cb.shape[0], idx.data_ptr(),
        gzqv.as_args() if gzqv is not None else NULL_VIEW,
        g_cb.data_ptr() if g_cb is not None else 0, g_cm.data_ptr() if g_cm is not None else 0,
        gzv.as_args(), grad_cb.data_ptr(), threads or torch.get_num_threads())
    return grad_z, grad_cb


def check_forward(z, cb, dim, out):
    """Every output written and right: search by float64 regret, z_q the chosen code's exact bits,
    sqerr the exact error of the chosen code, counts the histogram."""
    z_q, idx, err, counts = out
    K, D = cb.shape
    rows = z.movedim(dim, -1).reshape(-1, D)
    assert idx.shape == z.movedim(dim, -1).shape[:-1]
    assert err.dtype == reference.acc_dtype(z.dtype)
    assert_search_ok(rows, cb, idx, err)  # also: indices in [0, K), no sentinel left
    assert not torch.isnan(err).any()
    if z_q is not None:
        assert torch.equal(z_q.movedim(dim, -1).reshape(-1, D), cb[idx.reshape(-1)])
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=K))


# ---------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,K,D", WEIRD_SHAPES + TILE_SHAPES)
def test_forward_every_path(isa, threads, dtype, N, K, D):
    z, cb = make_inputs(N, K, D, dtype)
    check_forward(z, cb, -1, forward_raw(z, cb))


@pytest.mark.parametrize("N,K,D", WEIRD_SHAPES + TILE_SHAPES)
def test_forward_float64(threads, N, K, D):
    # float64 takes one plain fp64 path whatever the instruction set.
    z, cb = make_inputs(N, K, D, torch.float64)
    check_forward(z, cb, -1, forward_raw(z, cb))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_forward_norm_scales(isa, scale):
    z, cb = make_inputs(700, 90, 40, scale=scale)
    check_forward(z, cb, -1, forward_raw(z, cb))


def test_forward_without_zq(isa):
    z, cb = make_inputs(130, 20, 9)
    out = forward_raw(z, cb, zq=False)
    check_forward(z, cb, -1, out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("B,D,H,W", [(2, 6, 5, 7), (3, 17, 8, 8), (1, 3, 1, 50), (5, 1, 3, 3)])
def test_forward_channel_first(isa, threads, dtype, B, D, H, W):
    # S = H*W that is not a multiple of the tile puts batch boundaries inside a tile.
    K = 13
    z = torch.randn(B, D, H, W).to(dtype)
    cb = torch.randn(K, D).to(dtype)
    out = forward_raw(z, cb, dim=1)
    assert out[0].stride() == z.stride()  # z_q keeps the input's layout
    check_forward(z, cb, 1, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_strided_layouts(isa, dtype):
    K, D = 21, 12
    cb = torch.randn(K, D).to(dtype)
    big = torch.randn(4, 40, 2 * D).to(dtype)
    cases = [
        (big[:, :, ::2], -1),                                      # strided along D
        (big[:, ::3, :D], -1),                                     # strided rows
        (big[:, :, :D].transpose(0, 1), -1),                       # rows out of memory order
        (torch.randn(3, D, 10, 9).to(dtype).to(memory_format=torch.channels_last), 1),
        (torch.randn(2, 7, D, 5).to(dtype)[..., ::2], 2),          # channel in the middle, strided S
    ]
    for z, dim in cases:
        check_forward(z, cb, dim, forward_raw(z, cb, dim=dim))


def test_forward_bitwise_same_for_any_thread_count(isa):
    z, cb = make_inputs(5000, 300, 37)
    runs = [forward_raw(z, cb, threads=t) for t in (1, 2, 3, 5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("K", [3, 8, 9, 40])
def test_ties_go_to_lowest_index(isa, threads, K):
    D = 11
    base = torch.randn(K, D)
    cb = torch.cat([base, base, base])  # code k == code k + K == code k + 2K, bit for bit
    pick = torch.randint(0, 3 * K, (400,))
    z = cb[pick] + 0.05 * torch.randn(400, D)
    z[::4] = cb[pick[::4]]  # some rows sit exactly on a code
    z_q, idx, err, _ = forward_raw(z, cb)
    assert int(idx.max()) < K, "a duplicate beat the lowest index"
    assert_search_ok(z, cb, idx, err)
    # Every code identical: every row takes code 0.
    same = torch.randn(1, D).expand(37, D).contiguous()
    _, idx, _, counts = forward_raw(torch.randn(100, D), same)
    assert int(idx.max()) == 0 and int(counts[0]) == 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_non_finite_rows(isa, dtype):
    z, cb = make_inputs(100, 19, 10, dtype)
    z[3, 4] = float("nan")
    z[50] = float("nan")
    z[77, 0] = float("inf")
    z_q, idx, err, counts = forward_raw(z, cb)
    bad = [3, 50, 77]
    good = [i for i in range(100) if i not in bad]
    assert torch.isnan(z_q[bad]).all()
    assert not torch.isfinite(err[bad]).any()
    assert idx[3] == 0 and idx[50] == 0  # every distance NaN: no code wins, index 0
    assert 0 <= int(idx.min()) and int(idx.max()) < 19
    assert_search_ok(z[good], cb, idx[good], err[good])
    assert torch.equal(z_q[good], cb[idx[good]])
    assert int(counts.sum()) == 100


def test_nan_code_never_wins(isa):
    z, cb = make_inputs(300, 12, 8)
    cb[0, 2] = float("nan")   # a NaN distance for every row
    cb[5] = float("inf")      # an infinite norm
    _, idx, err, _ = forward_raw(z, cb)
    assert not ((idx == 0) | (idx == 5)).any()
    keep = torch.tensor([k for k in range(12) if k not in (0, 5)])
    remap = torch.full((12,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    assert_search_ok(z, cb[keep], remap[idx], err)


@pytest.mark.parametrize("K", [13, 14, 15])
def test_non_finite_codes_beside_padding(isa, K):
    # The last panel holds real codes and padding (K not a multiple of the panel width): codes
    # packed together must each keep their own norm (a NaN or inf code beside the padding must
    # not leak into its neighbours' norms or scales), so the finite codes next to them still win.
    z, cb = make_inputs(400, K, 24)
    cb[K - 1, 3] = float("nan")
    cb[K - 3] = float("inf")
    z[:100] = cb[K - 2] + 1e-3 * torch.randn(100, 24)  # rows right at a finite code of that panel
    _, idx, err, _ = forward_raw(z, cb)
    assert (idx[:100] == K - 2).all()
    assert not ((idx == K - 1) | (idx == K - 3)).any()
    keep = torch.tensor([k for k in range(K) if k not in (K - 1, K - 3)])
    remap = torch.full((K,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    assert_search_ok(z, cb[keep], remap[idx], err)


def test_single_code_and_huge_k(isa):
    z, cb = make_inputs(60, 1, 5)
    check_forward(z, cb, -1, forward_raw(z, cb))
    z, cb = make_inputs(9, 20000, 3)
    check_forward(z, cb, -1, forward_raw(z, cb))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_thread_pool_survives_fork():
    # The pool's workers do not exist in a forked child (a DataLoader worker, say): the child must
    # start its own instead of waiting on the parent's. The child calls only the native module and
    # numpy (torch's own OpenMP pool is not usable after fork). The parent on the own pool here
    # (on torch's OpenMP threads: tests/test_cpu_pool.py).
    N, K, D = 3000, 200, 40
    z, cb = make_inputs(N, K, D)
    native.set_cpu_pool("own")
    try:
        want = forward_raw(z, cb, threads=2)[1]  # the parent's pool is up
    finally:
        native.set_cpu_pool(os.environ.get("VQK_CPU_POOL", ""))
    idx = torch.full((N,), -1, dtype=torch.long)
    err = torch.empty(N)
    counts = torch.empty(K, dtype=torch.long)
    xv = RowPlan(z, -1).view(z)
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            native.module().cpu_forward(0, xv.as_args(), cb.data_ptr(), K, NULL_VIEW,
                                        idx.data_ptr(), err.data_ptr(), counts.data_ptr(), 2)
            ok = bool((idx.numpy() == want.numpy()).all())
        finally:
            os._exit(0 if ok else 1)
    status = wait_for_child(pid, 60, "the forked child hung in the CPU kernel (waiting on the "
                                     "parent's pool?)")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _amd_family_and_flags():
    """(CPU family number if the vendor is AMD else None, /proc/cpuinfo flags) -- Linux only."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, []
    field = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in lines if ":" in l}
    family = int(field["cpu family"]) if field.get("vendor_id") == "AuthenticAMD" else None
    return family, field.get("flags", "").split()


def _check_auto_path_by_twin_codes(K, D, aside):
    """Auto's choice at (K, D), seen from outside: a pair of codes 1e-4 apart that 100 rows sit
    between. An integer pass cannot separate them, so it must hand those rows to the fp32 search
    (`aside`: the set-aside counter moves), while the fp32 build never does -- which shows which
    path ran. Either way the indices are the exact ones wherever the best two are clearly apart."""
    z, cb = make_inputs(300, K, D)
    cb[1] = cb[0] + 1e-4
    z[:100] = cb[0] + 0.5e-4 + 1e-6 * torch.randn(100, D)
    before = native.module().cpu_set_aside_rows()
    idx, _ = vqkernels.nearest_code(z, cb, backend="cpu")
    assert (native.module().cpu_set_aside_rows() > before) == aside, (K, D)
    ref, clear, _ = A.exact_answer(z, cb)
    assert torch.equal(idx[clear], ref[clear]), (K, D)


@pytest.mark.skipif(SKIP_REASONS["avx2_i8"] is not None or _amd_family_and_flags()[0] != 25
                    or "avx512f" in _amd_family_and_flags()[1],
                    reason="the auto rule for avx2_i8 concerns AMD family 25 without AVX-512 (Zen 3)")
def test_auto_takes_int8_on_zen3_where_measured(monkeypatch):
    """On Zen 3 auto picks the int8 tier (in front of the int16 pass) from K >= 64 and D >= 16
    (measured faster there), the fp32 build below; either way the answer is the exact one."""
    monkeypatch.delenv("VQK_CPU_ISA", raising=False)
    assert native.module().cpu_isa() == "avx2_i8"
    for K, D, aside in [(64, 16, True), (63, 64, False), (256, 15, False)]:
        _check_auto_path_by_twin_codes(K, D, aside)


def _vnni_rule_applies():
    family, flags = _amd_family_and_flags()
    return "avx512_vnni" in flags and (family == 25 or "avx512_bf16" not in flags)


@pytest.mark.skipif(SKIP_REASONS["avx512_vnni_i16"] is not None or not _vnni_rule_applies(),
                    reason="the auto rule for avx512_vnni_i16 concerns CPUs with AVX-512 VNNI that are "
                           "AMD family 25 (Zen 4) or lack AVX-512 BF16 (Intel Cascade Lake to Ice Lake)")
def test_auto_takes_vnni_int16_where_measured(monkeypatch):
    """On Zen 4 and on AVX-512 VNNI CPUs without BF16 (Ice Lake) auto picks the AVX-512 VNNI int16
    pass from K >= 32 and D >= 8 (measured faster than the fp32 build from K = 32 on both, and on
    Zen 4 as fast as the bf16 build on rows near codes, faster on random rows), the fp32 build
    below; either way the answer is the exact one."""
    monkeypatch.delenv("VQK_CPU_ISA", raising=False)
    assert native.module().cpu_isa() == "avx512_vnni_i16"  # the path reported for K = 128, D = 16
    for K, D, aside in [(32, 16, True), (127, 64, True), (64, 8, True), (31, 64, False),
                        (64, 7, False)]:
        _check_auto_path_by_twin_codes(K, D, aside)


@pytest.mark.skipif(SKIP_REASONS["avx512_vnni_i8"] is not None,
                    reason=f"cannot run the avx512_vnni_i8 kernels here: {SKIP_REASONS['avx512_vnni_i8']}")
def test_auto_takes_vnni_int8_only_where_measured(monkeypatch):
    """avx512_vnni_i8 (the int8 tier in front of avx512_vnni_i16) was timed on an Ice Lake Xeon
    only: auto takes it from D = 32 on Intel CPUs with AVX-512 VNNI and without AVX-512 BF16 (where
    it takes avx512_vnni_i16), nowhere else. Seen from outside by the int8-rows counter on rows near
    their codes (which the int8 bound proves); the answer is the exact one either way."""
    family, flags = _amd_family_and_flags()
    rule = "avx512_vnni" in flags and "avx512_bf16" not in flags and family != 25
    monkeypatch.delenv("VQK_CPU_ISA", raising=False)
    for K, D in [(128, 16), (128, 32), (31, 64), (256, 64)]:
        cb = torch.randn(K, D)
        z = cb[torch.randint(0, K, (600,))] + 0.05 * torch.randn(600, D)
        before = native.module().cpu_int8_rows()
        idx, _ = vqkernels.nearest_code(z, cb, backend="cpu")
        took = native.module().cpu_int8_rows() > before
        assert took == (rule and D >= 32 and K >= 32), (K, D, rule)
        ref, clear, _ = A.exact_answer(z, cb)
        assert torch.equal(idx[clear], ref[clear])
    monkeypatch.setenv("VQK_CPU_ISA", "avx512_vnni_i8")
    assert native.module().cpu_isa() == "avx512_vnni_i8"


def test_avx2_inner_loops_keep_accumulators_in_registers():
    """No vfmadd or vpaddd of the built module takes a ymm operand from the stack: that is what a
    spilled accumulator of the AVX2 micro-kernels looks like (`vfmadd213ps -0x490(%rbp),...`), and
    it halves their speed without changing a result, so no other test sees it. GCC did it twice
    after unrelated edits (search_impl.h); the loops are asm statements since (simd_avx2.h,
    search_avx2_i16.cpp). Speed itself is never asserted; this checks the machine code."""
    import platform
    import re
    import shutil
    import subprocess
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
        pytest.skip("needs objdump and an x86-64 build")
    if native.cpu_status() is not None:
        pytest.skip(f"native CPU kernel: {native.cpu_status()}")
    so = native.module().__file__
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], check=True,
                          capture_output=True, text=True).stdout
    if "__asan_" in text:
        pytest.skip("a sanitizer build (.ci/sanitize.sh, -O1): its code keeps values on the stack anyway")
    # Accumulating instructions only: the per-panel epilogues' vfnmadd may read a spilled
    # constant (once per panel, not per step).
    spilled = re.findall(r"(?:vfmadd\d{3}ps|vpaddd|vpmaddwd|vpmaddubsw)\s+-?0x[0-9a-f]+\(%r[bs]p\),%ymm\d+",
                         text)
    assert not spilled, spilled[:5]
    # The AVX-512 int16 loop (search_avx512_i16.cpp, intrinsics in a function of its own, i16_dots):
    # compiled into the module wherever the compiler has the flags, even on a CPU that cannot run
    # it. Inlined into its caller, GCC 12 added stack operands to its vpaddd (and kept VNNI's
    # vpdpwssd accumulators on the stack through vmovdqa32 copies, which this does not see).
    # avx512_vnni_i8's int8 loop (vpdpbusd, search_avx512_vnni_i8.cpp) is held to the same.
    spilled = re.findall(r"(?:vpaddd|vpmaddwd|vpdpwssd|vpdpbusd)\s+-?0x[0-9a-f]+\(%r[bs]p\),%zmm\d+",
                         text)
    assert not spilled, spilled[:5]
    if SKIP_REASONS["avx512_vnni_i8"] is None:
        # The AVX-512 int8 loop (search_avx512_vnni_i8.cpp, i8_dots) is in the module: vpdpbusd
        # between registers (the code broadcast, the rows, the accumulator).
        assert re.search(r"vpdpbusd\s+%zmm\d+,%zmm\d+,%zmm\d+", text)
    if SKIP_REASONS["avx2_i8"] is None:
        # The int8 loop (search_avx2_i8.cpp) is in the module: its vpmaddubsw take the rows from
        # the tile, and its vpmaddwd take the ones from a static constant, not a stack copy.
        assert re.search(r"vpmaddubsw\s+0x[0-9a-f]+\(%r(?:[a-d]x|[sd]i|\d+)\),%ymm\d+,%ymm\d+", text)
        assert re.search(r"vpmaddwd\s+0x[0-9a-f]+\(%rip\),%ymm\d+,%ymm\d+", text)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), None)
    except OSError:
        return None


@pytest.mark.skipif(_cpu_flags() is None or "avx512f" in (_cpu_flags() or []),
                    reason="needs an x86-64 Linux CPU without AVX-512 (this one runs them)")
@pytest.mark.parametrize("isa", ["avx512", "avx512_i16", "avx512_vnni_i16", "avx512_vnni_i8"])
def test_avx512_builds_are_refused_without_avx512(monkeypatch, isa):
    """The module compiles the AVX-512 builds wherever the compiler can; on a CPU without AVX-512
    forcing one must be a clear error, never a SIGILL (only .ci/native_checks.sh x86-emulated runs
    them here, through SIMDe)."""
    monkeypatch.setenv("VQK_CPU_ISA", isa)
    with pytest.raises(RuntimeError, match=f"VQK_CPU_ISA={isa}, but this CPU .*lacks AVX-512"):
        native.module().cpu_isa()


def test_bad_isa_name_is_an_error(monkeypatch):
    monkeypatch.setenv("VQK_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="VQK_CPU_ISA"):
        native.module().cpu_isa()
    z, cb = make_inputs(4, 3, 2)
    with pytest.raises(ValueError, match="VQK_CPU_ISA"):
        forward_raw(z, cb)


# ---------------------------------------------------------------------------------------------
# the reduced-precision searches (avx512bf16, avx512_i16, avx2_i16, neon_dot): accelerators that must give the fp32
# search's bits

def _bf16_regimes():
    K, D = 300, 40
    cb = torch.randn(K, D)
    pick = torch.randint(0, K, (3000,))
    yield "clustered", cb[pick] + 0.3 * torch.randn(3000, D), cb  # rows clearly nearest one code
    yield "random", torch.randn(3000, D), cb  # many near ties: set aside, then fp32 tiles
    # Codes in triples a hair apart (closer than bf16 can tell): the best two are not enough.
    base = torch.randn(100, D)
    trip = torch.cat([base, base * (1 + 2**-12), base * (1 - 2**-11)])
    yield "near-duplicates", base[torch.randint(0, 100, (700,))] * (1 + 2**-11 * torch.randn(700, 1)), trip
    yield "exact duplicates", cb[pick[:500]], torch.cat([cb, cb])
    big = cb.clone()
    big[7] *= 1e18  # a huge norm: the error bound is too wide to prove anything
    yield "huge code", cb[pick[:400]] + 0.1 * torch.randn(400, D), big
    nan = cb.clone()
    nan[3, 5] = float("nan")
    z = cb[pick[:400]] + 0.1 * torch.randn(400, D)
    z[17] = float("nan")
    z[18] *= 1e-20  # tiny row: bf16 flushes denormals
    yield "non-finite", z, nan
    yield "bf16 input", (cb[pick[:900]] + 0.3 * torch.randn(900, D)).bfloat16(), cb.bfloat16()
    yield "f16 input", (cb[pick[:900]] + 0.3 * torch.randn(900, D)).half(), cb.half()
    zc = torch.randn(4, D, 9, 17)
    yield "channel-first", zc, torch.randn(200, D)
    # Far from the origin (the fp32 expansion cancels: set-aside rows reach the exact re-search),
    # codes of very different magnitudes (per-code scales), and a D that makes int16 coarse.
    yield "large mean", 1000 + torch.randn(600, D), 1000 + torch.randn(K, D)
    yield "mixed scales", cb[pick[:900]] + 0.1 * torch.randn(900, D), cb * 10 ** (6 * torch.rand(K, 1) - 3)
    wide = torch.randn(64, 700)
    yield "D=700", wide[torch.randint(0, 64, (200,))] + 0.2 * torch.randn(200, 700), wide


# Each reduced-precision first pass against the fp32 build of the same instruction set.
REDUCED = [pytest.param(fast, fp32, id=fast, marks=[] if SKIP_REASONS[fast] is None else
                        [pytest.mark.skip(reason=f"cannot run the {fast} kernels here: {SKIP_REASONS[fast]}")])
           for fast, fp32 in [("avx512bf16", "avx512"), ("avx512_i16", "avx512"),
                              ("avx512_vnni_i16", "avx512"), ("avx512_vnni_i8", "avx512"),
                              ("avx2_i16", "avx2"), ("avx2_i8", "avx2"), ("neon_dot", "neon")]]


@pytest.mark.parametrize("fast,fp32", REDUCED)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_reduced_precision_search_gives_the_fp32_bits(monkeypatch, nthreads, fast, fp32):
    for name, z, cb in _bf16_regimes():
        dim = 1 if z.dim() == 4 else -1
        monkeypatch.setenv("VQK_CPU_ISA", fp32)
        want = forward_raw(z, cb, dim=dim, threads=nthreads)
        monkeypatch.setenv("VQK_CPU_ISA", fast)
        got = forward_raw(z, cb, dim=dim, threads=nthreads)
        for w, g in zip(want, got):
            assert torch.equal(w, g) or (w.dtype.is_floating_point and torch.equal(w.isnan(), g.isnan())
                                         and torch.equal(w.nan_to_num(), g.nan_to_num())), name
        if name not in ("non-finite", "huge code"):
            check_forward(z, cb, dim, got)


@pytest.mark.skipif(SKIP_REASONS["avx2_i16"] is not None,
                    reason=f"cannot run the avx2_i16 kernels here: {SKIP_REASONS['avx2_i16']}")
def test_int16_pass_sets_rows_aside_and_must(monkeypatch):
    """Codes in pairs 0.04 apart: the fp32 search proves every row on its own (no exact re-search,
    and its unproven answer is already right), but int16 resolution cannot tell the twins apart.
    The int16 build must set those rows aside (its answer is still exact), and without its proof
    (VQK_DEBUG_APPROX_ONLY=1, which keeps the int16 pass's best) many are wrong."""
    D = 32
    base = torch.randn(100, D)
    w = torch.randn(100, D)
    cb = torch.cat([base, base + 0.04 * w / w.norm(dim=1, keepdim=True)])
    x = cb[torch.randint(0, 200, (2000,))] + 1e-3 * torch.randn(2000, D) / D ** 0.5
    ref, clear, _ = A.exact_answer(x, cb)
    wrong, set_aside = {}, {}
    for isa in ("avx2", "avx2_i16"):
        monkeypatch.setenv("VQK_CPU_ISA", isa)
        before, aside = native.module().cpu_exact_rows(), native.module().cpu_set_aside_rows()
        idx, _ = vqkernels.nearest_code(x, cb, backend="cpu")
        assert native.module().cpu_exact_rows() == before, isa  # fp32 proves these rows
        set_aside[isa] = native.module().cpu_set_aside_rows() - aside
        assert torch.equal(idx[clear], ref[clear]), isa
        monkeypatch.setenv("VQK_DEBUG_APPROX_ONLY", "1")
        approx, _ = vqkernels.nearest_code(x, cb, backend="cpu")
        monkeypatch.delenv("VQK_DEBUG_APPROX_ONLY")
        wrong[isa] = (approx[clear] != ref[clear]).float().mean().item()
    assert wrong["avx2"] == 0.0
    assert wrong["avx2_i16"] > 0.03, wrong
    assert set_aside["avx2"] == 0
    assert set_aside["avx2_i16"] >= 0.03 * x.shape[0], set_aside


@pytest.mark.skipif(SKIP_REASONS["avx2_i16"] is not None,
                    reason=f"cannot run the avx2_i16 kernels here: {SKIP_REASONS['avx2_i16']}")
@pytest.mark.parametrize("D", [16, 64, 300])
def test_int16_pass_proves_clustered_rows(monkeypatch, D):
    """Rows clearly nearest one code (a trained codebook's case): the int16 pass proves nearly all
    of them itself -- its bound is not so loose that every row falls back to fp32."""
    monkeypatch.setenv("VQK_CPU_ISA", "avx2_i16")
    cb = torch.randn(128, D)
    x = cb[torch.randint(0, 128, (3000,))] + 0.3 * torch.randn(3000, D)
    before = native.module().cpu_set_aside_rows()
    idx, _ = vqkernels.nearest_code(x, cb, backend="cpu")
    assert native.module().cpu_set_aside_rows() - before < 0.02 * x.shape[0]
    ref, clear, _ = A.exact_answer(x, cb)
    assert torch.equal(idx[clear], ref[clear])


# ---------------------------------------------------------------------------------------------
# backward

def _weights(n, kind, dtype):
    acc = reference.acc_dtype(dtype)
    return None if kind is None else torch.randn(n, dtype=acc)


def _check_backward(z, cb, idx, gzq, gcb, gcm, dim, got):
    grad_z, grad_cb = got
    acc = reference.acc_dtype(z.dtype)
    want_z, want_cb = reference.backward(z.double(), cb.double(), idx, dim,
                                         None if gzq is None else gzq.double(),
                                         None if gcb is None else gcb.double(),
                                         None if gcm is None else gcm.double())
    assert not torch.isnan(grad_z).any() and not torch.isnan(grad_cb).any()
    assert grad_cb.dtype == acc
    if z.dtype == torch.float64:
        torch.testing.assert_close(grad_z, want_z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_cb, want_cb, rtol=1e-12, atol=1e-10)
        return
    eps = torch.finfo(torch.float32).eps
    D = cb.shape[1]
    x = z.movedim(dim, -1).reshape(-1, D).double()
    diff = x - cb.double()[idx.reshape(-1)]
    # grad_z: one fp32 expression per element, then rounded to z's dtype. Allowed: twice the error
    # of rounding the exact answer to that dtype, plus a few fp32 roundings of the terms' size.
    terms = torch.zeros_like(diff)
    if gzq is not None:
        terms += gzq.movedim(dim, -1).reshape(-1, D).double().abs()
    if gcm is not None:
        terms += 2 * gcm.reshape(-1, 1).double().abs() * diff.abs()
    gz = grad_z.movedim(dim, -1).reshape(-1, D).double()
    wz = want_z.movedim(dim, -1).reshape(-1, D)
    rounding = (wz.to(z.dtype).double() - wz).abs()
    assert ((gz - wz).abs() <= 2 * rounding + 4 * eps * terms + 1e-30).all()
    # grad_codebook: fp32 sums over each code's rows. Bound: n_k * eps * sum |term| per code.
    if gcb is None:
        assert (grad_cb == 0).all()
        return
    K = cb.shape[0]
    absterm = (2 * gcb.reshape(-1, 1).double().abs() * diff.abs())
    absum = torch.zeros(K, D, dtype=torch.float64).index_add_(0, idx.reshape(-1), absterm)
    n_k = torch.bincount(idx.reshape(-1), minlength=K).double()[:, None]
    assert ((grad_cb.double() - want_cb).abs() <= 2 * (n_k + 1) * eps * absum + 1e-30).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", [(0, 4, 3), (1, 1, 1), (37, 5, 3), (300, 33, 129), (2000, 17, 20)])
@pytest.mark.parametrize("which", ["all", "no_upstream", "no_commit", "no_codebook"])
def test_backward_matches_reference(threads, dtype, N, K, D, which):
    z, cb = make_inputs(N, K, D, dtype)
    idx = forward_raw(z, cb)[1]
    gzq = None if which == "no_upstream" else torch.randn(N, D).to(dtype)
    gcb = None if which == "no_codebook" else _weights(N, 1, dtype)
    gcm = None if which == "no_commit" else _weights(N, 1, dtype)
    _check_backward(z, cb, idx, gzq, gcb, gcm, -1, backward_raw(z, cb, idx, gzq, gcb, gcm))


def test_backward_channel_first_and_strided_grad(threads):
    B, D, H, W, K = 3, 7, 6, 5, 11
    z = torch.randn(B, D, H, W)
    cb = torch.randn(K, D)
    idx = forward_raw(z, cb, dim=1)[1]
    gzq = torch.randn(B, H, W, D).permute(0, 3, 1, 2)  # channel-last upstream gradient
    gcb, gcm = torch.randn(B, H, W), torch.randn(B, H, W)
    got = backward_raw(z, cb, idx, gzq, gcb, gcm, dim=1)
    assert got[0].stride() == z.stride()
    _check_backward(z, cb, idx, gzq, gcb, gcm, 1, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_bitwise_same_for_any_thread_count(dtype):
    # Most rows on one code (a collapsed codebook) spans many of the fixed sum chunks; the rest
    # spread over the other codes, some of which stay unused.
    N, K, D = 6000, 50, 33
    z = torch.randn(N, D).to(dtype)
    cb = torch.randn(K, D).to(dtype)
    idx = torch.where(torch.rand(N) < 0.7, torch.tensor(3), torch.randint(0, K - 5, (N,)))
    gzq = torch.randn(N, D).to(dtype)
    gcb, gcm = torch.randn(N), torch.randn(N)
    runs = [backward_raw(z, cb, idx, gzq, gcb, gcm, threads=t) for t in (1, 2, 3, 8)]
    for gz, gc in runs[1:]:
        assert torch.equal(gz, runs[0][0]) and torch.equal(gc, runs[0][1])
    _check_backward(z, cb, idx, gzq, gcb, gcm, -1, runs[0])
    assert (runs[0][1][K - 5:] == 0).all()  # unused codes get exactly zero


def test_backward_through_registry_matches_raw():
    z, cb = make_inputs(200, 9, 6)
    idx = forward_raw(z, cb)[1]
    gzq, gcb, gcm = torch.randn(200, 6), torch.randn(200), torch.randn(200)
    b = backends.REGISTRY["cpu"]
    gz, gc = b.backward(z, -1, cb, idx, gzq, gcb, gcm, RowPlan(z, -1))
    rz, rc = backward_raw(z, cb, idx, gzq, gcb, gcm)
    assert torch.equal(gz, rz) and torch.equal(gc, rc)


# ---------------------------------------------------------------------------------------------
# the int8 tiers in front of the int16 passes (avx2_i8, search_avx2_i8.cpp, in front of avx2_i16;
# avx512_vnni_i8, search_avx512_vnni_i8.cpp, vpdpbusd in front of avx512_vnni_i16), each against the
# fp32 build of its instruction set

# (int8 tier, its fp32 build), each skipped where this machine cannot run the tier.
I8_PAIRS = [pytest.param(i8, fp32, id=i8, marks=[] if SKIP_REASONS[i8] is None else
                         [pytest.mark.skip(reason=f"cannot run the {i8} kernels here: {SKIP_REASONS[i8]}")])
            for i8, fp32 in [("avx2_i8", "avx2"), ("avx512_vnni_i8", "avx512")]]


def _forward_counted(monkeypatch, isa, z, cb, threads):
    monkeypatch.setenv("VQK_CPU_ISA", isa)
    m = native.module()
    i8, aside = m.cpu_int8_rows(), m.cpu_set_aside_rows()
    out = forward_raw(z, cb, threads=threads)
    return out, m.cpu_int8_rows() - i8, m.cpu_set_aside_rows() - aside


@pytest.mark.parametrize("i8_isa,fp32", I8_PAIRS)
@pytest.mark.parametrize("D", [48, 64, 300])
def test_int8_tier_decides_clustered_rows(monkeypatch, D, i8_isa, fp32):
    """Rows clearly nearest one code: the int8 tier proves and finishes nearly all of them itself
    (its bound, 16-90x coarser than int16's, still holds there), and the output is the fp32
    build's, bit for bit."""
    cb = torch.randn(128, D)
    z = cb[torch.randint(0, 128, (3000,))] + 0.2 * torch.randn(3000, D)
    want, i8_fp32, _ = _forward_counted(monkeypatch, fp32, z, cb, 2)
    got, i8, _ = _forward_counted(monkeypatch, i8_isa, z, cb, 2)
    assert i8_fp32 == 0
    assert i8 >= 0.9 * z.shape[0], i8
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    ref, clear, _ = A.exact_answer(z, cb)
    assert torch.equal(got[1][clear], ref[clear])


@pytest.mark.parametrize("i8_isa,fp32", I8_PAIRS)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_tier_hands_far_rows_to_the_int16_pass(monkeypatch, threads, i8_isa, fp32):
    """Rows far from every code (noise 3 around unit codes): the int8 bound proves few of them, so
    most go to the int16 pass (which proves most of those; the rest reach the fp32 search) -- and
    the output is still the fp32 build's, bit for bit, and the exact answer."""
    D = 64
    cb = torch.randn(256, D)
    z = cb[torch.randint(0, 256, (3000,))] + 3.0 * torch.randn(3000, D)
    want, _, _ = _forward_counted(monkeypatch, fp32, z, cb, threads)
    got, i8, _ = _forward_counted(monkeypatch, i8_isa, z, cb, threads)
    assert i8 < 0.5 * z.shape[0], i8
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    ref, clear, _ = A.exact_answer(z, cb)
    assert torch.equal(got[1][clear], ref[clear])


@pytest.mark.parametrize("i8_isa,fp32", I8_PAIRS)
def test_int8_tier_needs_its_proof(monkeypatch, i8_isa, fp32):
    """Codes in pairs 0.004 apart (int8 resolution cannot split them): without the int8 proof
    (VQK_DEBUG_APPROX_ONLY=1 keeps the int8 pass's best) many rows are wrong; with it every row is
    exact and the twins' rows went on to the int16 pass (and from there to the fp32 search)."""
    D = 32
    base = torch.randn(100, D)
    w = torch.randn(100, D)
    cb = torch.cat([base, base + 0.004 * w / w.norm(dim=1, keepdim=True)])
    x = cb[torch.randint(0, 200, (2000,))] + 1e-4 * torch.randn(2000, D) / D ** 0.5
    ref, clear, _ = A.exact_answer(x, cb)
    monkeypatch.setenv("VQK_CPU_ISA", i8_isa)
    m = native.module()
    i8, aside = m.cpu_int8_rows(), m.cpu_set_aside_rows()
    idx, _ = vqkernels.nearest_code(x, cb, backend="cpu")
    assert torch.equal(idx[clear], ref[clear])
    assert m.cpu_int8_rows() - i8 < 0.5 * x.shape[0]
    assert m.cpu_set_aside_rows() - aside > 0
    monkeypatch.setenv("VQK_DEBUG_APPROX_ONLY", "1")
    approx, _ = vqkernels.nearest_code(x, cb, backend="cpu")
    assert (approx[clear] != ref[clear]).float().mean().item() > 0.03


# Per int8 tier: the code magnitude whose bytes reach both ends of the code range, and the row
# magnitude whose bytes reach both ends of the row range (both scales powers of two).
I8_EDGES = {"avx2_i8": (63 / 64, 1.0), "avx512_vnni_i8": (127 / 128, 127 / 128)}


@pytest.mark.parametrize("i8_isa,fp32", I8_PAIRS)
def test_int8_saturation_edges(monkeypatch, i8_isa, fp32):
    """Every code byte at the ends of its range and every row byte too. avx2_i8: codes of +-63/64
    (scale 2^-6, q = +-63, bytes 1 and 127) and rows of exactly +-1 (scale 2^-6, p = +-64), so the
    int16 lanes of vpmaddubsw + vpaddw reach +-4 * 127 * 64 = +-32512, just inside int16 (an offset
    of 128 or rows up to 127 would saturate there). avx512_vnni_i8: codes of +-127/128 (scale 2^-7,
    q = +-127, bytes 1 and 255) and rows of +-127/128 (p = +-127): vpdpbusd's products reach
    255 * 127, its int32 sums 4 * 255 * 127 per step. The int8 pass decides the rows, and the answer
    is the fp32 build's bits. D = 40 is not a multiple of 8 (padded dimensions)."""
    D = 40
    code_mag, row_mag = I8_EDGES[i8_isa]
    signs = torch.randint(0, 2, (64, D)).float() * 2 - 1
    signs = torch.cat([signs, -signs, torch.ones(1, D), -torch.ones(1, D)])
    cb = signs * code_mag
    z = signs[torch.randint(0, signs.shape[0], (1200,))] * row_mag
    z[:48] = signs[128:130].repeat(24, 1) * row_mag  # all + against the all-top code bytes, all -
    want, _, _ = _forward_counted(monkeypatch, fp32, z, cb, 1)
    got, i8, _ = _forward_counted(monkeypatch, i8_isa, z, cb, 1)
    assert i8 == z.shape[0], i8  # the int8 pass, not the int16 one, decided them
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    ref, clear, _ = A.exact_answer(z, cb)
    assert torch.equal(got[1][clear], ref[clear])


@pytest.mark.parametrize("i8_isa,fp32", I8_PAIRS)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_tier_hands_on_single_rows(monkeypatch, threads, i8_isa, fp32):
    """Clustered rows with every tenth one a near tie between twin codes (0.004 apart: no int8 or
    int16 bound separates them): the int8 tier still settles the clustered rows itself -- only the
    unproven rows go on to the int16 pass (and from there to the fp32 search), not the tiles they
    sit in (one such row in every tile of 24 or 48 would otherwise send every tile on) -- and the
    output is the fp32 build's bits, the exact answer."""
    D = 64
    cb = torch.randn(256, D)
    cb[1] = cb[0] + 0.004 * torch.randn(D) / D ** 0.5
    z = cb[torch.randint(2, 256, (3000,))] + 0.2 * torch.randn(3000, D)
    ties = torch.arange(0, 3000, 10)
    z[ties] = (cb[0] + cb[1]) / 2 + 1e-5 * torch.randn(len(ties), D)
    want, _, _ = _forward_counted(monkeypatch, fp32, z, cb, threads)
    exact = native.module().cpu_exact_rows()
    got, i8, aside = _forward_counted(monkeypatch, i8_isa, z, cb, threads)
    clustered = z.shape[0] - len(ties)
    assert 0.9 * clustered <= i8 <= clustered, (i8, clustered)
    # The ties went on through the int16 pass (which sets its first ones aside, then gives up and
    # hands the rest straight to the fp32 search) to the exact re-search.
    assert aside > 0
    assert native.module().cpu_exact_rows() - exact >= 0.9 * len(ties)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    ref, clear, _ = A.exact_answer(z, cb)
    assert torch.equal(got[1][clear], ref[clear])


def test_flush_denormal_mode_changes_no_answer(isa):
    # torch.set_flush_denormal(True) sets FTZ/DAZ on the calling thread only. The kernels run with
    # gradual underflow on every thread (cpu_internal.h, IeeeDenormals) and give the caller its
    # mode back: the same answers as without the mode, for any thread count, on values near 1e-40
    # (subnormal in fp32), where a flushed exact re-search saw every distance as 0 (index 0 for
    # nearly every row) and 1 and 2 threads disagreed on half the rows.
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(4000, 16, generator=gen) * 1e-40
    cb = torch.randn(64, 16, generator=gen) * 1e-40
    books = [cb, torch.randn(32, 16, generator=gen) * 1e-41]
    want = vqkernels.nearest_code(x, cb, backend="cpu")[0]
    want_rvq = vqkernels.residual_vq(x, books, backend="cpu")
    assert A.exact_answer(x, cb)[1].float().mean() > 0.9  # mostly clearly separated rows
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(vqkernels.nearest_code(x, cb, backend="cpu")[0], want)
            out = vqkernels.residual_vq(x, books, backend="cpu")
            assert torch.equal(out.indices, want_rvq.indices)
            assert torch.equal(out.z_q, want_rvq.z_q)
        # the caller's mode is back: a subnormal product flushes
        assert float(torch.tensor([1e-20]) * torch.tensor([1e-20])) == 0.0
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    clear = A.exact_answer(x, cb)
    assert torch.equal(want[clear[1]], clear[0][clear[1]])
