"""benchmarks/global_bn_cost.py runs end to end at the smallest size (no timing asserted): its three
variants train on 2 gloo ranks, the checked variant really runs the per-step check (the script
asserts it), and the table renders. The measurement itself is re-run on an idle machine."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "global_bn_cost.py")


@pytest.mark.timeout(600)
def test_global_bn_benchmark_runs_its_variants_and_renders(tmp_path, monkeypatch):
    # The ranks are spawned, so the worker function is pickled by module name: import the script as
    # the module "global_bn_cost" from a path the spawned children inherit, so parent and children
    # resolve the same object whatever other tests put on sys.path before.
    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))
    monkeypatch.delitem(sys.modules, "global_bn_cost", raising=False)
    bench = importlib.import_module("global_bn_cost")
    out = tmp_path / "summary.json"
    summary = bench.main(["--global-batch", "4", "--steps", "1", "--warmup", "1", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rotations"] == 1
    assert set(summary["step_s"]) == {"local_bn", "global_bn", "global_bn_checked"}
    assert summary["check_alone_s"] > 0 and all(v > 0 for v in summary["step_s"].values())
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- global_bn_cost:begin -->\nold\n<!-- global_bn_cost:end -->\nprose kept\n")
    bench.write_doc_region("new table", str(doc))
    assert doc.read_text() == "intro\n<!-- global_bn_cost:begin -->\nnew table\n<!-- global_bn_cost:end -->\nprose kept\n"
