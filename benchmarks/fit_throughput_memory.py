"""Whole-fit figures of issue #12: is the input pipeline the bottleneck, peak memory per method and
precision, and what ``trainer.compile`` costs and gains.

    .venv/bin/python benchmarks/fit_throughput_memory.py [--suites pipeline memory compile]
        [--batch 64] [--steps 6] [--warmup 2] [--repeats 3] [--write-doc]

Every run is ``scale_ssl.Trainer(strategy="single").fit`` in its own fresh process (so peak RSS
is that run's alone), with the model of ``configs/<method>/fmnist_cpu.yaml`` (ResNet-10, 7x7/2
stem, no max-pool, 28 px grayscale), logger/checkpoints/progress bar off, ``cores`` torch threads.
Step times are the gaps between consecutive end-of-batch stamps after ``warmup`` steps. Runs
that are compared are run side by side in rotation (A B A B ...), the ratio is taken per
rotation, and the tables give its median and min-max over rotations, never a lone time.

Suites:

* ``pipeline``: SimCLR, fp32. **stream**: the real ``ShardedImageStream`` over Fashion-MNIST tar
  shards (decode + SimCLR's two augmented views per image, per batch) with 0 / 1 / 2 DataLoader
  workers; **memory**: the same number of batches made by that stream beforehand, served from
  memory by a ``DataLoader`` with the same worker count (no decode, no augmentation). Ratio:
  images/s stream / memory per worker count; 1.0 means the pipeline costs nothing.
* ``memory``: SimCLR, SwAV, BYOL, MoCo, SimSiam with their fmnist_cpu models and own views (the
  real stream, 0 workers, so everything is in the measured process), fp32 and bf16-mixed, batch
  ``--batch``: peak RSS (``ru_maxrss``) of the process, and step-time and peak-RSS ratios
  bf16-mixed / fp32 per method.
* ``compile``: SimCLR, fp32, batches from memory, ``compile_model`` False vs True, each with a
  fresh empty inductor cache (a cold start, as a new job has): start-up cost = time from
  ``fit()`` to the end of the first batch, compiled minus eager; steady-state step-time ratio
  compiled / eager.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from trainer_overhead import _facts, _load_text, write_doc_region  # noqa: E402  (its ## Performance section)

METHODS = ("simclr", "swav", "byol", "moco", "simsiam")
WORKERS = (0, 1, 2)
FMNIST_RAW = "/usr/share/datasets/fashion-mnist"
DEFAULT_SHARDS = os.path.join(ROOT, "data", "fashion-mnist", "train")


# ---------------------------------------------------------------------------------------------
# worker: one fit in this process
# ---------------------------------------------------------------------------------------------
class _Batches:
    """A map-style dataset of whole pre-made batches (``DataLoader(batch_size=None)`` serves them)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _config(method: str, shards: str, workers: int):
    from scale_ssl.config import load_config

    return load_config(os.path.join(ROOT, "configs", method, "fmnist_cpu.yaml"),
                       [f"data.train_shards={shards}", f"data.num_workers={workers}", "trainer.strategy=single"])


def _stream(config, method: str, batch: int, workers: int):
    from scale_ssl.data import ShardedImageStream
    from scale_ssl.methods import METHODS as CLASSES

    d = config.data
    return ShardedImageStream(d.train_shards, batch_size=batch, transform=CLASSES[method].train_transform(d), rank=0,
                              world_size=1, num_workers=workers, seed=0, shuffle_buffer=d.shuffle_buffer, mode="exact")


def _memory_loader(config, method: str, batch: int, workers: int, count: int):
    from torch.utils.data import DataLoader

    made = list(itertools.islice(iter(_stream(config, method, batch, 0)), count))
    return DataLoader(_Batches(made), batch_size=None, shuffle=False, num_workers=workers)


