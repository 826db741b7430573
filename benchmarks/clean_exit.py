"""How often a finished multi-rank run exits cleanly: consecutive launches, every rank's exit code.

    .venv/bin/python benchmarks/clean_exit.py [--runs 50] [--shards data/fashion-mnist] [--write-doc]

Two kinds of launch, each ``--runs`` times in a row:

* ``torchrun``: ``torchrun --standalone --nproc_per_node 2 -m scale_ssl fit`` on the demo config
  with a short run (3 steps of a resnet10, batch 32, fp32, no progress bar) on the real
  Fashion-MNIST shards. torchrun's exit status is 0 only when every rank exited 0; a rank that
  aborts at interpreter shutdown ("terminate called without an active exception", SIGABRT) makes
  it non-zero, which on a cluster means a failed job and an elastic restart.
* ``script``: a user's script, spawned on 2 ranks by ``torch.multiprocessing`` with no teardown
  code of its own: ``Trainer(strategy=DDPStrategy()).fit(SimCLR, DataLoader(shuffle=True))`` and
  then the end of the script. Each process's exit code is read from the spawn context.

A launch counts as clean when every rank exited 0 and no rank's stderr holds "terminate called"
or "core dumped". The counts, and the first lines of any unclean launch's stderr, are printed; with
``--write-doc`` they replace the table between the ``clean_exit`` markers in docs/BENCHMARKS.md.
This is a reliability count, not a timing: load on the machine does not change what it measures,
only how long it takes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import doc_region  # noqa: E402

DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
SECTION = "## Clean exits of finished multi-rank runs"
UNCLEAN_MARKERS = ("terminate called", "core dumped")

USER_SCRIPT = r'''
import os, sys
import torch
from torch.utils.data import DataLoader, TensorDataset

def main(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from scale_ssl.methods import SimCLR
    from scale_ssl.strategies import DDPStrategy
    from scale_ssl.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(64, 1, 28, 28, generator=g), torch.randn(64, 1, 28, 28, generator=g)
    data = TensorDataset(x1, x2, torch.zeros(64, dtype=torch.long))
    loader = DataLoader(data, batch_size=8, shuffle=True, drop_last=True,
                        collate_fn=lambda rows: ((torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])),
                                                 torch.stack([r[2] for r in rows])))
    model = SimCLR(arch="resnet10", in_channels=1, first_conv=False, maxpool1=False, hidden_mlp=32, feat_dim=16)
    Trainer(strategy=DDPStrategy(accelerator="cpu"), max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False).fit(model, loader)
    # the script ends here: no destroy_process_group(), no os._exit()

if __name__ == "__main__":
    import torch.multiprocessing as mp
    port = int(sys.argv[1])
    context = mp.start_processes(main, args=(2, port), nprocs=2, join=False, start_method="spawn")
    while not context.join():
        pass
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_once(shards: str, root: str) -> tuple[bool, str]:
    argv = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
        "-m", "scale_ssl", "fit", "--config", "configs/simclr/fmnist_cpu.yaml",
        "trainer.max_steps=3", "trainer.global_batch_size=32", "trainer.precision=32",
        "trainer.enable_progress_bar=false", f"trainer.default_root_dir={root}", "tracking.enabled=false",
        f"data.train_shards={shards}/train", f"data.val_shards={shards}/test", "data.num_workers=0",
        "data.shuffle_buffer=64", "model.arch=resnet10", "model.hidden_mlp=64", "model.feat_dim=32",
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    clean = done.returncode == 0 and not any(m in done.stderr for m in UNCLEAN_MARKERS)
    return clean, f"exit {done.returncode}: " + done.stderr[-600:]


def script_once(script: str) -> tuple[bool, str]:
    # the spawn context raises ProcessExitedException when a rank exits non-zero (or by a signal)
    done = subprocess.run([sys.executable, script, str(free_port())], cwd=ROOT, capture_output=True, text=True)
    clean = done.returncode == 0 and not any(m in done.stderr for m in UNCLEAN_MARKERS)
    return clean, f"exit {done.returncode}: " + done.stderr[-600:]


def write_doc(rows: list[str]) -> None:
    doc_region.write_doc_region("clean_exit", "\n".join(rows), DOC, section=SECTION)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--shards", default="data/fashion-mnist")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "user_script.py")
        with open(script, "w") as handle:
            handle.write(USER_SCRIPT)
        for kind in ("torchrun", "script"):
            clean, failures, started = 0, [], time.monotonic()
            for i in range(args.runs):
                ok, detail = (torchrun_once(args.shards, os.path.join(tmp, f"run{i}")) if kind == "torchrun"
                              else script_once(script))
                clean += ok
                if not ok:
                    failures.append(detail)
                print(f"{kind} {i + 1}/{args.runs}: {'clean' if ok else 'UNCLEAN'}", flush=True)
            results[kind] = (clean, failures, time.monotonic() - started)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    rows = [f"Measured {stamp}, torch {torch.__version__}, 2 gloo ranks on CPU, {args.runs} consecutive launches each.", "",
            "| launch | clean (every rank exit 0, no abort message) | unclean |", "|---|---|---|"]
    labels = {"torchrun": "`torchrun --nproc_per_node 2 -m scale_ssl fit` (3 steps)",
              "script": "user script: `Trainer(strategy=DDPStrategy()).fit(...)`, no teardown (spawned ranks)"}
    for kind, (clean, failures, _) in results.items():
        rows.append(f"| {labels[kind]} | {clean} / {args.runs} | {len(failures)} |")
    for kind, (_, failures, _) in results.items():
        for detail in failures[:3]:
            print(f"--- unclean {kind} launch ---\n{detail}")
    print("\n".join(rows))
    if args.write_doc:
        write_doc(rows)
    return 0 if all(not f for _, f, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
