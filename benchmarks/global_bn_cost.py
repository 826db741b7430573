"""What the safe defaults of the DDP path cost per step, measured side by side on 2 gloo ranks.

    .venv/bin/python benchmarks/global_bn_cost.py [--global-batch 256] [--steps 10] [--warmup 2]
                                                  [--repeats 5] [--json out.json] [--write-doc]

The workload is the demo's (``configs/simclr/fmnist_cpu.yaml``: SimCLR, resnet10 with the 7x7
stem on 28 px, head 512-128, LARS, its precision), trained through the public ``Trainer`` with
``DDPStrategy`` on a shuffled ``DataLoader`` of pre-made views in memory (no input pipeline), so
the step is the whole cost. Variants, each a fresh model and trainer in the same two processes:

* ``local_bn``: ``DDPStrategy(sync_batchnorm=False)``, per-rank BatchNorm statistics;
* ``global_bn``: ``DDPStrategy()``, the default: ``GlobalBatchNorm`` (one all-gather of a
  (1, 2C + 1) row per BN layer per forward, and its all-reduce in backward);
* ``global_bn_checked``: the same with a custom ``collate_fn``, so the trainer can no longer
  count on equal per-rank batches by construction and gathers each step's batch sizes first
  (``lockstep_batches``: one all-gather of two int64 per rank per step).

Step time is the gap between consecutive end-of-batch stamps after the warm-up steps, median per
run. The variants run in rotation (ABC, BCA, CAB, ...), ratios are taken per rotation, then their
median and min-max. The per-step check is also timed alone (its all-gather, 200 calls, median),
since its share of a step is below what step-time ratios on a shared machine resolve.

``--write-doc`` rewrites the table between the ``global_bn_cost`` markers in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import doc_region  # noqa: E402

DEMO_CONFIG = os.path.join(ROOT, "configs", "simclr", "fmnist_cpu.yaml")
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
REGION = "global_bn_cost"
WORLD = 2
VARIANTS = ("local_bn", "global_bn", "global_bn_checked")
CHECK_CALLS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _views(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 1, 28, 28, generator=g)
    x2 = x1.flip(-1) + 0.1 * torch.randn(n, 1, 28, 28, generator=g)
    return torch.utils.data.TensorDataset(x1, x2, torch.zeros(n, dtype=torch.long))


def _checked_collate(rows):
    """torch's default collate under another name: the same batches, but the trainer can no longer
    count on equal per-rank batch sizes (a custom collate may drop rows), so its check runs."""
    return torch.utils.data.default_collate(rows)


def _run(variant: str, args, model_kwargs: dict, precision: str, data) -> list[float]:
    from scale_ssl.methods import SimCLR
    from scale_ssl.strategies import DDPStrategy
    from scale_ssl.trainer import Callback, Trainer
    from scale_ssl.trainer.seed import seed_everything

    class Stamps(Callback):
        def __init__(self):
            self.ends = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    seed_everything(0)
    model = SimCLR(**model_kwargs)
    stamps = Stamps()
    strategy = DDPStrategy(accelerator="cpu", sync_batchnorm=variant != "local_bn")
    trainer = Trainer(strategy=strategy, max_steps=args.warmup + args.steps, precision=precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=10_000, seed=0,
                      callbacks=[stamps])
    collate = _checked_collate if variant == "global_bn_checked" else None
    loader = torch.utils.data.DataLoader(_Paired(data), batch_size=args.global_batch // WORLD, shuffle=True,
                                         collate_fn=collate)
    trainer.fit(model, loader)
    assert trainer.loaders.batches_equal_by_construction == (variant != "global_bn_checked"), "the variant does not test what it says"
    return [b - a for a, b in zip(stamps.ends[args.warmup - 1 :], stamps.ends[args.warmup :])]


class _Paired(torch.utils.data.Dataset):
    """The views as ``((x1, x2), y)`` items, batched by torch's default collate."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x1, x2, y = self.data[i]
        return (x1, x2), y


