"""Time the collectives of one SSL training step on N CPU gloo ranks, next to the cost model.

    .venv/bin/python benchmarks/collective_scaling.py --world-sizes 2 4 8 [--steps 20] [--json out.json]

Each rank holds a tiny model (resnet10 + projection head, 1-channel input: the Fashion-MNIST demo
model) and, per step, runs the collectives our training step issues (sizes as the recording
collective of ``scale-ssl plan`` finds them for this model):

* ``gradient all_reduce``: all trainable parameters' gradients as one flat fp32 tensor (what DDP's
  buckets add up to);
* ``nt_xent all_gather`` + ``nt_xent backward all_reduce``: the (b, 2 x 128) projections of every
  rank, and the summed gradient of the gathered tensor (our gather's backward);
* ``global_bn all_gather``: one (1, 2C + 1) row per BatchNorm layer (``GlobalBatchNorm``), every
  layer a separate call, as in the forward;
* ``sinkhorn all_reduce``: SwAV's distributed Sinkhorn with K = 3000 and 3 iterations (two K-vectors
  per iteration plus the global max and row count).

Every op is preceded by a barrier and timed on rank 0 with ``time.perf_counter``; the median over
the steps is reported with the ring-model wire bytes per rank and the effective bandwidth they
imply. On a machine with fewer cores than ranks the ranks share cores: the figures then measure
gloo's loopback + scheduling, not a network, and are a sanity check of the *bytes*, not of a
cluster's time (docs/SCALING.md says how to read them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scale_ssl.models import ProjectionHead, build_resnet_encoder  # noqa: E402

NUM_PROTOTYPES = 3000
SINKHORN_ITERATIONS = 3
FEAT_DIM = 128


def tiny_model() -> torch.nn.Module:
    encoder, features = build_resnet_encoder("resnet10", in_channels=1, first_conv=True, maxpool1=False)
    return torch.nn.Sequential(encoder, ProjectionHead(features, 512, FEAT_DIM))


def ring_wire_bytes(op: str, size: int, world: int) -> float:
    if op == "all_reduce":
        return 2 * (world - 1) / world * size
    return (world - 1) / world * size  # all_gather: size is the gathered result


def _timed(fn, times: list[float]) -> None:
    dist.barrier()
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def _worker(rank: int, world: int, port: int, steps: int, batch: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_model()
    grads = torch.zeros(sum(p.numel() for p in model.parameters()))
    norms = [m.num_features for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    projections = torch.randn(batch, 2 * FEAT_DIM)
    gathered_grad = torch.randn(world * batch, 2 * FEAT_DIM)
    marginal = torch.randn(NUM_PROTOTYPES)
    scalar = torch.zeros(1)

    def all_gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)

    def global_bn():
        for channels in norms:
            all_gather(torch.randn(1, 2 * channels + 1))

    def sinkhorn():
        dist.all_reduce(scalar)  # row count
        dist.all_reduce(scalar, op=dist.ReduceOp.MAX)  # global max
        for _ in range(SINKHORN_ITERATIONS):
            dist.all_reduce(marginal, op=dist.ReduceOp.MAX)
            dist.all_reduce(marginal)

    ops = {
        "gradient all_reduce": (lambda: dist.all_reduce(grads), "all_reduce", grads.numel() * 4, 1),
        "nt_xent all_gather": (lambda: all_gather(projections), "all_gather", world * projections.numel() * 4, 1),
        "nt_xent backward all_reduce": (lambda: dist.all_reduce(gathered_grad), "all_reduce", gathered_grad.numel() * 4, 1),
        "global_bn all_gather (per layer)": (global_bn, "all_gather", sum(world * (2 * c + 1) * 4 for c in norms), len(norms)),
        "sinkhorn all_reduce (K=3000, 3 it.)": (sinkhorn, "all_reduce", (2 * SINKHORN_ITERATIONS * NUM_PROTOTYPES + 2) * 4,
                                                2 + 2 * SINKHORN_ITERATIONS),
    }
    times = {name: [] for name in ops}
    for step in range(steps + 2):  # two warm-up steps
        for name, (fn, *_rest) in ops.items():
            _timed(fn, times[name] if step >= 2 else [])
    if rank == 0:
        rows = []
        for name, (_fn, op, size, calls) in ops.items():
            median = statistics.median(times[name])
            wire = ring_wire_bytes(op, size, world)
            rows.append({"world_size": world, "op": name, "calls": calls, "bytes": size, "wire_bytes_per_rank": wire,
                         "median_ms": median * 1e3, "effective_GB_per_s": wire / median / 1e9})
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, steps: int, batch: int) -> list[dict]:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), steps, batch, queue), nprocs=world, join=True, start_method="spawn")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch (NT-Xent rows)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if max(args.world_sizes) > 16:
        parser.error("--world-sizes: at most 16 CPU ranks")
    all_rows = []
    print(f"{'ranks':>5}  {'op':<38} {'calls':>5} {'bytes':>12} {'wire/rank':>12} {'median ms':>10} {'eff. GB/s':>9}")
    for world in args.world_sizes:
        for row in measure(world, args.steps, args.batch):
            all_rows.append(row)
            print(f"{row['world_size']:>5}  {row['op']:<38} {row['calls']:>5} {row['bytes']:>12,} "
                  f"{row['wire_bytes_per_rank']:>12,.0f} {row['median_ms']:>10.2f} {row['effective_GB_per_s']:>9.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"cpu_count": os.cpu_count(), "steps": args.steps, "batch": args.batch, "rows": all_rows}, handle, indent=1)


if __name__ == "__main__":
    main()
