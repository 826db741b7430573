"""Larger worlds: 16 and 32 gloo ranks with b rows each equal one process with N·b rows.

Rank-offset and queue-sharding mistakes can hide at 2 or 4 ranks (an offset of ``rank * b`` that
should be ``rank * 2b`` is still right for rank 0, a shard placed at the neighbour's index still
gives a permutation that Sinkhorn cannot see, ...). These tests run the distributed losses and
queues at the tensor level, no model and no trainer, so 32 processes fit a 2-core CI machine:

* NT-Xent, AMDIM's feature-map NCE task and CPC's task (each with a small shared linear map or its
  own parameters, so the strategy's gradient averaging is part of the check), and distributed
  Sinkhorn: loss, parameter gradients (mean over ranks, what DDP's all-reduce computes), the
  gradient of every rank's own input rows, Sinkhorn's codes.
* The SwAV loss with its sharded queue over several steps (empty, filling, in Sinkhorn), and the
  MoCo queue under accumulation (each micro-batch's gathered keys held, enqueued once per step,
  the pointer wrapping): loss, prototype/query-map gradients, the logical queue after every step.
* Resume across world sizes (design contract 4): SwAV's logical queue saved at world N (16 or 32)
  and resumed at world 2 is the queue a world-2 run holds after the same steps, every rank gets
  exactly the rows that run's rank holds, and the resumed run continues bitwise like it. MoCo's
  queue (global, replicated) likewise.

Break-checks run in the same launch: a gather whose backward does not sum over ranks, a collective
whose rank (hence ``rank_offset`` and the queue's shard index) is off by one, Sinkhorn without
its all-reduces, MoCo keys enqueued without the gather. Each must move its figure far outside the
tolerance.

Tolerance: fp32, relative 1e-5 of the largest entry of the compared tensor (of all parameter
gradients together, for a parameter's gradient); queue contents bitwise, as they are copies. One
process and N ranks sum the same terms in another order (a ring all-reduce over 32 ranks, the
64-row sums of one process); each such sum is off by a few ulps (2^-24 = 6e-8 relative each), and
the measured differences stay below 1e-6. Every deliberate bug moved a figure by 0.2 or more
(the tests require more than 1e-3, or 0.1 for queue rows).

Ranks are forked from the test process (``run_on_ranks(..., start_method="fork")``): a spawned
rank would re-import torch (2-4 s of CPU and ~250 MB each), a forked one shares the imported
modules, so 32 ranks start in seconds. ``docs/EQUIVALENCE.md`` (the large-world section) is
written from these measurements when both world sizes ran in the session (``make test-all``).
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.nn.functional as F

from scale_ssl.collectives import LocalCollective, TorchDistributedCollective
from scale_ssl.losses import CPCTask, FeatureMapContrastiveTask, InfoNCEQueueLoss, NTXentLoss, SwAVLoss
from scale_ssl.losses.sinkhorn import distributed_sinkhorn
from scale_ssl.methods.moco_queue import MoCoQueue
from scale_ssl.methods.swav_queue import SwAVQueue
from tests.distributed import run_on_ranks

WORLDS = [16, pytest.param(32, marks=pytest.mark.slow)]
RESUME_WORLD = 2
B = 2  # rows per rank at the large world: global batch 2N
DIM = 8
REL_TOL = 1e-5
BROKEN_AT_LEAST = 100 * REL_TOL

# SwAV: 2 assigned crops of 4, K prototypes, a queue of two global batches (full after step 1,
# in Sinkhorn from step 2); saved after SWAV_SAVED steps, SWAV_STEPS in all.
NUM_CROPS, ASSIGN, K = (2, 2), (0, 1), 10
SWAV_SAVED, SWAV_STEPS = 3, 5
# MoCo: 2 micro-batches per optimizer step, a queue of 3 optimizer steps' keys (wraps at step 3).
MICRO, MOCO_SAVED, MOCO_STEPS = 2, 3, 5


# -- the collectives: the real one and two deliberately wrong ones --------------------------------
class GatherWithoutSummedBackward(TorchDistributedCollective):
    """Wrong: the gather's backward returns this rank's rows of its *own* loss's gradient only,
    without summing the other ranks' (lightly #1528, pytorch/xla#5784)."""

    def all_gather(self, tensor, grad=True):
        full = super().all_gather(tensor.detach(), grad=False)
        start, rows = self.rank * tensor.shape[0], tensor.shape[0]
        return torch.cat([full[:start], tensor, full[start + rows:]]) if grad and tensor.requires_grad else full