def _check_alone(collective) -> float:
    """Median seconds of the per-step check's all-gather (as ``lockstep_batches`` issues it)."""
    pair = torch.tensor([[64, 100]], dtype=torch.long)
    times = []
    for _ in range(CHECK_CALLS):
        start = time.perf_counter()
        collective.all_gather(pair, grad=False).tolist()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, port: int, args, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    from omegaconf import OmegaConf

    from scale_ssl.config import load_config

    config = load_config(DEMO_CONFIG)
    model_kwargs = OmegaConf.to_container(config.model, resolve=True)
    precision = str(config.trainer.precision)
    data = _views(args.global_batch * (args.warmup + args.steps), seed=rank)
    runs = []
    for rotation in range(args.repeats):
        order = VARIANTS[rotation % len(VARIANTS):] + VARIANTS[: rotation % len(VARIANTS)]
        for variant in order:
            step_times = _run(variant, args, model_kwargs, precision, data)
            runs.append({"rotation": rotation, "variant": variant, "median_step_s": statistics.median(step_times)})
    from scale_ssl.collectives import TorchDistributedCollective

    check_s = _check_alone(TorchDistributedCollective())
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"runs": runs, "check_alone_s": check_s, "precision": precision}, handle)


def summarise(raw: dict, args) -> dict:
    by_rotation: dict[int, dict[str, float]] = {}
    for run in raw["runs"]:
        by_rotation.setdefault(run["rotation"], {})[run["variant"]] = run["median_step_s"]
    rotations = [r for r in by_rotation.values() if len(r) == len(VARIANTS)]

    def spread(values):
        return statistics.median(values), min(values), max(values)

    return {
        "global_over_local": spread([r["global_bn"] / r["local_bn"] for r in rotations]),
        "checked_over_unchecked": spread([r["global_bn_checked"] / r["global_bn"] for r in rotations]),
        "step_s": {v: statistics.median(r[v] for r in rotations) for v in VARIANTS},
        "check_alone_s": raw["check_alone_s"],
        "precision": raw["precision"],
        "rotations": len(rotations),
        "args": vars(args),
    }


def markdown(summary: dict, load_start, load_end) -> str:
    a = summary["args"]
    command = (f"python benchmarks/global_bn_cost.py --global-batch {a['global_batch']} --steps {a['steps']} "
               f"--warmup {a['warmup']} --repeats {a['repeats']}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    step = summary["step_s"]
    gl, ch = summary["global_over_local"], summary["checked_over_unchecked"]
    check_ms = 1000 * summary["check_alone_s"]
    return "\n".join([
        f"Measured {when} on {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}; load average (1/5/15 min) "
        f"{' / '.join(f'{x:.2f}' for x in load_start)} at the start, {' / '.join(f'{x:.2f}' for x in load_end)} at the "
        f"end. Command: `{command}`. Demo model and recipe, {summary['precision']}, global batch {a['global_batch']} = "
        f"{a['global_batch'] // WORLD} per rank x {WORLD} gloo ranks; {a['warmup']} warm-up step(s), then {a['steps']} "
        f"timed steps per run; {summary['rotations']} rotations.",
        "",
        "| comparison | wall step-time ratio: median (min-max) | median step s (first, second) |",
        "|---|---|---|",
        f"| global BN / local BN | {gl[0]:.3f} ({gl[1]:.3f}-{gl[2]:.3f}) | {step['global_bn']:.3f}, {step['local_bn']:.3f} |",
        f"| per-step batch check / none (global BN) | {ch[0]:.3f} ({ch[1]:.3f}-{ch[2]:.3f}) | "
        f"{step['global_bn_checked']:.3f}, {step['global_bn']:.3f} |",
        "",
        f"The per-step batch check alone (its all-gather of two int64 per rank, {CHECK_CALLS} calls): median "
        f"{check_ms:.3f} ms, {check_ms / (1000 * step['global_bn']):.3%} of a global-BN step here.",
        "",
    ])


def write_doc_region(text: str, path: str = DOC) -> None:
    doc = open(path).read()
    if f"<!-- {REGION}:begin -->" not in doc or f"<!-- {REGION}:end -->" not in doc:
        raise SystemExit(f"{path} has no <!-- {REGION}:begin --> ... end markers to replace")
    doc_region.write_doc_region(REGION, text, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-batch", type=int, default=256, help="the demo's 256 (128 per rank)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=5, help="rotations of the three variants")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--write-doc", action="store_true", help=f"rewrite the {REGION} table in docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.global_batch % WORLD:
        p.error(f"--warmup, --steps and --repeats must be >= 1 and --global-batch a multiple of {WORLD}")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "raw.json")
        mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=WORLD, join=True, start_method="spawn")
        with open(out) as handle:
            raw = json.load(handle)
    summary = summarise(raw, args)
    table = markdown(summary, load_start, os.getloadavg())
    print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    if args.write_doc:
        write_doc_region(table)
    return summary


if __name__ == "__main__":
    main()
