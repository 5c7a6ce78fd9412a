"""VQVAE.from_checkpoint (the documented way to load a trained model / tokenizer) and
`python -m vqkernels` (the commands, and what this install can run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqkernels
from vqkernels import VQVAE, VQVAEConfig, _io, native
from vqkernels import __main__ as entry

ROOT = Path(__file__).resolve().parents[1]


def _save_run(tmp_path):
    cfg = VQVAEConfig(num_codes=8, code_dim=4, hidden=8, residual_hidden=4,
                      num_residual_blocks=1, image_size=8)
    model = VQVAE(cfg)
    model.train()
    model(torch.rand(4, 3, 8, 8) - 0.5)  # one training forward: k-means init, EMA state moved
    run = tmp_path / "run"
    run.mkdir()
    _io.atomic_torch_save(run / "checkpoint.pt", {
        "format": _io.CHECKPOINT_FORMAT, "version": _io.CHECKPOINT_VERSION,
        "config": cfg.to_dict(), "model": model.state_dict(), "step": 1})
    return run, model


def test_from_checkpoint_loads_the_trained_model(tmp_path):
    run, model = _save_run(tmp_path)
    for path in (run, run / "checkpoint.pt", str(run)):
        loaded = VQVAE.from_checkpoint(path)
        assert isinstance(loaded, VQVAE) and not loaded.training
        assert loaded.config == model.config
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    images = torch.rand(2, 3, 8, 8) - 0.5
    model.eval()
    tokens = loaded.encode(images)
    assert torch.equal(tokens, model.encode(images)) and tokens.shape == (2, 2, 2)
    torch.testing.assert_close(loaded.decode(tokens), model.decode(tokens))
    assert vqkernels.VQVAE is VQVAE


def test_from_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQVAE.from_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="without checkpoint.pt"):
        VQVAE.from_checkpoint(tmp_path)
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes")
    with pytest.raises(ValueError, match="not a checkpoint"):
        VQVAE.from_checkpoint(notes)
    assert notes.read_text() == "my notes"  # nothing a user wrote is touched
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a vqkernels VQ-VAE checkpoint"):
        VQVAE.from_checkpoint(other)


def test_python_m_vqkernels_reports_commands_and_backends(capsys):
    assert entry.main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("vqkernels.train", "vqkernels.eval", "vqkernels.tokenize", "vqkernels.demo",
                "VQVAE.from_checkpoint", "vqkernels.compat"):
        assert cmd in out, cmd
    for name, st in vqkernels.available_backends().items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert ("yes" in line) == st.available and st.detail in line
    from vqkernels import native
    if native.cpu_status() is None:
        assert f"CPU kernel path: {native.module().cpu_isa()} -- " in out
    assert entry.main(["--bogus"]) == 2
    assert "takes no arguments" in capsys.readouterr().err


def test_python_m_vqkernels_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "vqkernels"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Backends here" in r.stdout


@pytest.mark.skipif(native.cpu_status() is not None, reason="native CPU kernel not built")
def test_cpu_path_report_names_the_chosen_path_and_why(monkeypatch):
    monkeypatch.delenv("VQK_CPU_ISA", raising=False)
    auto = native.module().cpu_isa()
    lines = native.cpu_path_report()
    assert lines[1].startswith(f"CPU kernel path: {auto} -- auto takes"), lines
    runs = lines[2].split(": ", 1)[1].split(", ")
    assert auto in runs and "scalar" in runs
    monkeypatch.setenv("VQK_CPU_ISA", "scalar")
    lines = native.cpu_path_report()
    assert lines[1] == "CPU kernel path: scalar -- forced by VQK_CPU_ISA=scalar", lines
    assert lines[2].split(": ", 1)[1].split(", ") == runs  # probing leaves the forced choice alone
    assert os.environ["VQK_CPU_ISA"] == "scalar"


# Every `python -m` entry point of the package, and modules whose import costs seconds (torch's
# compiler stack) or that belong to one command's work (figures, GPU kernels, image files).
# `import torch` loads none of them; tqdm it does load, so tqdm is not listed.
ENTRY_POINTS = ("vqkernels", "vqkernels.train", "vqkernels.eval", "vqkernels.sweep",
                "vqkernels.demo", "vqkernels.tokenize", "vqkernels.runcheck",
                "vqkernels.triton.aot")
HEAVY = ("torch._dynamo", "torch._inductor", "matplotlib", "triton", "PIL", "skimage", "scipy",
         "sympy")


def test_import_and_every_help_stay_light():
    # Issue 15: `import vqkernels` <= 0.5 s and each --help < 1 s above `import torch`. Speed is
    # not asserted (the machine's load decides it); what decided it was which modules got
    # imported (torch._dynamo alone was 1.7 s), and that is asserted, in one fresh interpreter.
    # A --help that ignores the flag (triton.aot compiled everything for half an hour) fails too.
    code = f"""
import io, json, runpy, sys, contextlib
heavy = {HEAVY!r}
import vqkernels
from vqkernels import vq_quantize, VectorQuantizer, VQVAE  # the public names still there
seen = {{"import vqkernels": [m for m in heavy if m in sys.modules]}}
for mod in {ENTRY_POINTS!r}:
    sys.argv = [mod, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(mod, run_name="__main__", alter_sys=True)
            code = "returned"
        except SystemExit as e:
            code = e.code
    ok = code in (0, None) and out.getvalue().strip()
    seen[mod + " --help"] = [m for m in heavy if m in sys.modules] + (
        [] if ok else [f"exit {{code}}, output {{out.getvalue()[:80]!r}}"])
print(json.dumps(seen))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(seen) == ["import vqkernels"] + [m + " --help" for m in ENTRY_POINTS]
    # modules are cumulative: the first entry that lists one is the one that imported it
    assert all(not v for v in seen.values()), seen


def test_first_op_calls_do_not_import_the_compiler():
    # torch.library.custom_op imports torch._dynamo on an op's first call (1.4 s of the first
    # vq_quantize here, against 0.5 ms for the second) unless vqkernels.ops defers it
    # (_skip_dynamo_import_when_absent). Every op, forward and backward, in a fresh interpreter;
    # then, once torch._dynamo is imported, the ops still run and torch.compile still traces
    # them to the eager values.
    code = """
import json, sys, torch, vqkernels
from vqkernels import ops
z = torch.randn(40, 8, requires_grad=True)
cb = torch.randn(16, 8, requires_grad=True)
out = vqkernels.vq_quantize(z, cb, backend="reference")
out.loss.backward()
idx, dist = vqkernels.nearest_code(z.detach(), cb.detach(), backend="reference")
seen = {"deferred": ops._DYNAMO_DEFERRED, "dynamo": "torch._dynamo" in sys.modules}
f = torch.compile(lambda a, b: vqkernels.vq_quantize(a, b, backend="reference").loss,
                  backend="eager")
seen["compiled_equal"] = bool(f(z, cb) == out.loss) and torch.equal(idx, out.indices)
print(json.dumps(seen))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen == {"deferred": 3, "dynamo": False, "compiled_equal": True}, seen