class OffByOneRank(TorchDistributedCollective):
    """Wrong: reports rank r + 1 (mod N), so ``rank_offset`` points at the neighbour's rows and a
    loaded SwAV queue gives each rank its neighbour's shard. The gathers themselves stay right."""

    @property
    def rank(self) -> int:
        return (self._rank + 1) % self._world_size


# -- inputs: one global problem per world size, identical in every rank and in the reference -------
def make_inputs(world: int) -> dict:
    g = torch.Generator().manual_seed(1000 + world)
    n = world * B
    v = sum(NUM_CROPS)
    return {
        "z1": torch.randn(n, DIM, generator=g), "z2": torch.randn(n, DIM, generator=g),
        "w": torch.eye(DIM) + 0.3 * torch.randn(DIM, DIM, generator=g),
        "maps": [[torch.randn(n, DIM, s, s, generator=g) for s in (1, 2, 3)] for _ in range(2)],
        "grid": torch.randn(n, 6, 4, 3, generator=g),
        "scores": F.normalize(torch.randn(n, DIM, generator=g), dim=1) @ F.normalize(torch.randn(K, DIM, generator=g), dim=1).t(),
        # unit rows, so the queue stores exactly these values whatever the world size
        "swav_z": [F.normalize(torch.randn(v, n, DIM, generator=g), dim=2) for _ in range(SWAV_STEPS)],
        "prototypes": torch.randn(K, DIM, generator=g),
        "moco_q": [[torch.randn(n, DIM, generator=g) for _ in range(MICRO)] for _ in range(MOCO_STEPS)],
        "moco_k": [[F.normalize(torch.randn(n, DIM, generator=g), dim=1) for _ in range(MICRO)] for _ in range(MOCO_STEPS)],
    }


def rows_of(rank: int, world: int, n: int) -> slice:
    b = n // world
    return slice(rank * b, (rank + 1) * b)


def leaf(t):
    return t.clone().requires_grad_()


# -- the cases: each returns what one rank (or the one process) computed ----------------------------
# {"loss": scalar, "mean": {name: tensor} (averaged over ranks, as DDP averages gradients),
#  "rows": {name: tensor} (this rank's rows; concatenated over ranks), "rows_grad": {...} (the
#  gradient of this rank's input rows: concatenated over ranks and divided by N, the gradient of
#  the mean over ranks)}
def nt_xent_case(inp, rows, collective):
    z1, z2, w = leaf(inp["z1"][rows]), leaf(inp["z2"][rows]), leaf(inp["w"])
    loss = NTXentLoss(0.2, collective=collective)(z1 @ w, z2 @ w)
    loss.backward()
    return {"loss": loss.detach(), "mean": {"w": w.grad}, "rows_grad": {"z1": z1.grad, "z2": z2.grad}}


def amdim_case(inp, rows, collective):
    w = leaf(inp["w"])
    raw = [[leaf(m[rows]) for m in view] for view in inp["maps"]]
    views = [[torch.einsum("de,bdhw->behw", w, m) for m in view] for view in raw]
    task = FeatureMapContrastiveTask("01, 11, 02", tclip=5.0, collective=collective, seed=3)
    loss = task(views[0], views[1])
    loss.backward()
    grads = {f"map{v}{k}": raw[v][k].grad for v in range(2) for k in range(3)}
    return {"loss": loss.detach(), "mean": {"w": w.grad}, "rows_grad": grads}


