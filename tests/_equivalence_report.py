"""The main section of docs/EQUIVALENCE.md, written from a run of the whole matrix.

Only the text between ``<!-- equivalence:main:begin -->`` and ``<!-- equivalence:main:end -->`` is
replaced; the other sections (XLA, larger worlds) belong to their own tests.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

from tests import _equivalence as E

DOC = os.path.join(E.REPO, "docs", "EQUIVALENCE.md")
BEGIN, END = "<!-- equivalence:main:begin -->", "<!-- equivalence:main:end -->"
BACKEND_NAMES = {"dp2": "dp x2", "ddp2": "ddp x2", "ddp4": "ddp x4", "zero1": "ZeRO-1 x2", "zero2": "ZeRO-2 x2",
                 "zero3": "ZeRO-3 x2", "fsdp2": "FSDP2 x2"}


def _methods(backend: str) -> tuple[str, ...]:
    return E.FSDP_METHOD_NAMES if backend.startswith("fsdp") else E.METHOD_NAMES


NOT_RUN = "not run in this measurement"


def _num(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def _verdict(result: E.Result) -> str:
    if result.refused is not None:
        return "refused"
    return "equal" if not E.problems(result) else "DIFFERS"


def _grid(results: dict, precision: str) -> list[str]:
    figure = "params"
    lines = ["| method | " + " | ".join(BACKEND_NAMES[b] for b in E.BACKENDS) + " |",
             "|---|" + "---|" * len(E.BACKENDS)]
    for method in E.FSDP_METHOD_NAMES:
        row = []
        for backend in E.BACKENDS:
            if method not in _methods(backend):
                row.append("-")
                continue
            result = results.get(E.Cell(method, backend, precision).id)
            if result is None:
                row.append(NOT_RUN)
                continue
            verdict = _verdict(result)
            row.append(verdict if verdict != "equal" else f"equal ({_num(result.figures[figure])})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def _checks(result: E.Result) -> str:
    notes = []
    if result.frozen_prototypes_bitwise is not None:
        notes.append("prototypes bitwise frozen in epoch 0" if result.frozen_prototypes_bitwise else "FREEZE BROKEN")
    if result.ema_recurrence is not None:
        notes.append(f"EMA {'/'.join(result.ema_dtypes)}, {_num(result.ema_recurrence)} from its fp32 update")
    if result.settled_by_float64:
        notes.append("settled by float64: step " + ", ".join(str(s) for s in result.settled_by_float64))
    dead = result.figures.get("dead") or []
    if dead:
        notes.append("gradient-free: " + ", ".join(f"`{d}`" for d in dead))
    return "; ".join(notes)


def _details(results: dict, precision: str) -> list[str]:
    fp32 = precision == "32"
    head = ("| cell | loss | params | optimizer state | queue | EMA target | BN buffers | 6-step free run (params) | checks |"
            if fp32 else "| cell | loss | params | optimizer state | queue | EMA target | BN buffers | checks |")
    lines = [head, "|---" * (9 if fp32 else 8) + "|"]
    for backend in E.BACKENDS:
        for method in _methods(backend):
            result = results.get(E.Cell(method, backend, precision).id)
            if result is None:
                lines.append(f"| {E.Cell(method, backend, precision).id} | {NOT_RUN} |" + " |" * (7 if fp32 else 6))
                continue
            if result.refused is not None:
                lines.append(f"| {result.cell.id} | refused: {result.refused} |" + " |" * (7 if fp32 else 6))
                continue
            fig, floor = result.figures, result.floor or {}
            cells = []
            for figure in ("loss", "params", "state", "queue", "ema", "buffers"):
                text = _num(fig.get(figure))
                if not fp32 and fig.get(figure) is not None:
                    text += f" ({_num(floor.get(figure))})"
                cells.append(text)
            if fp32:
                cells.append(_num((result.free_running or {}).get("params")))
            verdict = _verdict(result)
            checks = _checks(result) + ("" if verdict == "equal" else f"; **{verdict}**: {'; '.join(E.problems(result))}")
            lines.append(f"| {result.cell.id} | " + " | ".join(cells) + f" | {checks} |")
    return lines


def _coverage(by_id: dict) -> str:
    missing = [c.id for c in E.ALL_CELLS if c.id not in by_id]
    if not missing:
        return "the whole matrix"
    return (f"{len(missing)} not run in this measurement, marked as such: a run of part of the matrix "
            f"(`SCALE_SSL_WRITE_EQUIVALENCE=1 pytest tests/test_equivalence_matrix.py -k ...`)")


def render(results: list[E.Result]) -> str:
    by_id = {r.cell.id: r for r in results}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fp32_tol = ", ".join(f"{k} {v:g}" for k, v in E.TOLERANCE_FP32.items())
    out = [
        BEGIN,
        "## Main backends (dp, ddp, DeepSpeed, FSDP2) — measured",
        "",
        f"Written by `tests/test_equivalence_matrix.py` (`make test-all`) on {stamp}: torch {torch.__version__}, "
        f"{platform.machine()}, {len(results)} of the {len(E.ALL_CELLS)} cells ({_coverage(by_id)}), "
        f"{E.STEPS} optimizer steps each, global batch {E.GLOBAL_BATCH}. "
        f"fp32 tolerances (teacher-forced, one step from the same state): {fp32_tol}. bf16: every figure at most "
        f"{E.BF16_FLOOR_FACTOR:g} x the one-process reordering floor (in parentheses: the largest distance between "
        f"any two of {E.REORDERINGS + 1} one-process runs of the same precision scheme whose only difference is the "
        f"order of the batch rows) + {E.BF16_SLACK:g}.",
        "",
        "### fp32: parameters after each step vs one process (largest over the six steps)",
        "",
        *_grid(by_id, "32"),
        "",
        "### bf16: parameters vs one process of the same precision scheme",
        "",
        *_grid(by_id, "bf16-mixed"),
        "",
        "### fp32, every figure",
        "",
        *_details(by_id, "32"),
        "",
        "### bf16, every figure (the reordering floor in parentheses)",
        "",
        *_details(by_id, "bf16-mixed"),
        "",
        END,
    ]
    return "\n".join(out)


def write_main_section(results: list[E.Result]) -> None:
    text = open(DOC).read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    with open(DOC, "w") as handle:
        handle.write(text[:start] + render(results) + text[end:])
