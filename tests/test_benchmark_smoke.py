"""benchmarks/trainer_overhead.py imports and its contenders run one tiny step (no timing asserted).

The measurement itself is ``make bench``; this only keeps the script from rotting. The Lightning
contender lives in the benchmark-only virtualenv and is skipped where lightning is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "trainer_overhead.py")


def _load():
    spec = importlib.util.spec_from_file_location("trainer_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_args():
    return argparse.Namespace(arch="resnet10", global_batch=4, image_size=16, steps=1, warmup=1)


@pytest.mark.timeout(120)
def test_ours_and_hand_loop_each_run_a_timed_step():
    bench = _load()
    args = _tiny_args()
    for run in (lambda: bench._run_ours(args, 1, 0, local=False), lambda: bench._run_ours(args, 1, 0, local=True),
                lambda: bench._run_hand(args, 1, 0)):
        ends, world, checksum = run()
        assert len(ends) == args.warmup + args.steps and ends[1] > ends[0]
        assert world == 1 and checksum == checksum  # finite-or-not, a number came back


@pytest.mark.timeout(120)
def test_lightning_contender_runs_a_step_where_installed():
    pytest.importorskip("lightning")
    pytest.importorskip("lightly")
    bench = _load()
    ends, world, _ = bench._run_lightning(_tiny_args(), 1, 0)
    assert len(ends) == 2 and world == 1


def test_doc_region_is_replaced_and_prose_kept(tmp_path):
    bench = _load()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Data throughput\n\ntable\n")
    bench.write_doc_region("trainer_overhead", "first", path=str(doc))
    text = doc.read_text()
    assert "## Data throughput\n\ntable" in text and "## Performance" in text and "first" in text
    doc.write_text(text.replace("<!-- trainer_overhead:begin -->", "Prose before.\n<!-- trainer_overhead:begin -->"))
    bench.write_doc_region("trainer_overhead", "second", path=str(doc))
    text = doc.read_text()
    assert "Prose before." in text and "second" in text and "first" not in text
    assert text.count("## Performance") == 1


@pytest.mark.timeout(180)
def test_step_suite_contenders_run_a_step():
    """Issue #20's benchmark (d): ours with its defaults (bf16-mixed where the CPU runs bf16 natively, else fp32) and the best hand-written loop."""
    bench = _load()
    args = _tiny_args()
    for run in (lambda: bench._run_ours(args, 1, 0, local=False, precision="bf16-mixed"),
                lambda: bench._run_hand(args, 1, 0, best=True)):
        ends, world, _ = run()
        assert len(ends) == args.warmup + args.steps and world == 1
    assert set(bench.SUITES["step"][1]) == {"ours", "lightning", "ours_defaults", "lightning_theirs", "hand_best"}
    if importlib.util.find_spec("lightly") is not None:
        ends, _, _ = bench._run_lightning(args, 1, 0, two_forwards=True)
        assert len(ends) == 2


def _load_augment():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    spec = importlib.util.spec_from_file_location("augment_throughput",
                                                  os.path.join(os.path.dirname(HERE), "benchmarks", "augment_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_augment_benchmark_runs_its_suites_on_real_photos(tmp_path):
    """benchmarks/augment_throughput.py: the per-op and device suites run (lightly, kornia and DALI
    are benchmark-only: their contenders are skipped where not installed) and render their tables."""
    bench = _load_augment()
    jpegs, origin = bench.benchmark_jpegs(4)
    assert len(jpegs) == 4 and "real photographs" in origin
    assert all(data[:2] == b"\xff\xd8" for data in jpegs)
    args = argparse.Namespace(repeats=1, batch=2, command="smoke")
    results = {"ops": bench.run_ops(args, jpegs)}
    assert "OpenCV (ours)" in results["ops"]["hue"]
    two = {"ours, augment_on=cpu": [100.0], "ours, augment_on=device (loader half)": [300.0]}
    results["device"] = bench.run_device(args, jpegs, {"two views": {"rates": two}})
    model = results["device"]["cost_model"]
    assert model["bytes_per_image"] > 0 and model["flops_per_image"] > 0 and model["gpu_images_per_s"] > 0
    regions = bench.markdown(results, args, bench.facts(), origin)
    assert set(regions) == {"augment_ops", "augment_device"}
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n")
    bench.write_doc_region("augment_ops", regions["augment_ops"], path=str(doc))
    assert "## Augmentation" in doc.read_text() and "hue" in doc.read_text()