def cpc_case(inp, rows, collective):
    torch.manual_seed(7)  # the task's parameters: the same initial values everywhere
    task = CPCTask(6, target_dim=5, steps_to_ignore=1, steps_to_predict=2, context_blocks=1, collective=collective)
    grid = leaf(inp["grid"][rows])
    loss = task(grid)
    loss.backward()
    return {"loss": loss.detach(), "mean": {n: p.grad for n, p in task.named_parameters()}, "rows_grad": {"grid": grid.grad}}


def sinkhorn_case(inp, rows, collective):
    return {"rows": {"codes": distributed_sinkhorn(inp["scores"][rows], 3, 0.05, collective)}}


def swav_step(inp, step, rows, collective, queue: SwAVQueue) -> dict:
    """One SwAV step on given embeddings: scores against the prototypes, the swapped-prediction
    loss with the queue in Sinkhorn once full, then this rank's assigned crops pushed."""
    z, w = leaf(inp["swav_z"][step][:, rows]), leaf(inp["prototypes"])
    b = z.shape[1]
    if not queue.allocated:
        queue.allocate(b, collective, torch.device("cpu"))
    prototypes = F.normalize(w, dim=1)
    scores = F.normalize(z, dim=2).reshape(-1, DIM) @ prototypes.t()
    queue_scores = None
    if queue.is_full:
        with torch.no_grad():
            queue_scores = [queue.embeddings[i] @ prototypes.t() for i in range(len(ASSIGN))]
    loss = SwAVLoss(0.1, ASSIGN, NUM_CROPS, 3, 0.05, collective)(scores, b, queue_scores)
    loss.backward()
    queue.push(inp["swav_z"][step][list(ASSIGN)][:, rows])
    return {"loss": loss.detach(), "mean": {"prototypes": w.grad}, "rows_grad": {"z": z.grad.transpose(0, 1)},
            "in_use": queue_scores is not None}


def swav_run(inp, steps, rows, collective, state=None) -> dict:
    queue = SwAVQueue(2 * inp["swav_z"][0].shape[1], len(ASSIGN), DIM)
    if state is not None:
        queue.load_logical_state(state)
    out = {"steps": [], "logical": [], "shards": []}
    for step in steps:
        out["steps"].append(swav_step(inp, step, rows, collective, queue))
        out["logical"].append(queue.logical_state(collective))
        out["shards"].append(queue.embeddings.clone())
    return out


def moco_run(inp, steps, rows, collective, state=None, gather=True) -> dict:
    """MoCo's queue under accumulation: every micro-batch scored against the same queue, its
    gathered keys held, all of them enqueued once per optimizer step (``MoCoV2``'s order)."""
    step_batch = sum(k.shape[0] for k in inp["moco_k"][0])
    queue = MoCoQueue(3 * step_batch, DIM, generator=torch.Generator().manual_seed(0))
    if state is not None:
        queue.load_state_dict(state)
    criterion = InfoNCEQueueLoss(0.2)
    out = {"steps": [], "state": []}
    for step in steps:
        w = leaf(inp["w"])
        micro_batches = list(zip(inp["moco_q"][step], inp["moco_k"][step]))
        total = 0.0
        for queries, keys in micro_batches:
            q, k = queries[rows] @ w, keys[rows]
            loss, _ = criterion(q, k, queue.keys)
            (loss / len(micro_batches)).backward()  # the trainer divides by the accumulation count
            total = total + loss.detach() / len(micro_batches)
            queue.hold(collective.all_gather(k, grad=False) if gather else k)
        queue.enqueue_held()
        out["steps"].append({"loss": total, "mean": {"w": w.grad}})
        out["state"].append(queue.state_dict())
    return out


def whole_batch(inp) -> dict:
    """The one-process view of the MoCo inputs: each optimizer step's micro-batches concatenated
    (micro-batch by micro-batch, ranks in order: the order the gathered keys are enqueued)."""
    out = dict(inp)
    out["moco_q"] = [[torch.cat(step)] for step in inp["moco_q"]]
    out["moco_k"] = [[torch.cat(step)] for step in inp["moco_k"]]
    return out


