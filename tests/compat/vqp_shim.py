"""pytest plugin: vector-quantize-pytorch's own tests, run against vqkernels.compat.

Loaded with ``-p vqp_shim`` (run_peer_suite.py does it), before any test module is imported, it
puts a stand-in module under the name ``vector_quantize_pytorch`` in ``sys.modules``: every name
vqkernels.compat provides is there, so the peer's ``from vector_quantize_pytorch import
VectorQuantize`` gets vqkernels' class, whether or not the real package is installed. Its test files
are read where they are; nothing of them is copied.

A test (or a whole test file) that imports a name vqkernels.compat does not provide (ResidualVQ,
FSQ, LFQ, ...) or a module that is not installed is reported as skipped with that reason; every
other outcome is the test's own.
"""
from __future__ import annotations

import importlib.abc
import sys
import types

import pytest

import vqkernels.compat as _compat

PEER = "vector_quantize_pytorch"


class _NotProvided(ImportError):
    pass


def _make_stand_in() -> types.ModuleType:
    mod = types.ModuleType(PEER, "vqkernels.compat standing in for vector_quantize_pytorch")
    for name in _compat.__all__:
        setattr(mod, name, getattr(_compat, name))
    mod.__path__ = []  # a package, so `import vector_quantize_pytorch.sub` reaches the finder

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"vqkernels.compat does not provide {name}")
    mod.__getattr__ = __getattr__
    return mod


class _SubmoduleBlocker(importlib.abc.MetaPathFinder):
    """`vector_quantize_pytorch.<sub>` (the peer's internal modules) cannot resolve to the real
    package's files: they would test the peer, not vqkernels."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(PEER + "."):
            raise _NotProvided(f"vqkernels.compat does not provide {fullname[len(PEER) + 1:]}")
        return None


for _k in [k for k in sys.modules if k == PEER or k.startswith(PEER + ".")]:
    del sys.modules[_k]
sys.modules[PEER] = _make_stand_in()
sys.meta_path.insert(0, _SubmoduleBlocker())


def _not_provided_reason(excinfo) -> str | None:
    if excinfo is None or not excinfo.errisinstance(ImportError):
        return None
    e = excinfo.value
    msg = str(e)
    if isinstance(e, _NotProvided) or "vqkernels.compat does not provide" in msg:
        return msg
    if getattr(e, "name", None) == PEER or f"from '{PEER}'" in msg:
        # `from vector_quantize_pytorch import X`: Python rewrites our AttributeError
        name = msg.split("'")[1] if "'" in msg else msg
        return f"vqkernels.compat does not provide {name}"
    if isinstance(e, ModuleNotFoundError):
        return f"needs the module {e.name!r}, which is not installed"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    reason = _not_provided_reason(call.excinfo) if call.when == "call" else None
    if reason is not None:
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and isinstance(collector, pytest.Module):
        text = str(rep.longrepr)
        if "vqkernels.compat does not provide" in text or f"from '{PEER}'" in text:
            line = next((ln for ln in text.splitlines()
                         if "does not provide" in ln or f"from '{PEER}'" in ln), text)
            name = line.split("'")[1] if "cannot import name" in line else line.split("E   ")[-1]
            reason = name if "does not provide" in name else \
                f"vqkernels.compat does not provide {name}"
            rep.outcome = "skipped"
            rep.longrepr = (str(collector.path), 0, f"Skipped: whole file: {reason.strip()}")
