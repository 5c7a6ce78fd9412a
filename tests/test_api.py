"""The public API: gradients, torch integration, errors, the module, and the reference itself."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vqkernels
from vqkernels import VectorQuantizer, nearest_code, reference, vq_quantize
from conftest import backend_device_params, backend_params
from helpers import assert_search_ok, exact_sqdist, make_inputs

CPU_BACKENDS = backend_params("cpu")


# ---------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_reference_is_exact_brute_force(monkeypatch, chunk):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", chunk)
    z, cb = make_inputs(203, 37, 11, torch.float64)
    z_q, idx, sqerr, counts = reference.forward(z, cb)
    d = exact_sqdist(z, cb)
    torch.testing.assert_close(d.gather(1, idx[:, None])[:, 0], d.min(1).values, rtol=0, atol=0)
    torch.testing.assert_close(sqerr, d.min(1).values, rtol=1e-14, atol=0)
    assert torch.equal(z_q, cb[idx])
    assert torch.equal(counts, torch.bincount(idx, minlength=37))


# ---------------------------------------------------------------------------- gradient flow
class _TinyAE(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 4, 1)
        self.vq = VectorQuantizer(8, 4, beta=0.25, channel_dim=1, backend=backend, ema=False,
                                  restart_after=None, kmeans_init=False)
        self.dec = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x):
        out = self.vq(self.enc(x))
        return self.dec(out.z_q), out


def _grads(model):
    return {n: (p.grad is not None and bool(p.grad.abs().sum() > 0))
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_each_loss_reaches_only_its_side(backend, device):
    x = torch.randn(2, 3, 4, 4, device=device)
    model = _TinyAE(backend).to(device)
    with torch.no_grad():  # codes near the encoder outputs so every loss is non-trivial
        model.vq.codebook.copy_(torch.randn(8, 4))

    def reached(term):
        model.zero_grad(set_to_none=True)
        recon, out = model(x)
        {"recon": lambda: ((recon - x) ** 2).mean(), "codebook": lambda: out.codebook_loss,
         "commit": lambda: out.commitment_loss}[term]().backward()
        g = _grads(model)
        return {"enc": g["enc.weight"], "cb": g["vq.codebook"], "dec": g["dec.weight"]}

    # Seed figures 2-4: reconstruction -> decoder and (straight through) encoder, never codebook;
    # codebook loss -> codebook only; commitment loss -> encoder only.
    assert reached("recon") == {"enc": True, "cb": False, "dec": True}
    assert reached("codebook") == {"enc": False, "cb": True, "dec": False}
    assert reached("commit") == {"enc": True, "cb": False, "dec": False}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_straight_through_is_identity(backend):
    z = torch.randn(9, 5, requires_grad=True)
    cb = torch.randn(6, 5)
    out = vq_quantize(z, cb, backend=backend)
    g = torch.randn(9, 5)
    (out.z_q * g).sum().backward()
    assert torch.equal(z.grad, g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    # Each loss is a true function of the side its gradient reaches, so gradcheck applies to it
    # with the other side held constant (the stop-gradient). Away from ties the choice of codes is
    # fixed under gradcheck's small perturbations.
    z, cb = make_inputs(6, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(
        lambda c: vq_quantize(z, c, backend=backend).codebook_loss,
        (cb.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(
        lambda x: vq_quantize(x, cb, backend=backend).commitment_loss,
        (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    zc = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: vq_quantize(x, cb, dim=1, backend=backend).commitment_loss,
        (zc.requires_grad_(True),), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------- torch integration
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    z, cb = make_inputs(10, 6, 4)
    zr, cbr = z.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.vqkernels.nearest_code.default, (z, cb, -1, backend))
    torch.library.opcheck(torch.ops.vqkernels.vq_quantize.default, (zr, cbr, 1, backend))
    zc = torch.randn(2, 4, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.vqkernels.vq_quantize.default, (zc, cbr, 1, backend))
    zs = torch.randn(5, 4, 6)[::2, 1:, ::2].permute(1, 0, 2).requires_grad_(True)  # no (B, S) view
    torch.library.opcheck(torch.ops.vqkernels.vq_quantize.default, (zs, cbr[:, :3].contiguous(), 2, backend))
    idx = torch.randint(0, 6, (10,))
    g = torch.randn(10)
    torch.library.opcheck(torch.ops.vqkernels.vq_quantize_backward.default,
                          (torch.randn(10, 4), g, g, z, cb, idx, 1, backend))


@pytest.mark.parametrize("backend,compiler", [("cpu", "inductor"), ("reference", "aot_eager")])
def test_torch_compile_fullgraph(backend, compiler):
    if not vqkernels.available_backends()[backend].available:
        pytest.skip(vqkernels.available_backends()[backend].detail)
    torch._dynamo.reset()
    model = _TinyAE(backend)
    x = torch.randn(2, 3, 4, 4)

    def step(x):
        recon, out = model(x)
        loss = ((recon - x) ** 2).mean() + out.loss
        return loss, out.indices, out.perplexity

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss_c, idx_c, ppl_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e, idx_e, ppl_e = step(x)
    loss_e.backward()
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(ppl_c, ppl_e)
    for gc, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(gc, p.grad)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,kind,match", [
    (lambda z, cb: vq_quantize(z.numpy(), cb), TypeError, "z_e must be a torch.Tensor"),
    (lambda z, cb: vq_quantize(z, cb[0]), ValueError, "codebook must be 2-D"),
    (lambda z, cb: vq_quantize(z, cb[:0]), ValueError, "K = 0"),
    (lambda z, cb: vq_quantize(z, cb[:, :3]), ValueError, "D=3"),
    (lambda z, cb: vq_quantize(z, cb.double()), TypeError, "codebook dtype"),
    (lambda z, cb: vq_quantize(z.long(), cb.long()), TypeError, "z_e must be float"),
    (lambda z, cb: vq_quantize(z, cb, dim=2), ValueError, "dim=2 is out of range"),
    (lambda z, cb: vq_quantize(z, cb, dim=0), ValueError, "along dim=0"),
    (lambda z, cb: vq_quantize(z, cb, backend="fast"), ValueError, "backend must be one of"),
    (lambda z, cb: vq_quantize(z, cb, beta=-1.0), ValueError, "beta"),
    (lambda z, cb: vq_quantize(z, cb, beta=float("nan")), ValueError, "beta"),
    (lambda z, cb: vq_quantize(z, cb, beta=torch.tensor([0.1, 0.2])), ValueError,
     "beta must be a number or a one-element real tensor"),
    (lambda z, cb: vq_quantize(z, cb, beta=torch.tensor(0.3, requires_grad=True)), ValueError,
     "beta must not require grad"),
    (lambda z, cb: vq_quantize(z, cb, beta=torch.tensor(-0.5)), ValueError, "beta must be a finite"),
    (lambda z, cb: vq_quantize(z, cb, beta="0.25"), ValueError, "beta must be a finite"),
    (lambda z, cb: nearest_code(z, cb.t()), ValueError, "codes have D="),
    (lambda z, cb: nearest_code(torch.tensor(1.0), cb), ValueError, "at least one dimension"),
    (lambda z, cb: vq_quantize(z, cb.to("meta")), ValueError, "codebook is on meta"),
    (lambda z, cb: vq_quantize(z[:, :0], cb[:, :0]), ValueError, "D = 0"),
    (lambda z, cb: nearest_code(z[:, :0], cb[:, :0], backend="cpu"), ValueError, "D = 0"),
    (lambda z, cb: vq_quantize(z, cb, beta=1e308), ValueError, "beta=1e\\+308 does not fit"),
    (lambda z, cb: vq_quantize(z.to_sparse(), cb), TypeError, "z_e must be a dense"),
    (lambda z, cb: nearest_code(z, cb.to_sparse()), TypeError, "codebook must be a dense"),
    (lambda z, cb: vq_quantize(torch.nested.nested_tensor([z[:2], z[2:]], layout=torch.jagged),
                               cb), TypeError,
     "z_e must be a dense tensor, got a nested"),
    (lambda z, cb: VectorQuantizer(3, 4, channel_dim=1.5), TypeError, "channel_dim must be an int"),
    (lambda z, cb: torch.func.grad(lambda x: vq_quantize(x, cb).loss)(z), NotImplementedError,
     "torch.func transform"),
])
def test_bad_input_names_the_argument(call, kind, match):
    z, cb = torch.randn(5, 4), torch.randn(3, 4)
    with pytest.raises(kind, match=match):
        call(z, cb)


def test_beta_may_be_a_one_element_tensor():
    # A schedule often keeps beta as a tensor (a buffer): its value weights the commitment loss
    # exactly as the same Python float does, in every op that takes beta.
    from vqkernels import grouped_vq, residual_vq
    z, cb = torch.randn(6, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    for fn, book in ((vq_quantize, cb), (residual_vq, [cb, cb]), (grouped_vq, [cb[:, :2], cb[:, 2:]])):
        a = fn(z, book, beta=torch.tensor([0.7], dtype=torch.float64))
        b = fn(z, book, beta=0.7)
        assert torch.equal(a.loss, b.loss), fn.__name__
        ga = torch.autograd.grad(a.loss, (z, cb))
        gb = torch.autograd.grad(b.loss, (z, cb))
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)), fn.__name__
    assert VectorQuantizer(3, 4, beta=torch.tensor(0.5)).beta == 0.5


def test_channel_dim_is_the_axis_name_everywhere():
    # channel_dim names the channel axis in every op and in every module's forward; dim, its
    # former name, still works; giving both is refused.
    from vqkernels import (GroupedVectorQuantizer, ResidualVectorQuantizer, grouped_vq,
                           residual_vq)
    torch.manual_seed(0)
    z, cb = torch.randn(2, 4, 5), torch.randn(7, 4)
    zl = z.movedim(1, -1)
    calls = [
        lambda **a: vq_quantize(z, cb, **a),
        lambda **a: residual_vq(z, [cb, cb], **a),
        lambda **a: grouped_vq(z, [cb[:, :2], cb[:, 2:]], **a),
        lambda **a: VectorQuantizer(7, 4, ema=False, kmeans_init=False).eval()(z, **a),
        lambda **a: ResidualVectorQuantizer(4, 2, 7, ema=False, kmeans_init=False).eval()(z, **a),
        lambda **a: GroupedVectorQuantizer(4, 2, 7, ema=False, kmeans_init=False).eval()(z, **a),
    ]
    for call in calls:
        torch.manual_seed(1)
        a = call(channel_dim=1)
        torch.manual_seed(1)
        b = call(dim=1)
        assert torch.equal(a.z_q, b.z_q) and torch.equal(a.indices, b.indices)
        assert a.z_q.shape == z.shape and a.indices.shape[:2] == zl.shape[:2]
        with pytest.raises(TypeError, match="not both"):
            call(channel_dim=1, dim=1)


def test_double_backward_says_it_is_not_supported():
    z, cb = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    out = vq_quantize(z, cb, backend="reference")
    g, = torch.autograd.grad(out.loss, z, create_graph=True)  # recording the backward is fine
    torch.testing.assert_close(g, torch.autograd.grad(vq_quantize(z, cb).loss, z)[0])
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(g.sum(), z)


def test_meta_tensors_give_shapes():
    # no data, no kernel: the op's fake implementation answers with the outputs' shapes
    out = vq_quantize(torch.empty(2, 4, 3, 3, device="meta"), torch.empty(7, 4, device="meta"),
                      dim=1)
    assert out.z_q.shape == (2, 4, 3, 3) and out.indices.shape == (2, 3, 3)
    assert out.z_q.device.type == "meta"


def test_unavailable_backend_says_why():
    st = vqkernels.available_backends()
    assert set(st) == {"triton", "cuda", "cpu", "reference"}
    assert st["reference"].available
    for name, s in st.items():
        assert s.detail  # either where it runs or why it can't
    z, cb = torch.randn(5, 4), torch.randn(3, 4)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*"):
            vq_quantize(z, cb, backend="cuda")


def test_missing_native_module_is_explained_and_avoided(monkeypatch):
    from vqkernels import native
    monkeypatch.setattr(native, "_load", lambda: (None, "vqkernels._C could not be imported (test)"))
    st = vqkernels.available_backends()
    assert not st["cpu"].available and "could not be imported" in st["cpu"].detail
    assert not st["cuda"].available
    z, cb = torch.randn(7, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="backend='cpu' is not available: vqkernels._C"):
        vq_quantize(z, cb, backend="cpu")
    out = vq_quantize(z, cb)  # auto falls back to the reference
    assert_search_ok(z, cb, out.indices)


def test_missing_triton_is_explained(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    st = vqkernels.available_backends()["triton"]
    assert not st.available and "pip install triton" in st.detail


def test_check_finite_codebook():
    z, cb = torch.randn(5, 4), torch.randn(3, 4)
    cb[1, 2] = float("inf")
    with pytest.raises(ValueError, match="codebook contains NaN"):
        vq_quantize(z, cb, check_finite=True)
    with pytest.raises(ValueError, match="x contains NaN"):
        nearest_code(torch.full((2, 4), float("nan")), cb, check_finite=True)


# ---------------------------------------------------------------------------- module and outputs
def test_vector_quantizer_module():
    vq = VectorQuantizer(16, 8, beta=0.5, ema=False, restart_after=None, kmeans_init=False)
    assert vq.codebook.shape == (16, 8)
    cb = vq.codebook.detach()
    assert float(cb.abs().max()) <= 1 / 16
    assert float(cb.std()) > 0  # initialised, not left empty or zero
    z = torch.randn(2, 3, 8)
    out = vq(z)
    assert isinstance(out, vqkernels.VQOutput)
    torch.testing.assert_close(out.loss, out.codebook_loss + 0.5 * out.commitment_loss)
    # Mixed precision: bf16 input searches a bf16 copy; the gradient lands on the fp32 codebook.
    zb = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    ob = vq(zb)
    assert ob.z_q.dtype == torch.bfloat16
    ob.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="num_codes"):
        VectorQuantizer(0, 4, ema=False, restart_after=None, kmeans_init=False)


def test_empty_input_gives_zero_losses():
    z = torch.randn(0, 3, 4, requires_grad=True)
    out = vq_quantize(z, torch.randn(5, 4))
    assert out.z_q.shape == (0, 3, 4) and out.indices.shape == (0, 3)
    assert float(out.loss.detach()) == 0.0 and float(out.perplexity) == 1.0
    out.loss.backward()
    assert z.grad.shape == z.shape


def test_perplexity_of_uniform_usage():
    cb = torch.eye(4)
    z = cb.repeat(3, 1)  # every code used equally
    assert abs(float(vq_quantize(z, cb).perplexity) - 4.0) < 1e-5
    assert abs(float(vq_quantize(cb[:1].repeat(5, 1), cb).perplexity) - 1.0) < 1e-6


# ---------------------------------------------------------------------------- property test
@settings(max_examples=40, deadline=None)
@given(N=st.integers(0, 40), K=st.integers(1, 20), D=st.integers(1, 12),
       scale=st.sampled_from([1e-2, 1.0, 1e2]), seed=st.integers(0, 2**31 - 1),
       backend=st.sampled_from([p.values[0] for p in CPU_BACKENDS if not p.marks]))
def test_property_against_float64(N, K, D, scale, seed, backend):
    g = torch.Generator().manual_seed(seed)
    z, cb = make_inputs(N, K, D, torch.float32, scale=scale, gen=g)
    idx, sq = nearest_code(z, cb, backend=backend)
    assert_search_ok(z, cb, idx, sq)


# ---------------------------------------------------------------------------- memory
_PEAK_SCRIPT = r"""
import gc, resource, sys, torch
torch.set_num_threads(1)
from vqkernels import nearest_code, vq_quantize
what, backend = sys.argv[1], sys.argv[2]
D, K = 64, 16
N = (256 << 20) // (4 * D)  # a 256 MB float32 input
cb = torch.randn(K, D, requires_grad=True)
z = torch.randn(N, D)
small = torch.randn(1000, D, requires_grad=True)  # first calls' one-off allocations, not counted
vq_quantize(small, cb, backend=backend).loss.backward()
nearest_code(small.detach(), cb.detach(), backend=backend)
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if what == "search":
    idx, sqdist = nearest_code(z, cb.detach(), backend=backend)
