"""The XLA column of the real-recipe equivalence matrix (see tests/xla/recipe_matrix.py): every
method, built as its fmnist_cpu.yaml builds it, trains six steps on 2 XLA:CPU devices and equals
one CPU process on the whole global batch, step by step: loss, parameters, optimizer state,
queue, EMA target, BatchNorm buffers. Replicas trace one program and end bitwise identical.
The results are written into docs/EQUIVALENCE.md between the xla markers."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

from tests.xla import recipe_matrix as matrix
from tests.xla.replicas import run_replicas

pytestmark = pytest.mark.xla

# In `make test` (each cell compiles several ResNet programs: ~1-2 min on 2 cores): SimCLR, the
# global-BatchNorm ResNet path every TPU config uses, and MoCo, whose shuffle-BN and queue are the
# XLA-specific code. The other five run in `make test-all`.
DEFAULT_SUITE = ("simclr", "moco")
_ROWS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def equivalence_doc():
    """Writes the rows measured by this run into docs/EQUIVALENCE.md when the module is done."""
    yield
    if _ROWS:
        matrix.write_section(_ROWS)


def _cells():
    for method in matrix.METHOD_NAMES:
        marks = [] if method in DEFAULT_SUITE else [pytest.mark.slow]
        yield pytest.param(method, marks=marks, id=method)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("method", list(_cells()))
def test_method_on_two_xla_devices_equals_one_process(method):
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as states_dir:
        replicas = run_replicas("recipe", matrix.DEVICES, {"method": method, "module": matrix.build_module(method),
                                                          "states": states_dir, "sync_batchnorm": True}, timeout_s=1400)
        states = [torch.load(os.path.join(states_dir, f"step{k}.pt"), weights_only=False)
                  for k in range(1, matrix.STEPS + 1)]
        head_path = os.path.join(states_dir, "online_head.pt")
        online_head = torch.load(head_path, weights_only=True) if os.path.exists(head_path) else None
    first = replicas[0]
    for r in replicas[1:]:
        assert r["graph_hashes"] == first["graph_hashes"], f"{method}: replica {r['rank']} traced another step program"
        for kind in ("params", "ema", "buffers"):
            for name, value in first["final"][kind].items():
                assert torch.equal(r["final"][kind][name], value), f"{method}: replicas differ in {kind} {name}"
        if first["final"]["queue"] is not None:
            assert torch.equal(r["final"]["queue"], first["final"]["queue"]), f"{method}: replicas' queues differ"
    forced = matrix.replay(method, states, force=True, online_head=online_head)
    free = matrix.replay(method, states, force=False, online_head=online_head)
    seconds = time.perf_counter() - started
    _ROWS[method] = matrix.row(method, forced, free, seconds)
    print(f"\n{method} on {matrix.DEVICES} XLA devices vs one process: teacher-forced "
          + ", ".join(f"{k} {forced[k]:.1e}" for k in matrix.FIGURES if forced[k] is not None)
          + f"; free-running params {free['params']:.1e}; gradient-free params left out: {forced['dead']}; {seconds:.0f} s")
    problems = matrix.failures(forced)
    assert not problems, f"{method}: XLA differs from one process: {'; '.join(problems)}"
