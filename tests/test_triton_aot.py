"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90 (no GPU needed): every
autotune config of the search kernel, plus the split-K merge and backward kernels, and the fused
residual / grouped kernel (vqkernels.triton.residual) at its launcher's blocks. Asserts that
ptxas reports no spills and that shared memory fits the arch, and, from the SASS
(vqkernels.triton.sass), that the search's hot loop runs on the tensor cores with no global load
whose latency it waits for (review F6), and that sm_90 gets an n >= 128 wgmma tile (F7). Prints
registers, shared memory, CTAs/SM and the loop facts per config (see them with `pytest -s` or
`python -m vqkernels.triton.aot`)."""
from __future__ import annotations

import functools

import pytest

triton = pytest.importorskip("triton")
aot = pytest.importorskip("vqkernels.triton.aot")

ARCHS = (80, 90)
# One compile per (kind, arch, dtype, D) for the whole module: the sm_90 tile test reads the same
# reports as the spill test (each compile is a subprocess of tens of seconds on this machine).
_reports = functools.cache(aot.reports_in_subprocess)
sass = aot.sass
HAVE_NVDISASM = sass.tool("nvdisasm") is not None


def _check(reports):
    for r in reports:
        print(aot.format_report(r))
    for r in reports:
        assert r.spill_store == 0 and r.spill_load == 0, f"spills: {aot.format_report(r)}"
        assert r.shared <= aot.SMEM_LIMIT[r.arch], f"shared memory: {aot.format_report(r)}"
        if r.kernel == "vq_search":
            # The search must run on the tensor cores (wgmma or mma.sync), fp64 included (DMMA).
            assert r.mma != "none", aot.format_report(r)
            assert r.ctas_per_sm >= 1, aot.format_report(r)
            if r.tensor_ops is not None:
                # ... in its hot loop, and no load there may stall the loop (F6: the code norms
                # loaded after the MMA wait made every tile wait an L2 round trip).
                assert r.tensor_ops > 0, aot.format_report(r)
                assert not r.dependent_loads, aot.format_report(r)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype,D", aot.SEARCH_CASES, ids=lambda v: str(v))
def test_search_configs_compile_without_spills(arch, dtype, D):
    from vqkernels.triton import configs as cfg
    reports = _reports("search", arch, dtype, D)
    _check(reports)
    # configs.smem_estimate, which prunes the configs per device, never underestimates.
    lay = cfg.d_layout(D, dtype)
    for c, r in zip(cfg.configs(dtype, D, aot.SMEM_LIMIT[arch]), reports):
        est = cfg.smem_estimate(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, lay,
                                dtype)
        # (+4 KiB: the epilogue's cross-warp reduction scratch, which Triton aliases with the
        # pipeline buffers in some configs and not in others: 64 x 128 on 8 warps at D = 192.)
        assert r.shared <= est + 4096, (aot.format_report(r), est)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_other_kernels_compile_without_spills(arch, dtype):
    _check(_reports("other", arch, dtype, 256))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("D", aot.RESIDUAL_DS, ids=lambda d: f"D={d}")
def test_residual_and_grouped_kernels_compile_without_spills(arch, D):
    # The fused residual kernel (issue 17) at its launcher's blocks, with and without quantizer
    # dropout, and its grouped launch: no spills (a (BLOCK_N, D) register tile spilled 23 KB at
    # D = 256 before the residual moved to chunked scratch), registers and CTAs/SM reported, the
    # D loop on the tensor cores with no load it waits for.
    reports = _reports("residual", arch, "float32", D)
    _check(reports)
    assert {r.kernel for r in reports} == {"rvq_fused", "rvq_grouped"}
    for r in reports:
        assert r.mma != "none" and r.registers > 0 and r.ctas_per_sm >= 1, aot.format_report(r)
        # 64-row blocks are what give sm_90 its wgmma (32-row blocks compile to mma.sync).
        assert r.mma == ("wgmma" if arch == 90 else "mma"), aot.format_report(r)
        if r.tensor_ops is not None:
            assert r.tensor_ops > 0 and not r.dependent_loads, aot.format_report(r)
            assert not r.calls, aot.format_report(r)


@pytest.mark.skipif(not HAVE_NVDISASM, reason="nvdisasm not found (Triton's NVIDIA backend or the "
                                               "CUDA toolkit): no SASS to read")
@pytest.mark.parametrize("D", [64, 256])
def test_sm90_has_a_wide_wgmma_tile(D):
    # F7: with per-column state the tiles stopped at n = 64 wgmma, half the operand reuse of
    # n = 128. The 16-bit set must keep a config that compiles to n >= 128 on sm_90.
    reports = _reports("search", 90, "bfloat16", D)
    _check(reports)
    assert max(r.wgmma_n or 0 for r in reports) >= 128, [aot.format_report(r) for r in reports]


# A hand-written loop in nvdisasm's format: the analysis itself, without any tool.
_SASS = """
	.text.k:
