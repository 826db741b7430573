"""The XLA column of the real-recipe equivalence matrix (tests/xla/recipe_matrix.py, on top of
tests/_equivalence.py): every method, built as its fmnist_cpu.yaml builds it, trains six steps on
2 XLA:CPU devices and equals one CPU process on the whole global batch after every step: loss,
parameters, optimizer state, queue, EMA target, BatchNorm buffers (teacher-forced, fp32); SwAV's
prototypes stay bitwise frozen through epoch 0; BYOL's and MoCo's targets follow their fp32 EMA
recurrence. The replicas trace one program per step and end bitwise identical.

All selected methods share one launch of the replicas process. ``make test`` runs the cells in
``DEFAULT_METHODS``; ``make test-all`` runs all seven and then rewrites the xla section of
docs/EQUIVALENCE.md (only that section) from what it measured.
"""

from __future__ import annotations

import time

import pytest

from tests import _equivalence as E
from tests.xla import recipe_matrix as X

pytestmark = pytest.mark.xla

# In `make test` (one launch, ~1.5 min on 2 cores): MoCo -- the ResNet with global BatchNorm every
# TPU config uses, its EMA target and queue, and shuffle-BN's gathers and broadcast with the rank
# as device data: the XLA-specific paths -- and CPC v2, the small encoder whose patches,
# feature-map task and online classifier had to be made to trace into one program. The other
# five run in `make test-all` (SwAV's prototype normalisation, which the matrix found unwritten
# on XLA, also has a fast test in test_xla_single_device.py).
DEFAULT_METHODS = ("moco", "cpc_v2")
LAUNCH_TIMEOUT_S = 3600


@pytest.fixture(scope="module")
def xla_matrix(request, tmp_path_factory):
    selected = [item.callspec.params["method"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_method_on_two_xla_devices_equals_one_process"]
    started = time.perf_counter()
    matrix = X.XlaMatrix(str(tmp_path_factory.mktemp("xla_matrix")), selected, LAUNCH_TIMEOUT_S)
    yield matrix
    if set(matrix.results) == set(E.METHOD_NAMES) and not matrix.replica_problems:
        X.write_section([matrix.results[m] for m in E.METHOD_NAMES], matrix.per_step, time.perf_counter() - started)


def _cells():
    for method in E.METHOD_NAMES:
        yield pytest.param(method, id=X.cell(method).id, marks=[] if method in DEFAULT_METHODS else [pytest.mark.slow])


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 600)
@pytest.mark.parametrize("method", list(_cells()))
def test_method_on_two_xla_devices_equals_one_process(method, xla_matrix):
    result = xla_matrix.result(method)
    assert not [p for p in xla_matrix.replica_problems if p.startswith(method + ":")]
    problems = E.problems(result)
    steps = "; ".join(", ".join(f"{k} {s[k]:.1e}" for k in E.FIGURES if s.get(k) is not None) + f" ({s['reference']})"
                      for s in xla_matrix.per_step[method])
    print(f"\n{result.cell.id}, per step (teacher-forced): {steps}; free run params "
          f"{result.free_running['params']:.1e}; {xla_matrix.compiles[method]} compiles; {result.seconds:.0f} s")
    assert not problems, f"{result.cell.id}: {problems}; figures {result.figures}, worst step {result.outlier}"
    if method == "swav":
        assert result.frozen_prototypes_bitwise is True
    if method in ("byol", "moco"):
        assert result.ema_dtypes == ["float32"] and result.ema_recurrence is not None
