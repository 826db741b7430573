"""Entry point of the multi-device XLA:CPU tests: ``python -m tests.xla._replicas SCENARIO IN OUT``.

Runs in its own process (the parent applies a hard timeout, so a hang in a rendezvous is a test
failure, never a stuck CI job). It installs the test-only sync shim, starts one replica per
``CPU_NUM_DEVICES`` device with ``launch_xla``, and each replica writes what it computed to
``OUT/rank{r}.pt``. The parent compares those files with a plain-CPU reference.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

from tests.xla import sync_shim


def _save(out_dir: str, rank: int, record: dict) -> None:
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().clone()


def scenario_nt_xent(strategy, data: dict) -> dict:
    """Global NT-Xent of a small network on this replica's slice; gradients after the strategy's
    reduction; the loss graph's hash (must be the same program on every replica)."""
    import torch_xla
    import torch_xla.debug.metrics as met

    from scale_ssl.losses import NTXentLoss
    from tests.xla.models import TinyEncoderHead

    rank, world = strategy.global_rank, strategy.world_size
    model = TinyEncoderHead()
    model.load_state_dict(data["state"])
    model = strategy.setup_module(model)
    x1, x2 = data["x1"], data["x2"]
    b = x1.shape[0] // world
    device = strategy.root_device
    x1, x2 = x1[rank * b:(rank + 1) * b].to(device), x2[rank * b:(rank + 1) * b].to(device)
    loss = NTXentLoss(0.5, collective=strategy.collective)(model(x1), model(x2))
    graph_hash = torch_xla._XLAC._get_graph_hash([loss])
    strategy.backward(loss)
    torch_xla.sync()
    mean_loss = strategy.reduce(loss.detach(), op="mean")
    return {
        "loss": _cpu(loss), "mean_loss": _cpu(mean_loss), "graph_hash": graph_hash,
        "grads": {n: _cpu(p.grad) for n, p in model.named_parameters()},
        "compiles": met.counter_value("UncachedCompile"),
    }


def scenario_sinkhorn(strategy, data: dict) -> dict:
    import torch_xla

    from scale_ssl.losses.sinkhorn import distributed_sinkhorn

    rank, world = strategy.global_rank, strategy.world_size
    scores = data["scores"]
    b = scores.shape[0] // world
    q = distributed_sinkhorn(scores[rank * b:(rank + 1) * b].to(strategy.root_device), iterations=3,
                             epsilon=0.05, collective=strategy.collective)
    torch_xla.sync()
    return {"q": _cpu(q)}


def scenario_trainer(strategy, data: dict) -> dict:
    """SimCLR (global BN) through the whole Trainer for a few steps on this replica's slices."""
    import torch_xla.debug.metrics as met

    from scale_ssl.methods import SimCLR
    from scale_ssl.trainer import Callback, Trainer

    rank, world = strategy.global_rank, strategy.world_size
    model = SimCLR(**data["hparams"])
    model.load_state_dict(data["state"])
    b = data["batches"][0][0][0].shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    batches = [((x1[sl], x2[sl]), y[sl]) for (x1, x2), y in data["batches"]]

    class Record(Callback):
        def __init__(self):
            self.states, self.compiles, self.graph_hashes = [], [], []

        def on_before_optimizer_step(self, trainer, module, optimizer):
            # The traced step up to here (forward, global BatchNorm, loss, backward, gradient
            # all-reduce) as XLA will compile it: one program for every replica or they never meet.
            import torch_xla

            grads = [p.grad for p in module.parameters() if p.grad is not None]
            self.graph_hashes.append(torch_xla._XLAC._get_graph_hash(grads))

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            # Before step k: everything steps 1..k-1 ran, their metric reductions included.
            self.compiles.append(met.counter_value("UncachedCompile") or 0)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.states.append({k: _cpu(v) for k, v in module.state_dict().items()})

    record = Record()
    trainer = Trainer(strategy=strategy, max_steps=len(batches), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, log_every_n_steps=1, callbacks=[record])
    trainer.fit(model, batches)
    record.compiles.append(met.counter_value("UncachedCompile") or 0)
    return {"states": record.states, "compiles": record.compiles, "graph_hashes": record.graph_hashes,
            "losses": [h["train/loss"] for h in trainer.history if "train/loss" in h]}


def scenario_trainer_tiny(strategy, data: dict) -> dict:
    """The BN-free tiny contrastive module through the whole Trainer on this replica's slices."""
    import torch_xla.debug.metrics as met

    from scale_ssl.trainer import Trainer
    from tests.xla.models import TinyContrastiveModule

    rank, world = strategy.global_rank, strategy.world_size
    model = TinyContrastiveModule()
    model.load_state_dict(data["state"])
    b = data["batches"][0][0][0].shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    batches = [((x1[sl], x2[sl]), y[sl]) for (x1, x2), y in data["batches"]]
    trainer = Trainer(strategy=strategy, max_steps=len(batches), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, log_every_n_steps=1, on_nonfinite_loss=data.get("on_nonfinite_loss", "stop"))
    trainer.fit(model, batches)
    return {"state": {k: _cpu(v) for k, v in model.state_dict().items()},
            "losses": [h["train/loss"] for h in trainer.history if "train/loss" in h],
            "compiles": met.counter_value("UncachedCompile") or 0}


