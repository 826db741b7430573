"""One launch per backend for the equivalence matrix and the DeepSpeed fix checks, shared by
the session (the ``equivalence`` fixture in tests/conftest.py)."""

from __future__ import annotations

import shutil

from tests import _equivalence as E
from tests.distributed import run_on_ranks


# A launch writes every step's full state (parameters, optimizer state, queue, EMA target) of its
# cells and references; a disk that fills up mid-launch shows only as torch.load's "Ran out of
# input" or torch.save's "unexpected pos" in some cell, so the launch refuses to start instead.
MIN_FREE_GIB = 2.0


def check_free_space(root: str, launch: str) -> None:
    free_gib = shutil.disk_usage(root).free / 2**30
    if free_gib < MIN_FREE_GIB:
        raise RuntimeError(
            f"only {free_gib:.2f} GiB free under {root}; the {launch} launch of the equivalence matrix writes "
            f"each step's state there and needs {MIN_FREE_GIB:g} GiB: free some space (old pytest base "
            "directories under /tmp/pytest-of-*/ are the usual cause) and run again"
        )


class Matrix:
    """The session's measurements: one launch per backend (all DeepSpeed stages share one), on
    first use, running every selected cell of it."""

    def __init__(self, root: str, selected: list, deepspeed_checks: bool):
        self.root = root
        self.selected = selected
        self.want_deepspeed_checks = deepspeed_checks
        self.results: dict[str, E.Result] = {}
        self.deepspeed_checks: dict = {}
        self.launched: set[str] = set()
        self.failures: dict[str, Exception] = {}

    def result(self, cell: E.Cell) -> E.Result:
        self._ensure(E.LAUNCH[cell.backend])
        return self.results[cell.id]

    def checks(self, stage: int) -> dict:
        self._ensure("deepspeed")
        return self.deepspeed_checks[stage]

    def _ensure(self, launch: str) -> None:
        if launch not in self.launched:
            self.launched.add(launch)
            try:
                self._launch(launch)
            except Exception as err:  # every test of this launch reports the launch's failure
                self.failures[launch] = err
        if launch in self.failures:
            raise AssertionError(f"the {launch} launch failed: {self.failures[launch]}")

    def _launch(self, launch: str) -> None:
        check_free_space(self.root, launch)
        cells = [c for c in self.selected if E.LAUNCH[c.backend] == launch]
        jobs = E.reference_jobs(cells)
        for method, kind in jobs:
            if not kind.startswith(("zero", "fsdp")):
                E.run_reference(method, kind, self.root)
        deepspeed_jobs = [j for j in jobs if j[1].startswith(("zero", "fsdp"))]
        if deepspeed_jobs:  # DeepSpeed / FSDP on one rank still want a process group
            run_on_ranks(E.ranks_run_references, 1, deepspeed_jobs, self.root)
        checks = (1, 2, 3) if launch == "deepspeed" and self.want_deepspeed_checks else ()
        if launch == "dp2":
            measured = [E.run_cell(c, 0, 1, self.root) for c in cells]
        elif cells or checks:
            world = max(E.WORLD[c.backend] for c in cells) if cells else 2
            measured, self.deepspeed_checks = run_on_ranks(E.ranks_run_cells, world, cells, self.root, checks)[0]
        else:
            measured = []
        for result in measured:
            self.results[result.cell.id] = E.finish_cell(result, self.root)


