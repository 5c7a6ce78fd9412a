"""Numerical parity with vector-quantize-pytorch where the semantics are the same: the same
inputs and codebook give the same indices, quantized outputs, losses, gradients and codebook
updates as the peer in float32, within the peer's own float32 error. Skipped when the peer is not
installed (`pip install -e ".[compat]"`)."""
import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not "
                          "installed (pip install -e '.[compat]')")

from importlib.metadata import version  # noqa: E402

from vqkernels.compat import GroupedResidualVQ, ResidualVQ, VectorQuantize  # noqa: E402

if not version("vector-quantize-pytorch").startswith("1.32."):
    pytest.skip(f"vqkernels.compat follows vector-quantize-pytorch 1.32; "
                f"{version('vector-quantize-pytorch')} is installed (pip install -e '.[compat]')",
                allow_module_level=True)

CONFIGS = {
    "default": {},
    "cosine": dict(use_cosine_sim=True),
    "projection": dict(codebook_dim=8, layernorm_after_project_in=True),
    "heads-shared": dict(heads=4, codebook_dim=8),
    "heads-separate": dict(heads=4, codebook_dim=8, separate_codebook_per_head=True),
    "learnable": dict(learnable_codebook=True, ema_update=False, commitment_weight=0.3),
    "no-rotation": dict(rotation_trick=False, decay=0.95),
    "channel-first": dict(channel_last=False),
}


def _check_indices(ours, theirs, rows, codes):
    """Equal, except where the peer's float32 distances could not tell the two codes apart: there
    ours must be the float64 nearest."""
    diff = ours != theirs
    if not diff.any():
        return
    r, c = rows.double()[diff], codes.double()
    d_ours = ((r - c[ours[diff]]) ** 2).sum(-1)
    d_theirs = ((r - c[theirs[diff]]) ** 2).sum(-1)
    assert (d_ours <= d_theirs).all()
    scale = (r ** 2).sum(-1) + (c[theirs[diff]] ** 2).sum(-1)
    assert (d_theirs - d_ours <= 1e-5 * scale).all(), "the peer's choice was clearly worse?"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_steps_match_the_peer(name):
    kw = dict(dim=32, codebook_size=64, **CONFIGS[name])
    torch.manual_seed(0)
    peer = vqp.VectorQuantize(**kw)
    ours = VectorQuantize(**kw)
    ours.load_state_dict(peer.state_dict())  # same codebook, projections and EMA state
    for step in range(3):
        shape = (2, 32, 40) if name == "channel-first" else (2, 40, 32)
        x = torch.randn(*shape) * (1 + step)
        xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        cb_before = ours.codebook.detach().clone()
        qo, io, lo = ours(xo)
        qp, ip, lp = peer(xp)
        assert io.shape == ip.shape and qo.shape == qp.shape
        if name in ("default", "no-rotation", "learnable"):
            _check_indices(io.reshape(-1), ip.reshape(-1), x.reshape(-1, 32), cb_before)
        else:
            assert (io == ip).float().mean() > 0.99
        same = (io == ip)
        if same.all():
            torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-7)
            g = torch.randn_like(qo)
            params_o = [p for p in ours.parameters()]
            params_p = [p for p in peer.parameters()]
            go = torch.autograd.grad((qo * g).sum() + lo, [xo] + params_o, allow_unused=True)
            gp = torch.autograd.grad((qp * g).sum() + lp, [xp] + params_p, allow_unused=True)
            for a, b in zip(go, gp):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        sd_o, sd_p = ours.state_dict(), peer.state_dict()
        assert sd_o.keys() == sd_p.keys()
        for k in sd_o:
            torch.testing.assert_close(sd_o[k].float(), sd_p[k].float(), rtol=1e-4, atol=1e-5,
                                       msg=f"{name} step {step}: {k}")