else:
    z.requires_grad_(True)
    out = vq_quantize(z, cb, backend=backend)  # kept, as a training step keeps its outputs
    out.loss.backward()  # z_q unused: it gets no gradient
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / z.numel() / 4)
"""


@pytest.mark.parametrize("what,limits", [("search", {"cpu": 0.25, "reference": 2.0}),
                                          ("train", {"cpu": 2.5, "reference": 3.0})])
@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.values[0] in ("cpu", "reference")])
def test_peak_memory_beyond_input_and_outputs(what, limits, backend):
    """Peak RSS above the input, in units of the input's size, for a 256 MB input: a search
    makes indices and distances only (no z_q it would throw away: that was 1.05x), and forward +
    backward makes z_q and grad_z (2x) and no zero-filled gradient for the unused z_q (that was
    3.1x). The reference works in float64 chunks of rows (it needed 8x the input when it made
    whole-input float64 copies)."""
    limit = limits[backend]
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, what, backend], capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    extra = float(r.stdout.strip().splitlines()[-1])
    assert extra < limit, f"{what}: peak {extra:.2f}x the input beyond it"


def test_yes_no_settings_parse_one_way_and_name_a_typo(monkeypatch):
    # VQK_DETERMINISTIC=bogus used to count as on, VQK_HUGEPAGES=off as on, VQK_TRITON_OP="" as off.
    from vqkernels import _env, backends, native
    for v, want in [("1", True), (" ON", True), ("yes", True), ("0", False), ("off", False),
                    ("False", False), ("", None)]:
        monkeypatch.setenv("VQK_DETERMINISTIC", v)
        assert _env.flag("VQK_DETERMINISTIC", True) is (True if want is None else want)
        assert _env.flag("VQK_DETERMINISTIC", False) is (False if want is None else want)
    monkeypatch.setenv("VQK_DETERMINISTIC", "bogus")
    with pytest.raises(ValueError, match="VQK_DETERMINISTIC.*'bogus'"):
        backends.deterministic()
    monkeypatch.setenv("VQK_HUGEPAGES", "of")
    with pytest.raises(ValueError, match="VQK_HUGEPAGES"):
        native.fresh_output(torch.empty(native.HUGEPAGE_MIN_BYTES, dtype=torch.uint8))
