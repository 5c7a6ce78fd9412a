"""Which threads run the native CPU kernels (VQK_CPU_POOL, vqkernels.native.set_cpu_pool): the
module's own pool, or the OpenMP runtime torch already runs its ops on. Both must give the same
answers, bit for bit (every parallel region hands out its work dynamically, and no sum depends on
which thread took which piece); the OpenMP path must really run on torch's threads (no pool thread
of ours is started), and a forked child must not touch the parent's threads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adversarial as A
from helpers import wait_for_child
import vqkernels
from vqkernels import native
from vqkernels._layout import NULL_VIEW, RowPlan

pytestmark = pytest.mark.skipif(native.cpu_status() is not None,
                                reason=f"native CPU kernel: {native.cpu_status()}")

ON_OPENMP = native.cpu_status() is None and native.set_cpu_pool("auto") != "own"
needs_openmp = pytest.mark.skipif(not ON_OPENMP,
                                  reason="torch's ops do not run on one loadable OpenMP runtime here")


@pytest.fixture
def pool():
    """Restores the default choice after the test."""
    yield native.set_cpu_pool
    native.set_cpu_pool(os.environ.get("VQK_CPU_POOL", ""))


def test_bad_choice_names_the_setting(pool):
    with pytest.raises(ValueError, match="VQK_CPU_POOL must be one of auto/openmp/own"):
        pool("threads")
    assert pool(" OWN ") == "own" and native.cpu_pool() == "own"


def test_openmp_required_but_missing_says_why(pool, monkeypatch):
    monkeypatch.setattr(native, "openmp_runtimes", lambda: [])
    with pytest.raises(RuntimeError, match="VQK_CPU_POOL=openmp: 0 OpenMP runtimes are loaded"):
        pool("openmp")
    assert pool("auto") == "own"  # auto falls back quietly
    monkeypatch.setattr(native, "openmp_runtimes", lambda: ["/a/libgomp.so.1", "/b/libomp.so"])
    with pytest.raises(RuntimeError, match="2 OpenMP runtimes"):
        pool("openmp")
    # A runtime that is not loaded in this process is never loaded by the module.
    monkeypatch.setattr(native, "openmp_runtimes", lambda: ["/nonexistent/libgomp.so.1"])
    with pytest.raises(RuntimeError, match="has no GOMP_parallel"):
        pool("openmp")
    assert native.cpu_pool() == "own"


def _workload(seed):
    """Every native CPU entry point on work large enough for two threads: fresh random rows,
    near ties far from the origin, duplicated codes; returns every output and gradient."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for x, cb in (A.close_codes(g, N=3000, K=300, D=32, n_close=5, spacing=4),
                  A.duplicated(g, N=3000, K0=100, D=24, copies=3),
                  (torch.randn(4000, 64, generator=g), torch.randn(512, 64, generator=g))):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            z = x.to(dtype).requires_grad_(True)
            c = cb.to(dtype).requires_grad_(True)
            o = vqkernels.vq_quantize(z, c, backend="cpu")
            gz, gc = torch.autograd.grad((o.z_q * 0.5).sum() + o.loss, [z, c])
            outs += [o.z_q, o.indices, o.loss, gz, gc]
    z = torch.randn(2048, 4 * 32, generator=g, requires_grad=True)
    books = [torch.randn(256, 32, generator=g, requires_grad=True) for _ in range(4)]
    o = vqkernels.grouped_vq(z, books, backend="cpu")
    outs += [o.z_q, o.indices, o.loss, *torch.autograd.grad(o.z_q.sum() + o.loss, [z, *books])]
    z = torch.randn(2048, 32, generator=g, requires_grad=True)
    stages = [(torch.randn(256, 32, generator=g) * 0.5 ** s).requires_grad_(True) for s in range(3)]
    o = vqkernels.residual_vq(z, stages, backend="cpu")
    outs += [o.z_q, o.indices, o.loss, *torch.autograd.grad(o.z_q.sum() + o.loss, [z, *stages])]
    return outs


@needs_openmp
@pytest.mark.parametrize("seed", [0, 1])
def test_both_pools_give_the_same_bits(pool, seed):
    assert torch.get_num_threads() >= 2 or pytest.skip("one thread: no parallel region runs")
    got = {}
    for choice in ("own", "openmp", "own"):
        assert pool(choice).startswith("own" if choice == "own" else "openmp:")
        got.setdefault(choice, []).append(_workload(seed))
    for a, b, c in zip(got["own"][0], got["openmp"][0], got["own"][1]):
        assert torch.equal(a, b) and torch.equal(a, c)