def _large_world(rank: int, world: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    inp = make_inputs(world)
    rows = rows_of(rank, world, world * B)
    right, no_sum, off_by_one = TorchDistributedCollective(), GatherWithoutSummedBackward(), OffByOneRank()
    out = {}
    for name, case in (("nt_xent", nt_xent_case), ("amdim", amdim_case), ("cpc", cpc_case)):
        out[name] = case(inp, rows, right)
        out[name + "/no_sum"] = case(inp, rows, no_sum)
        out[name + "/off_by_one"] = case(inp, rows, off_by_one)
    out["sinkhorn"] = sinkhorn_case(inp, rows, right)
    out["sinkhorn/local"] = sinkhorn_case(inp, rows, LocalCollective())
    out["swav"] = swav_run(inp, range(SWAV_SAVED), rows, right)
    saved = out["swav"]["logical"][-1]
    # the saved queue loaded back at this world: the right collective gets it back, the off-by-one
    # one gives every rank its neighbour's shard
    for name, collective in (("swav/reload", right), ("swav/reload_off_by_one", off_by_one)):
        queue = SwAVQueue(saved["length"], len(ASSIGN), DIM)
        queue.load_logical_state(saved)
        queue.allocate(B, collective, torch.device("cpu"))
        out[name] = queue.logical_state(right)
    out["moco"] = moco_run(inp, range(MOCO_SAVED), rows, right)
    out["moco/not_gathered"] = moco_run(inp, range(MOCO_SAVED), rows, right, gather=False)
    return out


def _resumed_at_two(rank: int, world: int, big_world: int, swav_saved: dict, moco_saved: dict) -> dict:
    """At world 2 with the large world's global batch: a run from scratch over every step (the
    control) and the run resumed from the large world's queues; plus a resume whose collective
    has the off-by-one rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    inp = make_inputs(big_world)
    rows = rows_of(rank, world, big_world * B)
    right = TorchDistributedCollective()
    return {
        "swav/control": swav_run(inp, range(SWAV_STEPS), rows, right),
        "swav/resumed": swav_run(inp, range(SWAV_SAVED, SWAV_STEPS), rows, right, swav_saved),
        "swav/resumed_off_by_one": swav_run(inp, range(SWAV_SAVED, SWAV_STEPS), rows, OffByOneRank(), swav_saved),
        "moco/control": moco_run(inp, range(MOCO_STEPS), rows, right),
        "moco/resumed": moco_run(inp, range(MOCO_SAVED, MOCO_STEPS), rows, right, moco_saved),
    }


# -- combining ranks and comparing with one process ---------------------------------------------
def combine(per_rank: list[dict]) -> dict:
    """What the N ranks computed, as one process would see it."""
    world = len(per_rank)
    first = per_rank[0]
    out = {}
    if "loss" in first:
        out["loss"] = torch.stack([r["loss"] for r in per_rank]).mean()
    for name in first.get("mean", {}):
        out[f"grad {name}"] = torch.stack([r["mean"][name] for r in per_rank]).mean(dim=0)
    for name in first.get("rows_grad", {}):
        out[f"grad of input {name}"] = torch.cat([r["rows_grad"][name] for r in per_rank]) / world
    for name in first.get("rows", {}):
        out[name] = torch.cat([r["rows"][name] for r in per_rank])
    return out


def one_process(case_result: dict) -> dict:
    return combine([case_result])


def max_rel_diff(got: dict, want: dict) -> tuple[float, str]:
    """The largest difference relative to the largest entry of the compared tensor; parameter
    gradients relative to the largest entry of all the case's parameter gradients (as the whole
    model's update would be): a parameter whose gradient is zero in exact arithmetic (CPC's
    target bias shifts every score of a softmax alike) holds only rounding noise on both sides."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    params = [k for k in want if k.startswith("grad ") and not k.startswith("grad of input")]
    param_scale = max((want[k].abs().max().item() for k in params), default=0.0)
    worst = (0.0, "")
    for k in want:
        scale = param_scale if k in params else want[k].abs().max().item()
        diff = (got[k].double() - want[k].double()).abs().max().item() / max(scale, 1e-30)
        worst = max(worst, (diff, k))
    return worst


