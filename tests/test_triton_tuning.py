"""Autotune results kept across processes and tuning under threads (vqkernels.triton.tuning;
review F13, F14). The Python-level parts: keys, the JSON file, the per-device lock. Timing configs
needs a GPU (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("triton")
from vqkernels.triton import tuning  # noqa: E402

VERS = {"triton": "3.9.0", "torch": "2.x", "cuda": "13.0", "kernels": "abc"}
SHAPE = {"kernel": "vq_search", "dtype": "bfloat16", "D": 256, "K": 16384, "N_bucket": 65536,
         "fused": True, "smem": 232448}
CFG = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def test_key_holds_device_versions_and_shape():
    k = tuning.make_key("NVIDIA H100 80GB HBM3 sm_90", VERS, SHAPE)
    assert tuning.make_key("NVIDIA H100 80GB HBM3 sm_90", dict(reversed(VERS.items())),
                           dict(reversed(SHAPE.items()))) == k
    others = [tuning.make_key("NVIDIA H100 PCIe sm_90", VERS, SHAPE),
              tuning.make_key("NVIDIA H100 80GB HBM3 sm_90", {**VERS, "triton": "3.10.0"}, SHAPE),
              tuning.make_key("NVIDIA H100 80GB HBM3 sm_90", {**VERS, "kernels": "abd"}, SHAPE),
              tuning.make_key("NVIDIA H100 80GB HBM3 sm_90", VERS, {**SHAPE, "N_bucket": 32768})]
    assert len({k, *others}) == 5


def test_results_persist_across_processes(tmp_path):
    a = tuning.TuneCache(tmp_path / "autotune.json")
    a.put("k1", CFG)
    b = tuning.TuneCache(tmp_path / "autotune.json")   # a later process
    assert b.get("k1") == CFG
    # Two processes tuning different keys: the file keeps both.
    b.put("k2", {**CFG, "BLOCK_K": 128})
    a.put("k3", {**CFG, "num_stages": 2})
    data = json.loads((tmp_path / "autotune.json").read_text())["configs"]
    assert set(data) == {"k1", "k2", "k3"} and data["k2"]["BLOCK_K"] == 128
    assert not list(tmp_path.glob(".autotune-*"))  # no temporary file left behind


def test_unreadable_file_is_never_overwritten(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{ not json")
    c = tuning.TuneCache(path)
    with pytest.warns(UserWarning, match="ignoring the autotune cache"):
        assert c.get("k") is None
    c.put("k", CFG)
    assert c.get("k") == CFG              # kept in memory
    assert path.read_text() == "{ not json"


def test_cache_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VQK_AUTOTUNE_CACHE", str(tmp_path))
    assert tuning.cache_path() == tmp_path / "autotune.json"
    monkeypatch.setenv("VQK_AUTOTUNE_CACHE", "0")
    assert tuning.cache_path() is None
    monkeypatch.delenv("VQK_AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_path() == tmp_path / "vqkernels" / "autotune.json"
    c = tuning.TuneCache(None)            # persistence off: memory only
    c.put("k", CFG)
    assert c.get("k") == CFG


def test_concurrent_first_calls_tune_once(tmp_path):
    c = tuning.TuneCache(tmp_path / "autotune.json")
    calls = []
    inside = []

    def tune():
        inside.append(1)
        assert len(inside) == 1, "two tunings ran at once on one device"
        calls.append(1)
        time.sleep(0.05)
        inside.pop()
        return CFG

    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get_or_tune("gpu0", "k", tune)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r[1] for r in results) == [False] * 7 + [True]
    assert all(r[0] == CFG for r in results)
    # Different devices have different locks; one device one lock.
    assert c.tune_lock("gpu0") is c.tune_lock("gpu0")
    assert c.tune_lock("gpu0") is not c.tune_lock("gpu1")


def test_one_autotuner_per_device():
    from vqkernels.triton import launch
    a0 = launch._tuned_search("bfloat16", 64, 163 * 1024, 0)
    assert launch._tuned_search("bfloat16", 64, 163 * 1024, 0) is a0
    assert launch._tuned_search("bfloat16", 64, 163 * 1024, 1) is not a0


def test_config_dict_round_trips_every_config():
    import triton
    from vqkernels.triton import configs as cfg
    for c in cfg.configs("bfloat16", 256, 227 * 1024):
        d = tuning.config_dict(c)
        assert triton.Config({k: d[k] for k in ("BLOCK_N", "BLOCK_K")}, num_warps=d["num_warps"],
                             num_stages=d["num_stages"]).kwargs == c.kwargs
        assert json.loads(json.dumps(d)) == d


def test_source_hash_tracks_the_kernels():
    h = tuning.source_hash()
    assert len(h) == 16 and h == tuning.source_hash()