_THREADS_PROBE = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(2)
    import vqkernels
    from vqkernels import native
    def threads():
        return len(os.listdir("/proc/self/task"))
    torch.randn(4096, 1024) * torch.randn(4096, 1024)  # torch's OpenMP team is up
    before = threads()
    z, cb = torch.randn(8192, 64), torch.randn(1024, 64)
    for _ in range(3):
        vqkernels.vq_quantize(z, cb, backend="cpu")
    print(json.dumps({"pool": native.cpu_pool(), "before": before, "after": threads()}))
""")


@needs_openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("choice", ["own", "openmp"])
def test_openmp_pool_runs_on_torchs_threads(choice):
    # With torch's threads no thread of ours is ever started; with the own pool one worker is
    # (two threads: the caller and one worker). (Under auto a late team, on a loaded machine,
    # may send a call to the own pool, so the strict choice is the one tested here.)
    env = dict(os.environ, VQK_CPU_POOL=choice)
    out = subprocess.run([sys.executable, "-c", _THREADS_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if choice == "own":
        assert r["pool"] == "own" and r["after"] == r["before"] + 1, r
    else:
        assert r["pool"].startswith("openmp:") and "omp" in os.path.basename(r["pool"]), r
        assert r["after"] == r["before"], r


_FALL_BACK_PROBE = textwrap.dedent("""
    import json, os, time, torch
    torch.set_num_threads(2)
    import vqkernels
    from vqkernels import native
    assert native.set_cpu_pool("auto").startswith("openmp:")
    def threads():
        return len(os.listdir("/proc/self/task"))
    torch.randn(4096, 1024) * torch.randn(4096, 1024)  # torch's OpenMP team is up
    # Two threads' worth of work (> 8 MFLOP), small against the lateness even under sanitizers.
    z, cb = torch.randn(2048, 32), torch.randn(256, 32)
    seen = {"before": threads()}
    vqkernels.vq_quantize(z, cb, backend="cpu")   # a team thread comes 30 ms late
    seen["pool after a late team"] = native.cpu_pool()
    vqkernels.vq_quantize(z, cb, backend="cpu")   # so this one runs on the own pool
    seen["threads added"] = threads() - seen["before"]
    time.sleep(0.2)                               # the 50 ms fall-back period is over
    seen["pool later"] = native.cpu_pool()
    print(json.dumps(seen))
""")


@needs_openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_auto_falls_back_to_the_own_pool_after_a_late_team():
    # VQK_DEBUG_OMP_LATE_US makes every team thread but the caller start late, as when other
    # processes hold the cores: the region's closing barrier waits for it, so auto takes the own
    # pool (whose late workers are not waited for) for the next 50 ms.
    env = dict(os.environ, VQK_CPU_POOL="auto", VQK_DEBUG_OMP_LATE_US="30000")
    out = subprocess.run([sys.executable, "-c", _FALL_BACK_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["pool after a late team"] == "own (falling back)", r
    assert r["threads added"] == 1, r  # the own pool's worker started
    assert r["pool later"].startswith("openmp:"), r


@needs_openmp
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_leaves_the_parents_openmp_threads_alone(pool):
    # After fork only the forking thread exists in the child, and torch's OpenMP team is the
    # parent's: the child's kernels take the own pool (cpu_pool says so) and finish. The child
    # calls only the native module and numpy (torch's OpenMP pool is not usable after fork);
    # tests/test_cpu_kernel.py has the same for a parent on the own pool.
    pool("openmp")
    N, K, D = 4000, 300, 48
    z, cb = torch.randn(N, D), torch.randn(K, D)
    want = vqkernels.vq_quantize(z, cb, backend="cpu").indices  # the parent's team is up
    idx = torch.full((N,), -1, dtype=torch.long)
    err, counts = torch.empty(N), torch.empty(K, dtype=torch.long)
    xv = RowPlan(z, -1).view(z)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            m = native.module()
            m.cpu_forward(0, xv.as_args(), cb.data_ptr(), K, NULL_VIEW, idx.data_ptr(),
                          err.data_ptr(), counts.data_ptr(), 2)
            ok = m.cpu_pool() == "own" and bool((idx.numpy() == want.numpy()).all())
            os.write(w, b"ok" if ok else m.cpu_pool().encode())
        finally:
            os._exit(0)
    os.close(w)
    status = wait_for_child(pid, 120, "the forked child hung in the CPU kernel (on the parent's "
                                      "OpenMP team?)")
    msg = os.read(r, 4096)
    os.close(r)
    assert os.WIFEXITED(status) and msg == b"ok", msg
    assert native.cpu_pool().startswith("openmp:")  # the parent is still on torch's threads