def queue_diff(got: dict, want: dict) -> float:
    assert got["filled"] == want["filled"]
    return (got["embeddings"] - want["embeddings"]).abs().max().item()


MEASURED: dict[tuple[str, int], dict] = {}  # (case, world) -> figures, for docs/EQUIVALENCE.md


def record(case: str, world: int, compared: str, diff: float, broken: dict[str, float] | None = None) -> None:
    MEASURED[(case, world)] = {"compared": compared, "diff": diff, "broken": broken or {}}


_LAUNCHES: dict[int, tuple[list, float]] = {}


def large_world_results(world: int) -> tuple[list, float]:
    """One launch of ``world`` ranks for every check of that world (cached for the session)."""
    if world not in _LAUNCHES:
        started = time.perf_counter()
        results = run_on_ranks(_large_world, world, start_method="fork")
        _LAUNCHES[world] = (results, time.perf_counter() - started)
    return _LAUNCHES[world]


# -- the tests -------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", WORLDS)
def test_losses_and_gradients_at_a_large_world_equal_one_process(world):
    results, seconds = large_world_results(world)
    MEASURED[("seconds/launch", world)] = {"seconds": seconds}
    inp = make_inputs(world)
    everything = slice(None)
    for name, case in (("nt_xent", nt_xent_case), ("amdim", amdim_case), ("cpc", cpc_case), ("sinkhorn", sinkhorn_case)):
        want = one_process(case(inp, everything, LocalCollective()))
        diff, where = max_rel_diff(combine([r[name] for r in results]), want)
        broken = {}
        for wrong in ("no_sum", "off_by_one", "local"):
            if f"{name}/{wrong}" in results[0]:
                broken[wrong], _ = max_rel_diff(combine([r[f"{name}/{wrong}"] for r in results]), want)
        record(name, world, "loss, parameter and input-row gradients" if name != "sinkhorn" else "codes", diff, broken)
        assert diff < REL_TOL, f"{name} at {world} ranks: {where} differs by {diff:.1e} (relative)"
        for wrong, figure in broken.items():
            assert figure > BROKEN_AT_LEAST, f"{name}: the {wrong} break-check went unnoticed ({figure:.1e})"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", WORLDS)