def test_eval_mask_and_fmap_match_the_peer():
    torch.manual_seed(1)
    for kw, x, fkw in (
            (dict(dim=16, codebook_size=32, decay=0.9), torch.randn(3, 20, 16),
             dict(mask=torch.rand(3, 20) > 0.3)),
            (dict(dim=16, codebook_size=32, accept_image_fmap=True, heads=2, codebook_dim=8,
                  separate_codebook_per_head=True), torch.randn(2, 16, 5, 6), {}),
            (dict(dim=8, codebook_size=32, accept_3d_fmap=True), torch.randn(1, 8, 3, 4, 5), {}),
            (dict(dim=8, codebook_size=16), torch.randn(5, 8), {})):
        peer, ours = vqp.VectorQuantize(**kw), VectorQuantize(**kw)
        ours.load_state_dict(peer.state_dict())
        for training in (True, False):
            peer.train(training)
            ours.train(training)
            qo, io, lo = ours(x, **fkw)
            qp, ip, lp = peer(x, **fkw)
            assert torch.equal(io, ip)
            torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ours.get_output_from_indices(io.clamp(min=0)),
                                       peer.get_output_from_indices(ip.clamp(min=0)))
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(v.float(), peer.state_dict()[k].float(), rtol=1e-5,
                                       atol=1e-6)


def test_state_dicts_load_both_ways():
    kw = dict(dim=16, codebook_size=8, heads=2, codebook_dim=4, separate_codebook_per_head=True)
    ours = VectorQuantize(**kw)
    peer = vqp.VectorQuantize(**kw)
    peer.load_state_dict(ours.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 7, 16)
    ours.eval()
    peer.eval()
    assert torch.equal(ours(x)[1], peer(x)[1])


@pytest.mark.parametrize("training", [True, False])
def test_topk_matches_the_peer(training):
    torch.manual_seed(2)
    kw = dict(dim=16, codebook_size=40)
    peer, ours = vqp.VectorQuantize(**kw), VectorQuantize(**kw)
    ours.load_state_dict(peer.state_dict())
    peer.train(training)
    ours.train(training)
    x = torch.randn(2, 30, 16)
    mask = torch.rand(2, 30) > 0.2
    qo, io, lo = ours(x, topk=4, mask=mask)
    qp, ip, lp = peer(x, topk=4, mask=mask)
    assert qo.shape == qp.shape and io.shape == ip.shape and lo.shape == lp.shape
    assert torch.equal(io, ip)  # random data: no near ties among the 5 nearest
    torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-7)
    for k, v in ours.state_dict().items():  # topk updates no codebook, in either
        assert torch.equal(v, peer.state_dict()[k])


RVQ_CONFIGS = {
    "default": dict(num_quantizers=4, codebook_size=32),
    "sizes-dropout-grad-frac": dict(codebook_size=(8, 16, 32), quantize_dropout=True,
                                    quantize_dropout_cutoff_index=1, quant_grad_frac=0.1),
    "shared-cosine-projection": dict(num_quantizers=3, codebook_size=32, codebook_dim=8,
                                     shared_codebook=True, use_cosine_sim=True),
    "dead-codes-no-rotation": dict(num_quantizers=3, codebook_size=64, decay=0.9,
                                   threshold_ema_dead_code=0.5, rotation_trick=False),
}


def _same_state(ours, peer, msg):
    sd_o, sd_p = ours.state_dict(), peer.state_dict()
    assert sd_o.keys() == sd_p.keys()
    for k in sd_o:
        torch.testing.assert_close(sd_o[k].float(), sd_p[k].float(), rtol=1e-4, atol=1e-5,
                                   msg=f"{msg}: {k}")


