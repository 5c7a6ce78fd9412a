"""Fresh CPU outputs advised onto transparent huge pages (vqkernels.native.fresh_output): the advice
lands on exactly the whole 2 MiB pages inside the buffer, changes no value, and VQK_HUGEPAGES=0 or
a small buffer leaves memory alone."""
from __future__ import annotations

import sys

import pytest
import torch

import vqkernels
from vqkernels import native

pytestmark = pytest.mark.skipif(native.cpu_status() is not None or not sys.platform.startswith("linux"),
                                reason="needs the native module on Linux (madvise)")
HUGE = 1 << 21


def _advised_ranges() -> list[tuple[int, int]]:
    """The mappings of this process whose VmFlags carry `hg` (MADV_HUGEPAGE), from smaps."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                cur = (lo, hi)
            elif line.startswith("VmFlags:") and " hg" in line and cur is not None:
                out.append(cur)
    return out


def _covered(lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in _advised_ranges())


# Buffers above glibc's largest mmap threshold (32 MiB) get a mapping of their own, never heap
# memory an earlier test may have advised already.
FRESH = 40 << 20


def test_advice_covers_the_whole_huge_pages_inside_and_nothing_else():
    # A mapping of its own straight from mmap: a torch buffer, even of 40 MiB, came from memory an
    # earlier test had advised in one CI run (late in the full suite; the allocator had reused it).
    import ctypes
    import mmap
    m = mmap.mmap(-1, FRESH + 3 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = (ctypes.c_char * len(m)).from_buffer(m)
    try:
        p, n = ctypes.addressof(view) + 4096, len(m) - 4096  # start off a 2 MiB boundary
        lo = (p + HUGE - 1) // HUGE * HUGE
        hi = (p + n) // HUGE * HUGE
        assert not _covered(lo, lo + HUGE)
        assert native.module().advise_hugepages(p, n)
        assert _covered(lo, hi)
        # The partial pages at either end were not advised (they may hold other allocations).
        if lo > p:
            assert not _covered(lo - 4096, lo)
        if hi < p + n:
            assert not _covered(hi, hi + 4096)
    finally:
        del view
        m.close()


def test_no_advice_where_no_whole_huge_page_fits():
    mod = native.module()
    buf = torch.empty(HUGE + 4096, dtype=torch.uint8)
    p = buf.data_ptr()
    start = (p + HUGE - 1) // HUGE * HUGE
    assert not mod.advise_hugepages(start + 4096, HUGE - 8192)
    assert not mod.advise_hugepages(0, 1 << 30)
    assert not mod.advise_hugepages(p, 0)


def test_fresh_output_thresholds_and_switch(monkeypatch):
    calls = []

    class Fake:
        @staticmethod
        def advise_hugepages(p, n):
            calls.append((p, n))
            return True

    monkeypatch.setattr(native, "_load", lambda: (Fake, ""))
    big = torch.empty(native.HUGEPAGE_MIN_BYTES, dtype=torch.uint8)
    view = big[1:]  # a view advises its whole (fresh) storage
    for off in ("0", "off", " False", "NO"):
        monkeypatch.setenv("VQK_HUGEPAGES", off)
        assert native.fresh_output(big) is big and calls == []
    monkeypatch.setenv("VQK_HUGEPAGES", "of")
    with pytest.raises(ValueError, match="VQK_HUGEPAGES"):
        native.fresh_output(big)
    monkeypatch.delenv("VQK_HUGEPAGES")
    assert native.fresh_output(view) is view
    assert calls == [(big.data_ptr(), big.nbytes)]
    native.fresh_output(torch.empty(native.HUGEPAGE_MIN_BYTES - 1, dtype=torch.uint8))
    native.fresh_output(torch.empty(native.HUGEPAGE_MIN_BYTES, dtype=torch.uint8, device="meta"))
    assert native.fresh_output(None) is None
    assert len(calls) == 1


def test_fresh_output_advises_for_real():
    buf = native.fresh_output(torch.empty(FRESH, dtype=torch.uint8))
    lo = (buf.data_ptr() + HUGE - 1) // HUGE * HUGE
    assert _covered(lo, (buf.data_ptr() + buf.nbytes) // HUGE * HUGE)


def test_outputs_identical_with_and_without_advice(monkeypatch):
    # 4 MiB and more of z_q and of grad_z: the advised path; the values must be the unadvised ones.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2048, 640, generator=g, requires_grad=True)
    cb = torch.randn(64, 640, generator=g, requires_grad=True)
    monkeypatch.setenv("VQK_HUGEPAGES", "0")
    ref = vqkernels.vq_quantize(z, cb, backend="cpu")
    ref_g = torch.autograd.grad(ref.z_q.square().sum() + ref.loss, (z, cb))
    monkeypatch.setenv("VQK_HUGEPAGES", "1")
    out = vqkernels.vq_quantize(z, cb, backend="cpu")
    assert out.z_q.nbytes >= native.HUGEPAGE_MIN_BYTES
    got_g = torch.autograd.grad(out.z_q.square().sum() + out.loss, (z, cb))
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.z_q, ref.z_q)
    assert all(torch.equal(a, b) for a, b in zip(got_g, ref_g))
