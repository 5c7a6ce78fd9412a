import hashlib
import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, so the same
# tests exercise them here. This must be set before vqkernels.triton (and its @triton.jit) loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vqkernels
from vqkernels import backends

_STATUS = backends.available_backends()


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh, reproducible seed per test: different tests see different data.
    seed = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    yield


def backend_params(device="cpu", names=backends.BACKEND_NAMES):
    """pytest params for every backend, skipped with the registry's reason where it can't run on
    `device` tensors here."""
    out = []
    for name in names:
        st = _STATUS[name]
        devs = st.devices
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
    import cpu_isas  # after vqkernels: it forces each CPU path once to learn which run here
    return lines + cpu_isas.report_lines()


def backend_device_params(names=backends.BACKEND_NAMES):
    """(backend, device) pairs for every device here; pairs that can't run are skipped with why."""
    out = []
    for dev in DEVICES:
        for p in backend_params(dev, names):
            out.append(pytest.param(p.values[0], dev, marks=p.marks, id=f"{p.id}-{dev}"))
    return out


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """One and two torch threads: the native kernels must give bitwise the same answer for both."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """One torch thread: deterministic, and on a shared machine much faster than two OpenMP
    threads that spin while waiting for each other (the model and training tests use it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
