"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90 (no GPU needed): every
autotune config of the search kernel, plus the split-K merge and backward kernels. Asserts that
ptxas reports no spills and that shared memory fits the arch; prints registers and shared memory
per config (see them with `pytest -s` or `python -m vqkernels.triton.aot`)."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
aot = pytest.importorskip("vqkernels.triton.aot")

ARCHS = (80, 90)


def _check(reports):
    for r in reports:
        print(aot.format_report(r))
    for r in reports:
        assert r.spill_store == 0 and r.spill_load == 0, f"spills: {aot.format_report(r)}"
        assert r.shared <= aot.SMEM_LIMIT[r.arch], f"shared memory: {aot.format_report(r)}"
        if r.kernel == "vq_search":
            # The search must run on the tensor cores (wgmma or mma.sync), fp64 included (DMMA).
            assert r.mma != "none", aot.format_report(r)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype,D", aot.SEARCH_CASES, ids=lambda v: str(v))
def test_search_configs_compile_without_spills(arch, dtype, D):
    from vqkernels.triton import configs as cfg
    reports = aot.reports_in_subprocess("search", arch, dtype, D)
    _check(reports)
    # configs.smem_estimate, which prunes the configs per device, never underestimates.
    bd = cfg.block_d(D, dtype)
    for c, r in zip(cfg.configs(dtype, D, aot.SMEM_LIMIT[arch]), reports):
        est = cfg.smem_estimate(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, bd,
                                triton.cdiv(D, bd), dtype)
        assert r.shared <= est + 1024, (aot.format_report(r), est)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_other_kernels_compile_without_spills(arch, dtype):
    _check(aot.reports_in_subprocess("other", arch, dtype, 256))