@pytest.mark.parametrize("name", list(RVQ_CONFIGS))
def test_residual_vq_matches_the_peer(name):
    """Two training steps and one eval step from the same state and the same dropout draw (the
    torch seed): the same per-stage indices, losses, output, input gradient and codebooks (EMA,
    shared-codebook end-of-step update, dead-code expiry with the same random rows)."""
    kw = dict(dim=16, **RVQ_CONFIGS[name])
    torch.manual_seed(3)
    peer, ours = vqp.ResidualVQ(**kw), ResidualVQ(**kw)
    ours.load_state_dict(peer.state_dict())
    dropped = False
    for step, training in enumerate((True, True, False)):
        peer.train(training)
        ours.train(training)
        x = torch.randn(2, 24, 16) * (1 + step)
        xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(12 + step)  # the same dropout draw and expiry samples in both
        qo, io, lo = ours(xo)
        torch.manual_seed(12 + step)
        qp, ip, lp = peer(xp)
        assert io.shape == ip.shape == (2, 24, ours.num_quantizers) and lo.shape == lp.shape
        # Random data: no near tie at these sizes, so the peer's fp32 cdist agrees exactly.
        assert torch.equal(io, ip), f"{name} step {step}"
        torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-7)
        if training:
            g = torch.randn_like(qo)
            (gx_o,) = torch.autograd.grad((qo * g).sum() + lo.sum(), xo)
            (gx_p,) = torch.autograd.grad((qp * g).sum() + lp.sum(), xp)
            torch.testing.assert_close(gx_o, gx_p, rtol=1e-4, atol=1e-6)
        _same_state(ours, peer, f"{name} step {step}")
        dropped = dropped or bool((io == -1).any())
    assert dropped == ours.quantize_dropout  # seed 12 drops the last stage in the dropout config
    torch.testing.assert_close(ours.get_output_from_indices(io),
                               peer.get_output_from_indices(io), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.get_codes_from_indices(io), peer.get_codes_from_indices(io))


def test_residual_vq_mask_all_codes_and_beam_match_the_peer():
    torch.manual_seed(4)
    kw = dict(dim=12, num_quantizers=3, codebook_size=16)
    peer, ours = vqp.ResidualVQ(**kw), ResidualVQ(**kw)
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 20, 12)
    mask = torch.rand(2, 20) > 0.3
    for training in (True, False):
        peer.train(training)
        ours.train(training)
        qo, io, lo, co = ours(x, mask=mask, return_all_codes=True)
        qp, ip, lp, cp = peer(x, mask=mask, return_all_codes=True)
        assert torch.equal(io, ip) and (io[~mask] == -1).all()
        torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(co, cp)
    _same_state(ours, peer, "mask")
    # Beam search (width 3, paths scored by the per-candidate commitment losses).
    for training in (False, True):
        peer.train(training)
        ours.train(training)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        peer_before = {k: v.clone() for k, v in peer.state_dict().items()}
        qo, io, lo = ours(x, mask=mask, beam_size=3)
        qp, ip, lp = peer(x, mask=mask, beam_size=3)
        assert torch.equal(io, ip)
        torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
        if not training:
            _same_state(ours, peer, "beam, eval")
            continue
        # The peer's beam update takes `all_residuals[..., 0, :]` (the first stage's input of
        # the best path) and so updates only layers.0; ours updates every stage from its own
        # input on the chosen path. layers.0 agrees; the later stages moved in ours only.
        _same_state(ours.layers[0], peer.layers[0], "beam, training, stage 0")
        for s in (1, 2):
            key = f"layers.{s}._codebook.cluster_size"
            assert not torch.equal(ours.state_dict()[key], before[key])
            assert torch.equal(peer.state_dict()[key], peer_before[key])


def test_grouped_residual_vq_matches_the_peer():
    torch.manual_seed(5)
    kw = dict(dim=16, groups=2, num_quantizers=3, codebook_size=16, quantize_dropout=True)
    peer, ours = vqp.GroupedResidualVQ(**kw), GroupedResidualVQ(**kw)
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 20, 16)
    for training in (True, False):
        peer.train(training)
        ours.train(training)
        torch.manual_seed(6)
        qo, io, lo = ours(x)
        torch.manual_seed(6)
        qp, ip, lp = peer(x)
        assert io.shape == ip.shape == (2, 2, 20, 3) and lo.shape == lp.shape == (2, 3)
        assert torch.equal(io, ip)
        torch.testing.assert_close(qo, qp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-7)
        _same_state(ours, peer, f"grouped, training={training}")
    torch.testing.assert_close(ours.get_output_from_indices(io), peer.get_output_from_indices(io))

