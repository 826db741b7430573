"""The XLA column of the real-recipe equivalence matrix: every method on 2 XLA:CPU devices against
one plain-CPU process on the whole global batch.

The matrix itself -- the methods built by their own classes with their ``fmnist_cpu.yaml`` recipes
at tiny sizes, the batches, the six steps over two epochs, what is compared and how, the
teacher-forced fp32 comparison and its tolerances -- is ``tests/_equivalence.py`` (``E``); this
file only runs it on XLA. The cell is ``xla2-<method>-fp32``: ``XLAStrategy(sync_batchnorm=True)``
with one replica per device, each on its half of every global batch, through the public Trainer.

A session (``XlaMatrix``), for the methods its tests selected:

1. here, on the CPU: each method's one-process reference (``single``, fp32), a snapshot after
   every step (``E.Recorder``), and CPC's initial online head;
2. one launch of ``tests/xla/_replicas.py`` (scenario ``recipe``) on 2 XLA:CPU devices running
   every selected method in turn (``run_replica_cells``): replica 0 saves a snapshot after every
   step; every replica returns its final state and the hash of every step's program;
3. here again: the replicas must have traced one program per step and end bitwise equal; then
   the free run against the reference, the teacher-forced replays (``E.TeacherForcing``, in fp32
   and in float64: see ``REFERENCE_DTYPES``), SwAV's frozen prototypes, the EMA recurrence, and
   the verdict (``E.problems``, the main cells' tolerances).

What only XLA needs, and why:

* The module is built once by this process and sent to the replicas: XLA:CPU devices are threads
  of one process sharing one host RNG, so modules built by the threads themselves would not start
  where the one-process reference starts (MoCo's random queue included). CPC's online head is
  built on the first batch, from whatever the RNG holds then: the replicas start it from the
  reference's initial head (the product broadcasts replica 0's head to the others).
* SwAV's logical queue is a gather read back to the host; in this one-process emulation every
  replica must run that gather in the test sync shim's lockstep (``_SyncedGather``), or each
  thread compiles and runs its own copy and the copies never meet (tests/xla/sync_shim.py).
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from scale_ssl.strategies import SingleDeviceStrategy
from scale_ssl.trainer import Callback
from tests import _equivalence as E
from tests._equivalence_report import _checks, _num

DEVICES = 2
BACKEND = f"xla{DEVICES}"
# The fp32 figures must meet E.TOLERANCE_FP32 on every step but the worst, and that one
# E.ONE_STEP_BOUND_FP32, as the main cells. XLA:CPU and eager CPU differ in every kernel's order of
# summation, not only in the cross-rank sums, so every activation differs by ~1e-7 and a ReLU whose
# input is a rounding-level tie opens in one run and not in the other on more steps than between
# two CPU backends. Which side is "wrong" there is decided by arithmetic: each step is also
# replayed in float64 from the same state, and counts against whichever one-process run, fp32 or
# float64, it is closer to. Measured: on 4 of the 5 ResNet cells eager fp32 switches a gate at the
# initial weights (its optimizer state 1.7e-3..5.4e-3 from float64's after step 1) while XLA is
# 2.6e-6 / 3.8e-6 from float64 (SimCLR / SimSiam). A bug cannot hide behind that: it moves the
# XLA run away from both references alike.
REFERENCE_DTYPES = (torch.float32, torch.float64)


def cell(method: str) -> E.Cell:
    return E.Cell(method, BACKEND, "32")


# -- inside the replicas process (one thread per XLA:CPU device) -----------------------------------
class _SyncedGather:
    """The strategy's collective for a gather whose result is read on the host at once: the gather
    is run by the shim's sync on every replica together before the caller reads it."""

    def __init__(self, collective):
        self.collective = collective
        self.world_size, self.rank = collective.world_size, collective.rank

    def all_gather(self, tensor, grad=False):
        import torch_xla

        out = self.collective.all_gather(tensor, grad=grad)
        torch_xla.sync()
        return out


