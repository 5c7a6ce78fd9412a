"""Run vector-quantize-pytorch's own tests against vqkernels.compat and print the outcome table.

    python tests/compat/run_peer_suite.py PEER_TESTS [--markdown OUT.md] [-- PYTEST_ARGS...]

PEER_TESTS is the peer's `tests/` folder (or one test file) from a checkout of
github.com/lucidrains/vector-quantize-pytorch (its wheel and sdist ship no tests); the
VQK_PEER_TESTS environment variable may name it instead. The tests run in a separate pytest
process with the vqp_shim plugin, which makes their `import vector_quantize_pytorch` resolve to
vqkernels.compat (see vqp_shim.py); this project's own conftest is not loaded. Exit status 0 when
pytest ran, whatever the outcomes; the table says what passed, failed and was skipped and why.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def find_peer_tests(arg: str | None) -> Path | None:
    p = arg or os.environ.get("VQK_PEER_TESTS")
    if not p:
        return None
    path = Path(p).expanduser()
    if path.is_dir() and (path / "tests").is_dir() and not any(path.glob("test_*.py")):
        path = path / "tests"  # the checkout's root was given
    return path if path.exists() else None


def run(peer_tests: Path, extra: list[str] = (), timeout: float = 1200) -> list[dict]:
    """[{'test', 'outcome', 'reason'}] for every test of `peer_tests`, run under the shim."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "peer.xml"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "pytest", "-p", "vqp_shim", "-p", "no:cacheprovider",
               "-q", "-o", "addopts=", "--rootdir", tmp, "--confcutdir",
               str(peer_tests if peer_tests.is_dir() else peer_tests.parent),
               f"--junitxml={xml}", str(peer_tests), *extra]
        subprocess.run(cmd, env=env, cwd=tmp, timeout=timeout, check=False)
        if not xml.exists():
            raise RuntimeError(f"pytest wrote no report; command: {' '.join(cmd)}")
        return parse(xml)


def parse(xml: Path) -> list[dict]:
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "")
        cls = case.get("classname", "")
        test = f"{cls.split('.')[-1]}::{name}" if cls else name
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = el.get("message") or ""
                if not msg or msg == "collection skipped":  # the reason is in the text then
                    msg = (el.text or msg).split("Skipped: ")[-1]
                reason = _first_line(msg)
                break
        out.append({"test": test, "outcome": outcome, "reason": reason})
    return out


def _first_line(msg: str) -> str:
    msg = msg.replace("Skipped: ", "")
    for ln in msg.splitlines():
        if ln.strip():
            return ln.strip()[:220]
    return ""


def table(results: list[dict]) -> str:
    counts = {k: sum(r["outcome"] == k for r in results)
              for k in ("passed", "failed", "error", "skipped")}
    lines = [", ".join(f"{v} {k}" for k, v in counts.items()), "",
             "| test | outcome | reason |", "|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['test']}` | {r['outcome']} | {r['reason'].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("peer_tests", nargs="?", help="the peer's tests/ folder or a test file "
                    "[$VQK_PEER_TESTS]")
    ap.add_argument("--markdown", help="also write the table to this file")
    a = ap.parse_args(argv)
    path = find_peer_tests(a.peer_tests)
    if path is None:
        ap.error("the peer's tests were not found: pass the tests/ folder of a "
                 "vector-quantize-pytorch checkout, or set VQK_PEER_TESTS")
    md = table(run(path, extra))
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
