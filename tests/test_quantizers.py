"""The quantizers package (issue 17): one home for the quantizer modules and their upkeep, with the
old import paths still working."""
import ast
import pathlib
import pickle

import torch

import vqkernels

PKG = pathlib.Path(vqkernels.__file__).parent


def _imports(path):
    """The modules `path` imports at module level (a lookup inside a function is on use only)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            out.add(mod)
            out.update(mod + "." + a.name if node.module else "." * node.level + a.name
                       for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_import_graph_is_one_way():
    # quantize.py (the functional ops) imports neither the upkeep nor the modules; the upkeep
    # imports the ops, never the modules; codebook.py is a shim over the upkeep.
    q = _imports(PKG / "quantize.py")
    assert not any("codebook" in m or "quantizers" in m for m in q), q
    u = _imports(PKG / "quantizers" / "upkeep.py")
    assert not any("vector" in m or "residual" in m for m in u), u
    c = _imports(PKG / "codebook.py")
    assert all(m.startswith(".quantizers.upkeep") for m in c), c


def test_old_import_paths_give_the_same_objects():
    from vqkernels import codebook, quantize, quantizers
    from vqkernels.quantizers import upkeep, vector
    assert quantize.VectorQuantizer is vector.VectorQuantizer is vqkernels.VectorQuantizer
    from vqkernels.quantize import VectorQuantizer  # noqa: F401  (PEP 562 lookup)
    for name in ("kmeans_plusplus", "lloyd", "laplace_smoothed", "usage_stats", "DistContext",
                 "seeded_generator", "pick_rows"):
        assert getattr(codebook, name) is getattr(upkeep, name)
    assert quantizers.kmeans_plusplus is upkeep.kmeans_plusplus


def test_a_pickled_quantizer_round_trips():
    vq = vqkernels.VectorQuantizer(8, 4, kmeans_init=False)
    back = pickle.loads(pickle.dumps(vq))
    assert type(back) is vqkernels.VectorQuantizer
    assert torch.equal(back.codebook, vq.codebook)
