"""benchmarks/one_pixel_conv.py runs end to end at the smallest size (no timing asserted): both
variants step, layer4's convolutions are timed, the table renders and replaces only its region."""

from __future__ import annotations

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "one_pixel_conv.py")


@pytest.mark.timeout(300)
def test_one_pixel_benchmark_runs_both_variants_and_renders(tmp_path):
    spec = importlib.util.spec_from_file_location("one_pixel_conv_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- one_pixel_conv:begin -->\nold\n<!-- one_pixel_conv:end -->\nprose kept\n")
    result = bench.main(["--batch", "4", "--steps", "1", "--repeats", "2", "--write-doc", "--doc", str(doc)])
    assert set(result["step"]) == {"conv2d", "one_pixel"} and all(len(v) == 2 for v in result["step"].values())
    assert len(result["layers"]) == 2
    text = doc.read_text()
    assert text.startswith("intro\n<!-- one_pixel_conv:begin -->\nMeasured ") and text.endswith("<!-- one_pixel_conv:end -->\nprose kept\n")
    assert "| SimCLR step, ResNet-10 on 28 px, 4 rows |" in text