def _vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(args) -> None:
    import torch
    from omegaconf import OmegaConf

    from scale_ssl.methods import METHODS as CLASSES
    from scale_ssl.trainer import Callback, Trainer
    from scale_ssl.trainer.seed import seed_everything

    torch.set_num_threads(os.cpu_count() or 1)
    config = _config(args.method, args.shards, args.workers)
    total = args.warmup + args.steps
    if args.source == "stream":
        loader = _stream(config, args.method, args.batch, args.workers)
    else:
        loader = _memory_loader(config, args.method, args.batch, args.workers, total)
    seed_everything(0)
    module = CLASSES[args.method](**OmegaConf.to_container(config.model, resolve=True))

    class Stamp(Callback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    stamp = Stamp()
    trainer = Trainer(strategy="single", max_steps=total, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                      log_every_n_steps=10**6, seed=0, callbacks=[stamp], compile_model=args.compile,
                      default_root_dir=tempfile.mkdtemp(prefix="bench_fit_"))
    rss_before = _vm_rss_mb()
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    ends = stamp.ends[args.warmup - 1:]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    result = {"steps_s": steps, "median_step_s": statistics.median(steps), "first_batch_s": stamp.ends[0] - start,
              "images_per_s": args.batch * len(steps) / (ends[-1] - ends[0]),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "rss_before_fit_mb": rss_before, "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
              "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _launch(args, **run) -> dict:
    out = tempfile.mktemp(prefix="bench_fit_", suffix=".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--shards", args.shards,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--method", run.get("method", "simclr"), "--source", run.get("source", "memory"),
           "--workers", str(run.get("workers", 0)), "--precision", run.get("precision", "32")]
    if run.get("compile"):
        cmd.append("--compile")
    cache = tempfile.mkdtemp(prefix="bench_inductor_")  # a cold compile every run
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHINDUCTOR_CACHE_DIR=cache)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    result["load_1min"] = os.getloadavg()[0]
    print(f"  {run}: median step {result['median_step_s']:.3f} s, {result['images_per_s']:.0f} img/s, first batch "
          f"{result['first_batch_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB, load {result['load_1min']:.2f}",
          flush=True)
    return result


def _spread(values):
    return [statistics.median(values), min(values), max(values)]


def _rotate(args, runs: dict) -> dict:
    """Every named run once per rotation, ``repeats`` rotations; results per name, in order."""
    results = {name: [] for name in runs}
    for rep in range(args.repeats):
        print(f"rotation {rep + 1}/{args.repeats}", flush=True)
        for name, run in runs.items():
            results[name].append(_launch(args, **run))
    return results


def suite_pipeline(args) -> dict:
    runs = {f"{source}/{w}": {"source": source, "workers": w} for w in WORKERS for source in ("stream", "memory")}
    res = _rotate(args, runs)
    rows = []
    for w in WORKERS:
        s, m = res[f"stream/{w}"], res[f"memory/{w}"]
        rows.append({"workers": w, "ratio": _spread([a["images_per_s"] / b["images_per_s"] for a, b in zip(s, m)]),
                     "stream_img_s": _spread([a["images_per_s"] for a in s]),
                     "memory_img_s": _spread([b["images_per_s"] for b in m]),
                     "load": _spread([r["load_1min"] for r in s + m])})
    return {"rows": rows}


def suite_memory(args) -> dict:
    runs = {f"{m}/{p}": {"method": m, "precision": p} for m in METHODS for p in ("32", "bf16-mixed")}
    res = _rotate(args, runs)
    rows = []
    for m in METHODS:
        fp32, bf16 = res[f"{m}/32"], res[f"{m}/bf16-mixed"]
        rows.append({"method": m, "fp32_rss": _spread([r["peak_rss_mb"] for r in fp32]),
                     "bf16_rss": _spread([r["peak_rss_mb"] for r in bf16]),
                     "before_fit": _spread([r["rss_before_fit_mb"] for r in fp32]),
                     "rss_ratio": _spread([b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(fp32, bf16)]),
                     "step_ratio": _spread([b["median_step_s"] / a["median_step_s"] for a, b in zip(fp32, bf16)]),
                     "fp32_step": _spread([r["median_step_s"] for r in fp32]),
                     "load": _spread([r["load_1min"] for r in fp32 + bf16])})
    return {"rows": rows}


def suite_compile(args) -> dict:
    res = _rotate(args, {"eager": {"compile": False}, "compiled": {"compile": True}})
    eager, compiled = res["eager"], res["compiled"]
    return {"startup_extra_s": _spread([c["first_batch_s"] - e["first_batch_s"] for e, c in zip(eager, compiled)]),
            "first_batch_s": {"eager": _spread([e["first_batch_s"] for e in eager]),
                              "compiled": _spread([c["first_batch_s"] for c in compiled])},
            "step_ratio": _spread([c["median_step_s"] / e["median_step_s"] for e, c in zip(eager, compiled)]),
            "step_s": {"eager": _spread([e["median_step_s"] for e in eager]),
                       "compiled": _spread([c["median_step_s"] for c in compiled])},
            "rss_ratio": _spread([c["peak_rss_mb"] / e["peak_rss_mb"] for e, c in zip(eager, compiled)]),
            "loss": {"eager": [e["loss"] for e in eager], "compiled": [c["loss"] for c in compiled]},
            "load": _spread([r["load_1min"] for r in eager + compiled])}


def _s(spread, fmt="{:.3f}") -> str:
    return f"{fmt.format(spread[0])} ({fmt.format(spread[1])}-{fmt.format(spread[2])})"


def _header(facts: dict, args, command: str) -> str:
    return (f"Measured {facts['date']} on {facts['cores']} cores ({facts['cpu']}), Python {facts['python']}, torch "
            f"{facts['torch']}; load average (1/5/15 min) {facts['load_start']} at the start, {facts['load_end']} at "
            f"the end. Command: `{command}`. Batch {args.batch}, {args.warmup} warm-up step(s) then {args.steps} timed "
            f"steps per run, {args.repeats} rotations; every run a fresh process with {facts['cores']} torch threads.")


def markdown_pipeline(summary: dict, header: str) -> str:
    lines = [header, "", "| DataLoader workers | images/s ratio stream / memory: median (min-max) | stream images/s | "
             "memory images/s | load 1-min median (min-max) |", "|---:|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['workers']} | {_s(r['ratio'])} | {_s(r['stream_img_s'], '{:.0f}')} | "
                     f"{_s(r['memory_img_s'], '{:.0f}')} | {_s(r['load'], '{:.2f}')} |")
    return "\n".join(lines)


def markdown_memory(summary: dict, header: str) -> str:
    lines = [header, "", "| method | peak RSS fp32, MB | peak RSS bf16-mixed, MB | RSS ratio bf16 / fp32 | step-time "
             "ratio bf16 / fp32 | fp32 step s | RSS before fit (model + stream), MB |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['method']} | {_s(r['fp32_rss'], '{:.0f}')} | {_s(r['bf16_rss'], '{:.0f}')} | "
                     f"{_s(r['rss_ratio'])} | {_s(r['step_ratio'])} | {_s(r['fp32_step'])} | "
                     f"{_s(r['before_fit'], '{:.0f}')} |")
    return "\n".join(lines)


def markdown_compile(s: dict, header: str) -> str:
    return "\n".join([
        header, "",
        "| quantity | median (min-max) |", "|---|---|",
        f"| start-up cost: first batch done, compiled minus eager, s | {_s(s['startup_extra_s'], '{:.1f}')} |",
        f"| first batch done after fit(), eager / compiled, s | {_s(s['first_batch_s']['eager'], '{:.1f}')} / "
        f"{_s(s['first_batch_s']['compiled'], '{:.1f}')} |",
        f"| steady step-time ratio compiled / eager | {_s(s['step_ratio'])} |",
        f"| steady step s, eager / compiled | {_s(s['step_s']['eager'])} / {_s(s['step_s']['compiled'])} |",
        f"| peak RSS ratio compiled / eager | {_s(s['rss_ratio'])} |",
        f"| load 1-min | {_s(s['load'], '{:.2f}')} |"])


def _ensure_shards(args) -> None:
    if os.path.isdir(args.shards) and os.listdir(args.shards):
        return
    from scale_ssl.data import make_fashion_mnist_shards

    out = os.path.join(tempfile.mkdtemp(prefix="bench_shards_"), "fashion-mnist")
    print(f"{args.shards} is empty: writing Fashion-MNIST shards from {FMNIST_RAW} to {out}", flush=True)
    make_fashion_mnist_shards(out, shard_size=5000, root=FMNIST_RAW)
    args.shards = os.path.join(out, "train")


SUITES = {"pipeline": (suite_pipeline, markdown_pipeline, "fit_pipeline"),
          "memory": (suite_memory, markdown_memory, "fit_memory"),
          "compile": (suite_compile, markdown_compile, "fit_compile")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (>= 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="rotations")
    p.add_argument("--shards", default=DEFAULT_SHARDS, help="Fashion-MNIST train shards (written to a temp dir if absent)")
    p.add_argument("--json", help="write the summaries here")
    p.add_argument("--write-doc", action="store_true", help="rewrite this benchmark's tables in docs/BENCHMARKS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--method", default="simclr", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--source", default="memory", choices=("stream", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="32", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.worker:
        return worker(args)
    command = "python benchmarks/fit_throughput_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    _ensure_shards(args)
    saved = {"args": vars(args), "suites": {}}
    for name in args.suites:
        measure, render, region = SUITES[name]
        facts = _facts()
        print(f"== {name}", flush=True)
        summary = measure(args)
        facts["load_end"] = _load_text()
        table = render(summary, _header(facts, args, command))
        print(table, flush=True)
        saved["suites"][name] = {"facts": facts, "summary": summary}
        if args.write_doc:
            write_doc_region(region, table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
