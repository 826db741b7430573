"""SwAV loss + gradients on N real gloo ranks equal one process on the global batch (queue off and
pre-filled queue), and the sharded SwAV queue is one logical queue across world-size changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scale_ssl.collectives import LocalCollective, TorchDistributedCollective
from scale_ssl.losses import SwAVLoss
from scale_ssl.methods.swav_queue import SwAVQueue
from tests.distributed import run_on_ranks

NUM_CROPS = (2, 2)
V = sum(NUM_CROPS)
B, DIM, K, QUEUE = 16, 8, 12, 32
REL_TOL = 1e-5


def _init():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return TorchDistributedCollective()


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, B, DIM, generator=g)  # crop-major: z[v, i] is crop v of image i
    w = torch.randn(K, DIM, generator=g)
    queue = F.normalize(torch.randn(2, QUEUE, DIM, generator=g), dim=2)  # one per assigned crop
    return z, w, queue


def loss_and_grads(z, w, queue, collective):
    """SwAV's loss path: normalised embeddings and prototypes -> scores -> SwAVLoss; grads of z, w."""
    z = z.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = z.shape[1]
    scores = F.normalize(z, dim=2).reshape(V * b, DIM) @ F.normalize(w, dim=1).t()
    queue_scores = None
    if queue is not None:
        with torch.no_grad():
            queue_scores = [queue[i] @ F.normalize(w, dim=1).t() for i in range(2)]
    loss = SwAVLoss(0.1, (0, 1), NUM_CROPS, 3, 0.05, collective)(scores, b, queue_scores)
    loss.backward()
    return loss.detach(), z.grad, w.grad


def _rank_loss(rank, world):
    collective = _init()
    z, w, queue = make_inputs()
    b = B // world
    local_z = z[:, rank * b : (rank + 1) * b]
    rows = QUEUE // world
    out = {}
    for use_queue in (False, True):
        local_queue = queue[:, rank * rows : (rank + 1) * rows] if use_queue else None
        loss, gz, gw = loss_and_grads(local_z, w, local_queue, collective)
        # what the strategy does: average the parameter gradient (and the logged loss) over ranks
        gw = collective.all_reduce(gw, "sum") / world
        loss = collective.all_reduce(loss, "sum") / world
        out[use_queue] = (loss, gz, gw)
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_swav_loss_and_grads_n_ranks_equal_one_process(world):
    """Queue off, and with a pre-filled queue sharded over the ranks."""
    z, w, queue = make_inputs()
    results = run_on_ranks(_rank_loss, world)
    b = B // world
    for use_queue in (False, True):
        loss, gz, gw = loss_and_grads(z, w, queue if use_queue else None, LocalCollective())
        per_rank = [r[use_queue] for r in results]
        loss_diff = max(abs(r_loss.item() - loss.item()) for r_loss, _, _ in per_rank)
        # each rank's mean over b rows is N x its share of the global mean
        gz_diff = max(_rel(r_gz / world, gz[:, i * b : (i + 1) * b]) for i, (_, r_gz, _) in enumerate(per_rank))
        gw_diff = max(_rel(r_gw, gw) for _, _, r_gw in per_rank)
        print(f"swav loss {world} ranks queue={use_queue}: loss abs diff {loss_diff:.2e}, "
              f"grad rel diff embeddings {gz_diff:.2e}, prototypes {gw_diff:.2e}")
        assert loss_diff <= REL_TOL * abs(loss.item())
        assert gz_diff < REL_TOL and gw_diff < REL_TOL


def test_queue_changes_the_loss():
    """The queue really enters Sinkhorn (otherwise the queue test above proves nothing)."""
    z, w, queue = make_inputs()
    with_queue = loss_and_grads(z, w, queue, LocalCollective())[0]
    without = loss_and_grads(z, w, None, LocalCollective())[0]
    assert abs(with_queue - without) > 1e-3


# -- the queue as global state ----------------------------------------------------------------
QB = 12  # global batch of the queue tests
QLEN = 48  # 4 global batches


def global_batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, QB, DIM, generator=g) for _ in range(steps)]


def push_steps(queue, batches, rank, world):
    b = QB // world
    for batch in batches:
        queue.push(batch[:, rank * b : (rank + 1) * b])


def _rank_queue(rank, world, jobs):
    """Per job (logical queue or None, steps): load it, push ``steps`` global batches; return what a
    checkpoint would hold right after loading and after the pushes, and this rank's shards then."""
    collective = _init()
    out = []
    for state, steps in jobs:
        queue = SwAVQueue(QLEN, 2, DIM)
        if state is not None:
            queue.load_logical_state(state)
        queue.allocate(QB // world, collective, torch.device("cpu"))
        after_load = queue.logical_state(collective)
        shard_after_load = queue.embeddings.clone()
        push_steps(queue, global_batches(steps), rank, world)
        out.append((after_load, queue.logical_state(collective), shard_after_load, queue.embeddings.clone()))
    return out


def single_process_queue(steps):
    queue = SwAVQueue(QLEN, 2, DIM)
    queue.allocate(QB, LocalCollective(), torch.device("cpu"))
    push_steps(queue, global_batches(steps), 0, 1)
    return queue


@pytest.mark.timeout(300)
def test_queue_saved_at_one_world_size_resumes_identical_at_another():
    """Save at 2 -> resume at 4, save at 4 -> resume at 2, and 2 -> 2 (each rank its own rows)."""
    # 3 pushes: 3 of the 4 blocks filled, so a wrong layout of the empty block would show too
    (saved2,) = zip(*run_on_ranks(_rank_queue, 2, [(None, 3)]))
    saved4, from2 = zip(*run_on_ranks(_rank_queue, 4, [(None, 3), (saved2[0][1], 1)]))
    from4, again2 = zip(*run_on_ranks(_rank_queue, 2, [(saved4[0][1], 1), (saved2[0][1], 1)]))
    reference = single_process_queue(3).embeddings
    for saved in (saved2, saved4):
        for _, logical, _, _ in saved:  # identical on every rank, and what 1 process would hold
            assert torch.equal(logical["embeddings"], reference) and logical["filled"] == 3 * QB
    for resumed, source in ((from2, saved2), (from4, saved4), (again2, saved2)):
        logical = source[0][1]
        for after_load, after_step, _, _ in resumed:
            assert torch.equal(after_load["embeddings"], logical["embeddings"])
            assert after_load["filled"] == logical["filled"]
            # it keeps acting as the one logical queue: the next push shifts it by a global batch
            assert torch.equal(after_step["embeddings"][:, QB:], logical["embeddings"][:, :-QB])
            assert after_step["filled"] == QLEN
        assert not torch.equal(resumed[0][2], resumed[1][2])  # sharded, not replicated
    for saved, resumed in zip(saved2, again2):  # same world size: every rank gets its own rows back
        assert torch.equal(resumed[2], saved[3])


def test_queue_length_must_divide_by_the_global_batch():
    queue = SwAVQueue(50, 2, DIM)
    with pytest.raises(ValueError, match="queue_length=50 is not divisible by the global batch 12"):
        queue.allocate(12, LocalCollective(), torch.device("cpu"))


def test_loading_a_queue_of_another_shape_is_a_clear_error():
    queue = SwAVQueue(QLEN, 2, DIM)
    with pytest.raises(ValueError, match="resume with the queue settings"):
        queue.load_logical_state({"embeddings": torch.zeros(2, 24, DIM), "filled": 0})