def scenario_moco_shuffle_bn(strategy, data: dict) -> dict:
    """MoCo's key encoder with shuffle-BN (per-device BatchNorm on a shuffled shard of the global
    key batch) on this replica's slice: the keys it returns, the permutation it received from
    replica 0, and the keys' graph hash (must be the same program on every replica)."""
    import torch_xla

    from scale_ssl.methods import MoCoV2
    from scale_ssl.trainer import Trainer

    rank, world = strategy.global_rank, strategy.world_size
    model = MoCoV2(**data["hparams"])
    model.load_state_dict(data["state"])
    model = strategy.setup_module(model)
    # The module reaches its collective through its trainer, as in training; nothing is fitted.
    model.trainer = Trainer(strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model.train()
    collective, received = strategy.collective, []
    broadcast = collective.broadcast

    def observed_broadcast(tensor, src=0):  # the real broadcast; the test only keeps what it returned
        out = broadcast(tensor, src)
        received.append(out)
        return out

    collective.broadcast = observed_broadcast
    b = data["x"].shape[0] // world
    keys = model._keys(data["x"][rank * b:(rank + 1) * b].to(strategy.root_device))
    graph_hash = torch_xla._XLAC._get_graph_hash([keys])
    torch_xla.sync()
    return {"keys": _cpu(keys), "order": _cpu(received[0]), "graph_hash": graph_hash}


def scenario_recipe(strategy, data: dict) -> dict:
    """Cells of the real-recipe matrix (tests/xla/recipe_matrix.py): each method of ``data["jobs"]``
    trains its steps through the Trainer on this replica's half of every global batch, each with a
    strategy of its own."""
    from scale_ssl.strategies import XLAStrategy
    from tests.xla import recipe_matrix

    strategies = iter([strategy])

    def next_strategy():
        fresh = next(strategies, None)
        if fresh is None:
            fresh = XLAStrategy(sync_batchnorm=data.get("sync_batchnorm", False))
            fresh.setup_environment()
        return fresh

    return {"cells": recipe_matrix.run_replica_cells(next_strategy, data["jobs"])}


def scenario_dino_loss(strategy, data: dict) -> dict:
    """DINO's loss over ``strategy.collective`` for a few SGD steps of a small student on this
    replica's rows: per step the local loss, the global mean, the reduced gradients and the center."""
    import torch_xla

    from scale_ssl.losses import DINOLoss

    rank, world = strategy.global_rank, strategy.world_size
    device = strategy.root_device
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, data["out_dim"]))
    model.load_state_dict(data["state"])
    model = strategy.setup_module(model)
    loss_fn = DINOLoss(data["out_dim"], data["global_crops"], collective=strategy.collective).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for inputs, teacher in data["steps"]:
        b = inputs.shape[1] // world
        rows = slice(rank * b, (rank + 1) * b)  # sliced on the host: the rank never enters the graph
        student = model(inputs[:, rows].reshape(-1, inputs.shape[-1]).to(device))
        loss = loss_fn(student, teacher[:, rows].reshape(-1, teacher.shape[-1]).to(device), 0.04)
        strategy.backward(loss)
        mean_loss = strategy.reduce(loss.detach(), op="mean")
        torch_xla.sync()
        steps.append({"loss": _cpu(loss), "mean_loss": _cpu(mean_loss), "center": _cpu(loss_fn.center),
                      "grads": {n: _cpu(p.grad) for n, p in model.named_parameters()}})
        optimizer.step()
        optimizer.zero_grad()
        torch_xla.sync()
    return {"steps": steps}


SCENARIOS = {"nt_xent": scenario_nt_xent, "sinkhorn": scenario_sinkhorn, "trainer": scenario_trainer,
             "trainer_tiny": scenario_trainer_tiny, "moco_shuffle_bn": scenario_moco_shuffle_bn,
             "recipe": scenario_recipe, "dino_loss": scenario_dino_loss}


def replica(scenario: str, in_path: str, out_dir: str) -> None:
    from scale_ssl.strategies import XLAStrategy

    # torch_xla.launch runs this in a fresh (spawned) process: install the shim here, in the
    # replica, not only in the launching process.
    sync_shim.install()
    rank = -1
    try:
        data = torch.load(in_path, weights_only=False)
        strategy = XLAStrategy(sync_batchnorm=data.get("sync_batchnorm", False))
        strategy.setup_environment()
        rank = strategy.global_rank
        result = SCENARIOS[scenario](strategy, data)
        _save(out_dir, rank, {"ok": True, "rank": rank, "world": strategy.world_size, **result})
    except BaseException:
        _save(out_dir, rank if rank >= 0 else 999, {"ok": False, "error": traceback.format_exc()})
        raise


def main() -> None:
    scenario, in_path, out_dir = sys.argv[1:4]
    torch.set_num_threads(1)
    from scale_ssl.strategies import launch_xla

    launch_xla(replica, scenario, in_path, out_dir)


if __name__ == "__main__":
    main()