def _host(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    return value


class ReplicaRecorder(E.Recorder):
    """``E.Recorder`` on an XLA replica: replica 0 saves ``step{k}.pt`` (and SwAV's initial
    prototypes) in ``states``; every replica keeps its last snapshot and the graph hash of every
    step program (forward, global BatchNorm, loss, backward, gradient all-reduce)."""

    def __init__(self, states: str):
        super().__init__(E.save_sink(states))
        self.states = states
        self.sink.initial_prototypes = None
        self.graph_hashes: list[str] = []
        self.last: dict | None = None

    def on_train_start(self, trainer, module):
        super().on_train_start(trainer, module)
        if trainer.is_global_zero and self.sink.initial_prototypes is not None:
            torch.save(self.sink.initial_prototypes, os.path.join(self.states, "initial_prototypes.pt"))
        queue = getattr(module, "queue", None)
        if queue is not None and hasattr(queue, "logical_state"):
            logical_state = queue.logical_state
            queue.logical_state = lambda collective: logical_state(_SyncedGather(collective))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        import torch_xla

        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.graph_hashes.append(torch_xla._XLAC._get_graph_hash(grads))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # E.snapshot's loss reduction syncs first, so its reads are plain transfers; the queue and
        # the online head's state it returns as they are (device tensors here).
        taken = _host(E.snapshot(trainer, module, loss))
        if trainer.is_global_zero:
            self.sink(taken)
        self.last = taken


def _start_online_head_from(module, head_state: dict) -> None:
    evaluator = module.online_evaluator
    build = evaluator._build

    def build_then_load(*args, **kwargs):
        build(*args, **kwargs)
        evaluator.head.load_state_dict(head_state)

    evaluator._build = build_then_load


def run_replica_cells(strategy_factory, jobs: list[dict]) -> list[dict]:
    """On one replica: train every job (``method``, ``module``, ``states``, ``online_head``) in
    turn, each with a fresh strategy; per job the graph hashes and the final state."""
    import torch_xla.debug.metrics as met

    out = []
    for job in jobs:
        method, module = job["method"], job["module"]
        strategy = strategy_factory()
        rank, world = strategy.global_rank, strategy.world_size
        if job.get("online_head") is not None:
            _start_online_head_from(module, job["online_head"])
        recorder = ReplicaRecorder(job["states"])
        compiles = met.counter_value("UncachedCompile") or 0
        E.train(method, strategy, "32", E.rank_slice(E.global_batches(method), rank, world), [recorder], module=module)
        final = {k: recorder.last[k] for k in ("params", "ema", "buffers", "queue", "state")}
        out.append({"method": method, "graph_hashes": recorder.graph_hashes, "final": final,
                    "compiles": (met.counter_value("UncachedCompile") or 0) - compiles})
    return out


# -- in the test process ----------------------------------------------------------------------------
class _KeepInitialOnlineHead(Callback):
    """The online head as built on the first batch, before its first update."""

    def __init__(self):
        self.state: dict | None = None

    def on_train_start(self, trainer, module):
        evaluator = getattr(module, "online_evaluator", None)
        if evaluator is None:
            return
        build = evaluator._build

        def build_and_keep(*args, **kwargs):
            build(*args, **kwargs)
            self.state = {k: v.detach().clone() for k, v in evaluator.head.state_dict().items()}

        evaluator._build = build_and_keep


def run_reference(method: str, root: str) -> dict | None:
    """The one-process fp32 run on the whole global batch (snapshots in ``root/refs/<method>``);
    returns CPC's initial online head (None for the other methods)."""
    head = _KeepInitialOnlineHead()
    E.train(method, SingleDeviceStrategy(accelerator="cpu"), "32", E.global_batches(method),
            [E.Recorder(E.save_sink(reference_dir(root, method))), head])
    return head.state


def reference_dir(root: str, method: str) -> str:
    return os.path.join(root, "refs", method)


def states_dir(root: str, method: str) -> str:
    return os.path.join(root, "states", method)


def replicas_agree(replicas: list[dict]) -> list[str]:
    """What differs between the replicas of each method: the step programs' graph hashes (one
    program for every replica, or they never meet), the final parameters, EMA target, buffers,
    optimizer state and queue (bitwise: every replica applies the same all-reduced gradient)."""
    problems = []
    for jobs in zip(*(r["cells"] for r in replicas)):
        first = jobs[0]
        for rank, job in enumerate(jobs[1:], start=1):
            if job["graph_hashes"] != first["graph_hashes"]:
                problems.append(f"{first['method']}: replica {rank} traced another step program")
            for kind in ("params", "ema", "buffers", "state"):
                for name, value in first["final"][kind].items():
                    if not torch.equal(job["final"][kind][name], value):
                        problems.append(f"{first['method']}: replicas differ in {kind} {name}")
            queue = first["final"]["queue"]
            if queue is not None and not torch.equal(job["final"]["queue"], queue):
                problems.append(f"{first['method']}: replicas' queues differ")
    return problems


def finish(method: str, root: str, seconds: float) -> tuple[E.Result, list[dict]]:
    """Every figure of a cell from the snapshots saved by the reference and by replica 0, and the
    teacher-forced figures of each step."""
    started = time.perf_counter()
    result = E.Result(cell(method))
    states, refs = states_dir(root, method), reference_dir(root, method)
    taken = [E.load_step(states, k) for k in range(1, E.STEPS + 1)]
    result.free_running = E.worst([E.compare(t, E.load_step(refs, t["step"])) for t in taken])
    if taken[0]["prototypes_working"] is not None:
        initial = torch.load(os.path.join(states, "initial_prototypes.pt"), weights_only=False)
        result.frozen_prototypes_bitwise = E._frozen_bitwise(
            initial, [(t["params"]["prototypes.weight"], t["prototypes_working"]) for t in taken])
    if taken[0]["ema"]:
        previous = {n: p.detach().float() for n, p in E.build_module(method).named_parameters() if E._is_ema(n)}
        errors, dtypes = [], set()
        for t in taken:
            errors.append(E.ema_recurrence_error(previous, t) if t["ema_working_exact"] else float("inf"))
            previous, dtypes = t["ema"], dtypes | t["ema_dtypes"]
        result.ema_recurrence, result.ema_dtypes = max(errors), sorted(dtypes)
    steps = []
    for fp32, fp64 in zip(*(forced_replay(method, states, d) for d in REFERENCE_DTYPES)):
        steps.append({**min((fp32, fp64), key=_excess), "fp32_excess": _excess(fp32)})
    result.figures, result.outlier = E.worst(steps, spare=1), E.worst(steps)
    shutil.rmtree(states, ignore_errors=True)
    result.seconds = seconds + time.perf_counter() - started
    return result, steps


def forced_replay(method: str, states: str, dtype: torch.dtype) -> list[dict]:
    """``E.forced_replay`` with each step tagged with its reference's dtype."""
    return [{**step, "reference": str(dtype).replace("torch.", "")} for step in E.forced_replay(method, states, dtype)]


_excess = E.excess


class XlaMatrix:
    """The session's XLA cells: references, one replicas launch for all selected methods, the
    comparisons; computed on first use."""

    def __init__(self, root: str, methods: list[str], timeout_s: float):
        self.root, self.methods, self.timeout_s = root, [m for m in E.METHOD_NAMES if m in methods], timeout_s
        self.results: dict[str, E.Result] = {}
        self.replica_problems: list[str] = []
        self.compiles: dict[str, int] = {}
        self.per_step: dict[str, list[dict]] = {}
        self._failure: Exception | None = None
        self._ran = False

    def result(self, method: str) -> E.Result:
        if not self._ran:
            self._ran = True
            try:
                self._run()
            except Exception as err:  # every cell's test reports the launch's failure
                self._failure = err
        if self._failure is not None:
            raise AssertionError(f"the XLA matrix launch failed: {self._failure}")
        return self.results[method]

    def _run(self) -> None:
        from tests.xla.replicas import run_replicas

        started = time.perf_counter()
        jobs = []
        for method in self.methods:
            online_head = run_reference(method, self.root)
            os.makedirs(states_dir(self.root, method), exist_ok=True)
            jobs.append({"method": method, "module": E.build_module(method), "states": states_dir(self.root, method),
                         "online_head": online_head})
        replicas = run_replicas("recipe", DEVICES, {"jobs": jobs, "sync_batchnorm": True}, timeout_s=self.timeout_s)
        self.replica_problems = replicas_agree(replicas)
        # Time per cell: its share of the launch, plus its own reference and comparisons.
        share = (time.perf_counter() - started) / len(self.methods)
        for job in replicas[0]["cells"]:
            self.compiles[job["method"]] = job["compiles"]
            self.results[job["method"]], self.per_step[job["method"]] = finish(job["method"], self.root, share)


# -- docs/EQUIVALENCE.md: the xla section -----------------------------------------------------------
DOC = os.path.join(E.REPO, "docs", "EQUIVALENCE.md")
BEGIN, END = "<!-- equivalence:xla:begin -->", "<!-- equivalence:xla:end -->"


def render(results: list[E.Result], per_step: dict[str, list[dict]], seconds: float) -> str:
    import datetime

    import torch_xla

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fp32_tol = ", ".join(f"{k} {v:g}" for k, v in E.TOLERANCE_FP32.items())
    bound = ", ".join(f"{k} {v:g}" for k, v in E.ONE_STEP_BOUND_FP32.items())
    lines = [
        BEGIN,
        f"## XLA: {DEVICES} XLA:CPU devices vs one CPU process — measured",
        "",
        f"Written by `tests/xla/test_xla_recipe_matrix.py` (`make test-all`) on {stamp}: torch {torch.__version__}, "
        f"torch_xla {torch_xla.__version__}, {len(results)} cells of {E.STEPS} optimizer steps, global batch "
        f"{E.GLOBAL_BATCH} ({E.GLOBAL_BATCH // DEVICES} per device), fp32, `XLAStrategy(sync_batchnorm=True)` with one "
        "replica per device through the public Trainer, compared with one process on the whole global batch as "
        "the main section's cells are (same modules, recipes, batches and figures; teacher-forced, one step from "
        f"the same state). Tolerances: {fp32_tol} on every step but the worst; that one within {bound}. Each step "
        "counts against the closer of two one-process replays from the same state, fp32 and float64: XLA:CPU "
        "and eager CPU sum every convolution, matmul and reduction in another order, so a ReLU whose input is a "
        "rounding-level tie opens in one run and not in the other on more steps than between two CPU backends, "
        "and float64 shows which fp32 run switched it (column *settled by float64*: steps outside the tolerance "
        "against eager fp32 and within it against float64, i.e. eager fp32 switched a gate and XLA did not). The replicas of each cell traced one program per step (graph hashes equal) "
        f"and ended bitwise equal. Launch, references and comparisons: {seconds:.0f} s on a shared 2-core machine.",
        "",
        "| cell | loss | params | optimizer state | queue | EMA target | BN buffers | worst step (params / state) "
        "| settled by float64 | 6-step free run (params) | checks |",
        "|---" * 11 + "|",
    ]
    for result in results:
        fig, outlier = result.figures, result.outlier or {}
        problems = E.problems(result)
        checks = _checks(result) + (f"; **DIFFERS**: {'; '.join(problems)}" if problems else "")
        settled = [str(k) for k, step in enumerate(per_step[result.cell.method], 1)
                   if step["fp32_excess"] > 1 and _excess(step) <= 1]
        cells = [_num(fig.get(k)) for k in ("loss", "params", "state", "queue", "ema", "buffers")]
        cells += [f"{_num(outlier.get('params'))} / {_num(outlier.get('state'))}",
                  "step " + ", ".join(settled) if settled else "-", _num((result.free_running or {}).get("params"))]
        lines.append(f"| {result.cell.id} | " + " | ".join(cells) + f" | {checks} |")
    lines += [
        "",
        "Why a float64 arbiter: `tests/xla/test_xla_single_device.py` shows on one XLA device that every gate "
        "where XLA's ResNet gradient differs from float64's is such a tie, and that with XLA's gates float64 "
        "gives XLA's gradient. A bug cannot hide behind it: it moves the XLA run away from both references. "
        "The free run measures chaos (ties decide the trajectory), not correctness.",
        END,
    ]
    return "\n".join(lines)


def write_section(results: list[E.Result], per_step: dict[str, list[dict]], seconds: float) -> None:
    """Replace the text between the xla markers of docs/EQUIVALENCE.md (nothing else)."""
    text = open(DOC).read()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise AssertionError(f"{DOC} must hold the markers {BEGIN} and {END} once each")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    with open(DOC, "w") as handle:
        handle.write(text[:start] + render(results, per_step, seconds) + text[end:])
