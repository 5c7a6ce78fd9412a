"""The channel axis is `channel_dim` in vq_quantize and nearest_code, as in VectorQuantizer;
their former `dim=` keeps working (issue 18: `dim` meant the axis there but the code size in
VectorQuantizer)."""
import pytest
import torch

from vqkernels import VectorQuantizer, nearest_code, vq_quantize


def test_channel_dim_and_the_old_name_agree():
    z = torch.randn(2, 6, 3, 5, requires_grad=True)
    cb = torch.randn(9, 6)
    new = vq_quantize(z, cb, channel_dim=1)
    old = vq_quantize(z, cb, dim=1)
    moved = vq_quantize(z.movedim(1, -1), cb)  # the default axis is the last one
    assert new.indices.shape == (2, 3, 5)
    for a, b in ((new, old), (new, moved)):
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.loss, b.loss)
    assert torch.equal(new.z_q, old.z_q)
    i_new, d_new = nearest_code(z, cb, channel_dim=1)
    i_old, d_old = nearest_code(z, cb, dim=1)
    assert torch.equal(i_new, i_old) and torch.equal(i_new, new.indices)
    assert torch.equal(d_new, d_old)
    i_k, _ = nearest_code(z, cb, channel_dim=1, k=2)
    assert torch.equal(i_k[..., 0], i_new)


def test_both_names_at_once_is_an_error():
    z, cb = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(TypeError, match="channel_dim"):
        vq_quantize(z, cb, channel_dim=-1, dim=-1)
    with pytest.raises(TypeError, match="channel_dim"):
        nearest_code(z, cb, channel_dim=1, dim=1)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        vq_quantize(z, cb, channel_dim=1.0)


def test_vector_quantizer_dim_is_the_code_size():
    vq = VectorQuantizer(7, 4, channel_dim=1, kmeans_init=False).eval()
    assert vq.codebook.shape == (7, 4)
    out = vq(torch.randn(2, 4, 3))
    assert out.indices.shape == (2, 3)