def test_swav_loss_with_its_sharded_queue_over_steps_at_a_large_world(world):
    results, _ = large_world_results(world)
    inp = make_inputs(world)
    reference = swav_run(inp, range(SWAV_SAVED), slice(None), LocalCollective())
    assert [s["in_use"] for s in reference["steps"]] == [False, False, True]  # the queue entered Sinkhorn
    diffs = []
    for step in range(SWAV_SAVED):
        got = combine([r["swav"]["steps"][step] for r in results])
        diff, where = max_rel_diff(got, one_process(reference["steps"][step]))
        assert diff < REL_TOL, f"SwAV step {step} at {world} ranks: {where} differs by {diff:.1e}"
        for r in results:  # one logical queue, identical on every rank, what one process holds
            assert torch.equal(r["swav"]["logical"][step]["embeddings"], reference["logical"][step]["embeddings"])
        diffs.append(diff)
    saved = results[0]["swav"]["logical"][-1]
    for r in results:
        assert torch.equal(r["swav/reload"]["embeddings"], saved["embeddings"])
    off_by_one = max(queue_diff(r["swav/reload_off_by_one"], saved) for r in results)
    assert off_by_one > 0.1
    record("swav", world, f"loss, prototype and embedding gradients over {SWAV_SAVED} steps (queue in Sinkhorn "
           "at the last); logical queue after each step (bitwise)", max(diffs), {"off_by_one (queue reloaded)": off_by_one})


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", WORLDS)
def test_moco_queue_under_accumulation_at_a_large_world(world):
    results, _ = large_world_results(world)
    reference = moco_run(whole_batch(make_inputs(world)), range(MOCO_SAVED), slice(None), LocalCollective())
    diffs, queues = [], []
    for step in range(MOCO_SAVED):
        got = combine([r["moco"]["steps"][step] for r in results])
        diff, where = max_rel_diff(got, one_process(reference["steps"][step]))
        assert diff < REL_TOL, f"MoCo step {step} at {world} ranks: {where} differs by {diff:.1e}"
        want = reference["state"][step]
        for r in results:
            state = r["moco"]["state"][step]
            assert state["ptr"] == want["ptr"]
            assert torch.equal(state["keys"], want["keys"])  # the gathered keys are copied, not computed
        diffs.append(diff)
    assert reference["state"][-1]["ptr"] == 0  # three steps of 2 micro-batches filled the queue once round
    broken = max((r["moco/not_gathered"]["state"][-1]["keys"] - reference["state"][-1]["keys"]).abs().max().item()
                 for r in results)
    assert broken > 0.1
    record("moco", world, f"loss, query-map gradient over {MOCO_SAVED} steps of {MICRO} micro-batches; queue keys "
           "and pointer after each step (bitwise)", max(diffs), {"keys not gathered": broken})


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", WORLDS)
def test_queues_saved_at_a_large_world_resume_at_two_ranks(world, tmp_path):
    """Contract 4: the logical queue saved at ``world`` ranks, resumed at 2 with the same global
    batch, is the queue a 2-rank run holds after the same steps, shard by shard, and the resumed
    run continues bitwise like that run (SwAV, sharded; MoCo, replicated)."""
    results, _ = large_world_results(world)
    # what a checkpoint holds (every rank's copy is the same; rank 0 writes it), through a file
    for r in results:
        assert torch.equal(r["swav"]["logical"][-1]["embeddings"], results[0]["swav"]["logical"][-1]["embeddings"])
    torch.save({"swav_queue": results[0]["swav"]["logical"][-1], "moco_queue": results[0]["moco"]["state"][-1]},
               tmp_path / "queues.ckpt")
    checkpoint = torch.load(tmp_path / "queues.ckpt", weights_only=True)
    swav_saved, moco_saved = checkpoint["swav_queue"], checkpoint["moco_queue"]
    started = time.perf_counter()
    two = run_on_ranks(_resumed_at_two, RESUME_WORLD, world, swav_saved, moco_saved, start_method="fork")
    MEASURED[("seconds/resume", world)] = {"seconds": time.perf_counter() - started}
    inp = make_inputs(world)
    reference = swav_run(inp, range(SWAV_STEPS), slice(None), LocalCollective())
    continued = SWAV_STEPS - SWAV_SAVED
    for rank, r in enumerate(two):
        control, resumed = r["swav/control"], r["swav/resumed"]
        # the large world's logical queue is the one the 2-rank run holds after the same steps
        assert torch.equal(control["logical"][SWAV_SAVED - 1]["embeddings"], swav_saved["embeddings"])
        for i in range(continued):
            step = SWAV_SAVED + i
            assert torch.equal(resumed["shards"][i], control["shards"][step]), (rank, step)
            assert torch.equal(resumed["logical"][i]["embeddings"], control["logical"][step]["embeddings"])
            assert resumed["steps"][i]["loss"].item() == control["steps"][step]["loss"].item()
            assert resumed["steps"][i]["in_use"] and control["steps"][step]["in_use"]
            assert torch.equal(resumed["steps"][i]["mean"]["prototypes"], control["steps"][step]["mean"]["prototypes"])
        moco_control, moco_resumed = r["moco/control"], r["moco/resumed"]
        assert torch.equal(moco_control["state"][MOCO_SAVED - 1]["keys"], moco_saved["keys"])
        for i in range(MOCO_STEPS - MOCO_SAVED):
            step = MOCO_SAVED + i
            assert moco_resumed["state"][i]["ptr"] == moco_control["state"][step]["ptr"]
            assert torch.equal(moco_resumed["state"][i]["keys"], moco_control["state"][step]["keys"])
            assert moco_resumed["steps"][i]["loss"].item() == moco_control["steps"][step]["loss"].item()
    # and both equal one process on the global batch
    diffs = []
    for i in range(continued):
        got = combine([r["swav/resumed"]["steps"][i] for r in two])
        diff, where = max_rel_diff(got, one_process(reference["steps"][SWAV_SAVED + i]))
        assert diff < REL_TOL, f"resumed SwAV step {SWAV_SAVED + i}: {where} differs by {diff:.1e}"
        diffs.append(diff)
    # break-check: resumed with the off-by-one rank, each rank holds its neighbour's shard
    off_by_one = max((r["swav/resumed_off_by_one"]["shards"][0] - r["swav/control"]["shards"][SWAV_SAVED]).abs().max().item()
                     for r in two)
    assert off_by_one > 0.1
    record("resume", world, f"queues saved at {world} ranks, resumed at {RESUME_WORLD}: SwAV's shards and logical queue, "
           f"MoCo's keys and pointer, losses and gradients of {continued} more steps bitwise equal to a {RESUME_WORLD}-rank "
           "run that had the same logical queue; the figure: vs one process",
           max(diffs), {"off_by_one (queue resumed)": off_by_one})


