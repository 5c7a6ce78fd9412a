import hashlib
import os

import pytest
import torch

import vqkernels
from vqkernels import backends

_STATUS = backends.available_backends()


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh, reproducible seed per test: different tests see different data.
    seed = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    yield


def backend_params(device="cpu"):
    """pytest params for every backend, skipped with the registry's reason where it can't run on
    `device` tensors here."""
    out = []
    for name in backends.BACKEND_NAMES:
        st = _STATUS[name]
        devs = backends._devices(backends.REGISTRY[name])
        marks = []
        if not st.available:
            marks.append(pytest.mark.skip(reason=f"{name}: {st.detail}"))
        elif device not in devs:
            marks.append(pytest.mark.skip(reason=f"{name} does not run on {device} tensors here"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, vqkernels {vqkernels.__version__}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]
    for name, st in _STATUS.items():
        lines.append(f"  backend {name}: {'yes' if st.available else 'no'} ({st.detail})")
    return lines
