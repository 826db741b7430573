"""N ranks x b == one process x N*b on the real recipes: every method on every backend, several
steps, fp32 and bf16 (tests/_equivalence.py says what is compared and how).

Each backend is launched once per session (one pair/quad of gloo processes, or this process for
dp) and runs every cell of it that the session selected; the cells' tests then read the results.
``make test`` runs the cells in ``DEFAULT_CELLS`` (at least one multi-step cell per backend, and
the ones that prove the DeepSpeed fixes on every ZeRO stage); ``make test-all`` runs them all and
rewrites the main section of docs/EQUIVALENCE.md from what it measured.
"""

from __future__ import annotations

import os

import pytest

from tests import _equivalence as E
from tests._equivalence_report import write_main_section
from tests.distributed import run_on_ranks

DEFAULT_CELLS = {
    # dp: MoCo's queue and EMA target, BatchNorm over the parts.
    "dp2-moco-fp32",
    # ddp: SwAV with its queue in Sinkhorn and the prototype freeze; MoCo with shuffle-BN and its
    # queue (the queue after every step equal to one process's).
    "ddp2-swav-fp32", "ddp2-moco-fp32",
    # deepspeed: LARS, the prototype freeze and normalisation, global BatchNorm and the queue on
    # each ZeRO stage; the EMA target in fp32 from the masters under bf16 and ZeRO-3.
    "zero1-swav-fp32", "zero2-swav-fp32", "zero3-swav-fp32", "zero3-byol-bf16",
}
CELLS = [pytest.param(cell, id=cell.id, marks=[] if cell.id in DEFAULT_CELLS else [pytest.mark.slow])
         for cell in E.ALL_CELLS]


class Matrix:
    """The session's measurements, one launch per backend, on first use."""

    def __init__(self, root: str, selected: list):
        self.root = root
        self.selected = selected
        self.results: dict[str, E.Result] = {}
        self.launched: set[str] = set()

    def result(self, cell: E.Cell) -> E.Result:
        if cell.backend not in self.launched:
            self.launched.add(cell.backend)
            self._launch(cell.backend)
        return self.results[cell.id]

    def _launch(self, backend: str) -> None:
        cells = [c for c in self.selected if c.backend == backend]
        jobs = E.reference_jobs(cells)
        one_process = [j for j in jobs if not j[1].startswith("zero")]
        for method, kind in one_process:
            E.run_reference(method, kind, self.root)
        deepspeed_jobs = [j for j in jobs if j[1].startswith("zero")]
        if deepspeed_jobs:  # DeepSpeed on one rank still wants a process group
            run_on_ranks(E.ranks_run_references, 1, deepspeed_jobs, self.root)
        world = E.WORLD[backend]
        if world == 1:
            measured = [E.run_cell(c, 0, 1, self.root) for c in cells]
        else:
            measured = run_on_ranks(E.ranks_run_cells, world, cells, self.root)[0]
        for result in measured:
            self.results[result.cell.id] = E.finish_cell(result, self.root)


@pytest.fixture(scope="session")
def matrix(request, tmp_path_factory):
    selected = [item.callspec.params["cell"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_cell_equals_one_process"]
    matrix = Matrix(str(tmp_path_factory.mktemp("equivalence")), selected)
    yield matrix
    if {c.id for c in E.ALL_CELLS} <= set(matrix.results):
        write_main_section(list(matrix.results.values()))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("cell", CELLS)
def test_cell_equals_one_process(cell, matrix):
    result = matrix.result(cell)
    assert not E.problems(result), f"{cell.id}: {E.problems(result)}; figures {result.figures}, floor {result.floor}"
    if cell.method == "swav":
        assert result.frozen_prototypes_bitwise is True
    if cell.method in ("byol", "moco"):
        assert result.ema_dtypes == ["float32"] and result.ema_recurrence is not None


def test_doc_has_every_section_marker():
    text = open(os.path.join(E.REPO, "docs", "EQUIVALENCE.md")).read()
    for owner in ("main", "xla", "large-world"):
        assert text.count(f"<!-- equivalence:{owner}:begin -->") == 1, owner
        assert text.count(f"<!-- equivalence:{owner}:end -->") == 1, owner