# -- docs/EQUIVALENCE.md -----------------------------------------------------------------------
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "EQUIVALENCE.md")
BEGIN, END = "<!-- equivalence:large-world:begin -->", "<!-- equivalence:large-world:end -->"
CASE_NAMES = {"nt_xent": "NT-Xent", "amdim": "AMDIM task", "cpc": "CPC task", "sinkhorn": "Sinkhorn",
              "swav": "SwAV loss + queue", "moco": "MoCo queue, accumulate 2", "resume": "queue resume"}
BREAK_NAMES = {"no_sum": "gather without summed backward", "off_by_one": "rank off by one", "local": "local sums"}
ALL_WORLDS = (16, 32)


def render_section() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        BEGIN,
        "## Larger worlds (16 and 32 gloo ranks) — measured",
        "",
        f"Written by `tests/test_large_world_equivalence.py` on {stamp} (torch {torch.__version__}): tensor-level, "
        f"{B} rows per rank, fp32. Figure: the largest difference from one process on the global batch, relative to "
        f"the largest entry of the compared tensor; tolerance {REL_TOL:g}. Queue contents are compared bitwise "
        "(they are copies of the inputs). Break-checks: the same launch with a deliberately wrong collective; the "
        "figure it moved.",
        "",
        "| case | ranks | compared | max difference | break-checks (difference) |",
        "|---|---|---|---|---|",
    ]
    for case in CASE_NAMES:
        for world in ALL_WORLDS:
            m = MEASURED[(case, world)]
            broken = "; ".join(f"{BREAK_NAMES.get(k, k)}: {v:.1e}" for k, v in m["broken"].items()) or "-"
            lines.append(f"| {CASE_NAMES[case]} | {world} | {m['compared']} | {m['diff']:.1e} | {broken} |")
    launch = {w: MEASURED[("seconds/launch", w)]["seconds"] for w in ALL_WORLDS}
    resume = {w: MEASURED[("seconds/resume", w)]["seconds"] for w in ALL_WORLDS}
    seconds = ", ".join(f"{w} ranks {launch[w]:.0f} s (resume at 2: {resume[w]:.0f} s)" for w in ALL_WORLDS)
    lines += [
        "",
        f"Wall time of the launches in that run: {seconds}; forked ranks, one thread each, on a shared 2-core machine. "
        "16 ranks are in the default suite (`make test`), 32 in `make test-all` (`@pytest.mark.slow`).",
        END,
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def write_equivalence_section():
    yield
    complete = all((case, world) in MEASURED for case in CASE_NAMES for world in ALL_WORLDS)
    if not complete or not os.path.exists(DOC):
        return
    text = open(DOC).read()
    if BEGIN not in text or END not in text:
        return
    start, end = text.index(BEGIN), text.index(END) + len(END)
    updated = text[:start] + render_section() + text[end:]
    with open(DOC + ".tmp", "w") as handle:
        handle.write(updated)
    os.replace(DOC + ".tmp", DOC)
