"""N ranks x b == one process x N*b on the real recipes: every method on every backend, several
steps, fp32 and bf16 (tests/_equivalence.py says what is compared and how).

Each backend is launched once per session (one pair/quad of gloo processes, or this process for
dp; all DeepSpeed stages in one pair) and runs every cell of it that the session selected; the
cells' tests then read the results (the ``equivalence`` fixture, tests/_equivalence_launch.py).
``make test`` runs the cells in ``DEFAULT_CELLS`` (at least one multi-step cell per backend, and
the ones that prove the DeepSpeed fixes on every ZeRO stage); ``make test-all`` runs them all and
rewrites the main section of docs/EQUIVALENCE.md from what it measured.
"""

from __future__ import annotations

import os

import pytest

from tests import _equivalence as E

DEFAULT_CELLS = {
    # dp: MoCo's queue and EMA target, BatchNorm over the parts.
    "dp2-moco-fp32",
    # ddp: SwAV with its queue in Sinkhorn and the prototype freeze; MoCo with shuffle-BN and its
    # queue (the queue after every step equal to one process's).
    "ddp2-swav-fp32", "ddp2-moco-fp32",
    # deepspeed: LARS, the prototype freeze and normalisation, global BatchNorm and the queue on
    # each ZeRO stage. (bf16 on the real encoders is slow on CPUs without native bf16 (a ResNet-10
    # step ~40x fp32): the fixes' bf16 side is in tests/test_deepspeed_fixes.py on small modules,
    # the real-recipe bf16 cells in `make test-all`.)
    "zero1-swav-fp32", "zero2-swav-fp32", "zero3-swav-fp32",
    # fsdp: LARS over DTensor shards, the prototype freeze and row-wise normalisation on shards,
    # global BatchNorm and the queue (the rest of the column, DINO included, in `make test-all`).
    "fsdp2-swav-fp32",
}
CELLS = [pytest.param(cell, id=cell.id, marks=[] if cell.id in DEFAULT_CELLS else [pytest.mark.slow])
         for cell in E.ALL_CELLS]


# The first cell of each backend carries that backend's whole launch (every selected cell of it and
# its one-process references): the DeepSpeed launch of the full matrix takes over 30 minutes on 2
# shared cores.
@pytest.mark.timeout(3 * 3600)
@pytest.mark.parametrize("cell", CELLS)
def test_cell_equals_one_process(cell, equivalence):
    result = equivalence.result(cell)
    assert not E.problems(result), f"{cell.id}: {E.problems(result)}; figures {result.figures}, floor {result.floor}"
    if cell.method == "swav":
        assert result.frozen_prototypes_bitwise is True
    if cell.method in ("byol", "moco", "dino"):
        assert result.ema_dtypes == ["float32"] and result.ema_recurrence is not None


def test_doc_has_every_section_marker():
    text = open(os.path.join(E.REPO, "docs", "EQUIVALENCE.md")).read()
    for owner in ("main", "xla", "large-world"):
        assert text.count(f"<!-- equivalence:{owner}:begin -->") == 1, owner
        assert text.count(f"<!-- equivalence:{owner}:end -->") == 1, owner


def test_a_launch_refuses_to_start_on_a_full_disk(tmp_path, monkeypatch):
    from tests import _equivalence_launch as launch

    launch.check_free_space(str(tmp_path), "ddp2")  # this machine has the space
    monkeypatch.setattr(launch, "MIN_FREE_GIB", 1e9)  # more than any disk: as if it were full
    with pytest.raises(RuntimeError, match=r"GiB free under .*the ddp2 launch .*free some space"):
        launch.check_free_space(str(tmp_path), "ddp2")
