"""benchmarks/fit_throughput_memory.py: one run of each kind works on real shards and its tables
render (no timing asserted; the measurement itself is ``make bench``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "fit_throughput_memory.py")


def _load():
    spec = importlib.util.spec_from_file_location("fit_throughput_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method,source,workers", [("simclr", "stream", 1), ("simclr", "memory", 0), ("swav", "stream", 0)])
def test_worker_fits_and_reports(fmnist_shards, tmp_path, method, source, workers):
    bench = _load()
    out = tmp_path / "r.json"
    args = argparse.Namespace(method=method, shards=str(fmnist_shards / "train"), workers=workers, source=source,
                              batch=8, steps=1, warmup=1, precision="32", compile=False, out=str(out))
    bench.worker(args)
    result = json.loads(out.read_text())
    assert len(result["steps_s"]) == 1 and result["images_per_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_before_fit_mb"] > 0


def test_tables_render():
    bench = _load()
    spread = [1.0, 0.9, 1.1]
    facts = {"date": "d", "cores": 2, "cpu": "c", "python": "3", "torch": "t", "load_start": "1", "load_end": "2"}
    args = argparse.Namespace(batch=64, warmup=2, steps=4, repeats=3)
    header = bench._header(facts, args, "cmd")
    text = bench.markdown_pipeline({"rows": [{"workers": w, "ratio": spread, "stream_img_s": spread,
                                              "memory_img_s": spread, "load": spread} for w in bench.WORKERS]}, header)
    assert text.count("\n| ") == 1 + len(bench.WORKERS) and "1.000 (0.900-1.100)" in text
    row = {k: spread for k in ("fp32_rss", "bf16_rss", "before_fit", "rss_ratio", "step_ratio", "fp32_step", "load")}
    assert "| byol |" in bench.markdown_memory({"rows": [dict(row, method=m) for m in bench.METHODS]}, header)
    compiled = {"startup_extra_s": spread, "first_batch_s": {"eager": spread, "compiled": spread}, "step_ratio": spread,
                "step_s": {"eager": spread, "compiled": spread}, "rss_ratio": spread, "load": spread}
    assert "steady step-time ratio compiled / eager | 1.000" in bench.markdown_compile(compiled, header)