k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/              @!P0 LDG.E.64 R2, desc[UR4][R10.64] ;
        /*0020*/                   LDG.E R8, desc[UR4][R12.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R6.64], P1 ;
        /*0040*/                   HMMA.16816.F32.BF16 R20, R4, R6, R20 ;
        /*0050*/                   FADD R24, -R20, R2 ;
        /*0060*/                   LDG.E.U16 R5, desc[UR4][R14.64] ;
        /*0070*/                   STS.U16 [R7+0x100], R5 ;
        /*0080*/                   FADD R25, R8, R25 ;
        /*0090*/               @P2 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
"""


def test_sass_analysis_finds_dependent_loads():
    (ins, labels), = sass.parse(_SASS).values()
    r = sass.analyse(ins, labels)
    assert r.instructions == 9 and r.tensor_ops == 1 and r.tensor_kinds == "HMMA.16816.F32.BF16"
    # R2 is covered by the HMMA, cp.async never counts; R5 goes straight to shared memory and
    # R8, loaded before the HMMA, is read after it: only the U16 load is dependent.
    assert r.dependent_loads == ("LDG.E.U16 -> STS.U16",)
    # With the MMA moved after the uses, nothing covers the first two loads either.
    hmma = "HMMA.16816.F32.BF16 R20, R4, R6, R20"
    moved = _SASS.replace(hmma, "NOP").replace("@P2 BRA", hmma + " ;\n /*0088*/ @P2 BRA")
    (ins2, labels2), = sass.parse(moved).values()
    r2 = sass.analyse(ins2, labels2)
    assert r2.tensor_ops == 1 and len(r2.dependent_loads) == 3, r2


def test_ctas_per_sm():
    # 256 threads at 170 registers: 8 warps x 6 x 256-register units = 47 KiB of the 64 KiB file.
    assert sass.ctas_per_sm(90, 170, 99 * 1024, 8) == 1
    assert sass.ctas_per_sm(90, 128, 40 * 1024, 8) == 2        # registers: 2 x 32 KiB
    assert sass.ctas_per_sm(90, 64, 100 * 1024, 8) == 2        # shared memory: 228 / 101
    assert sass.ctas_per_sm(80, 64, 100 * 1024, 8) == 1        # sm_80 has 164 KiB
    assert sass.ctas_per_sm(90, 32, 0, 4) == 16                # warps: 64 / 4


@pytest.mark.skipif(not HAVE_NVDISASM, reason="nvdisasm not found (Triton's NVIDIA backend or the "
                                               "CUDA toolkit): no SASS to read")
@pytest.mark.parametrize("D", [192, 200, 256])
def test_sm90_mma_depth_is_d_rounded_to_16(D):
    # F12: a D between powers of two ran next_pow2(D)-deep MMAs (16 HGMMA.64x64x16 per code tile
    # at D = 192 or 200). Each warpgroup's wgmma chain is now D rounded up to 16 deep: 12 at 192,
    # 13 at 200 (128 + 64 + 16), 16 at 256, in the 128 x 64 workhorse config.
    from vqkernels.triton import configs as cfg
    reports = _reports("search", 90, "bfloat16", D)
    (r,) = [r for r in reports if r.config.startswith("BLOCK_N=128 BLOCK_K=64 ")]
    assert r.tensor_kinds == "HGMMA.64x64x16.F32.BF16", aot.format_report(r)
    assert r.tensor_ops == cfg.d_layout(D, "bfloat16").padded // 16 == -(-D // 16), \
        aot.format_report(r)


def test_outer_loop_loads_are_checked():
    # The D-chunked search has its chunk loop inside the code-tile loop: a load in the outer loop
    # used with no MMA in between (a tail piece's code tile stored to shared memory at once) is
    # reported as "outer:", the inner loop's own facts unchanged.
    outer = ("\t.text.k:\nk:\n.L_x_0:\n"
             "        /*0000*/                   LDG.E.64 R2, desc[UR4][R10.64] ;\n"
             "        /*0010*/                   STS.64 [R7], R2 ;\n"
             ".L_x_1:\n"
             "        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;\n"
             "        /*0030*/               @P1 BRA `(.L_x_1) ;\n"
             "        /*0040*/               @P2 BRA `(.L_x_0) ;\n"
             "        /*0050*/                   EXIT ;\n")
    (ins, labels), = sass.parse(outer).values()
    assert sass.analyse(ins, labels).dependent_loads == ()
    r = sass.analyse(ins, labels, outer=True)
    assert r.tensor_ops == 1 and r.dependent_loads == ("outer: LDG.E.64 -> STS.64",), r
