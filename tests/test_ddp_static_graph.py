"""``trainer.static_graph``: DDP with ``static_graph=True`` takes the same steps as without it on
real gloo ranks, the flag reaches DistributedDataParallel, and the config refuses it off DDP."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from scale_ssl.cli.assembly import build_strategy_from_config
from scale_ssl.config import ConfigError, load_config
from scale_ssl.methods import SimCLR
from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything
from tests.distributed import run_on_ranks

GLOBAL_BATCH = 8
# Two steps: static_graph only changes DDP's bookkeeping from the second iteration on (the first
# one records the graph). The same reductions of the same gradients in the same ranks: the two
# runs may differ only by fp32 round-off of a re-bucketed all-reduce.
STEPS = 2
REL_TOL = 1e-6


def make_simclr() -> SimCLR:
    seed_everything(3)
    return SimCLR(arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=32, feat_dim=16,
                  temperature=0.5, optimizer="sgd", learning_rate=0.1, weight_decay=0.0, warmup_steps=0)


def _fit(rank, world, static_graph):
    g = torch.Generator().manual_seed(9)
    batches = []
    for _ in range(STEPS):
        x1 = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g)
        x2 = x1 + 0.5 * torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g)
        sl = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        batches.append(((x1[sl], x2[sl]), torch.zeros(GLOBAL_BATCH // world, dtype=torch.long)))
    model = make_simclr()
    wrapper = SeeWrapper()
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu", static_graph=static_graph), max_steps=STEPS,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
                      callbacks=[wrapper])
    trainer.fit(model, batches)
    assert wrapper.is_ddp
    return ({k: v.clone() for k, v in model.state_dict().items()}, wrapper.static_graph,
            float(trainer.callback_metrics["train/loss"]))


class SeeWrapper(Callback):
    """Looks at the training wrapper while fit runs (it is dropped when fit ends)."""

    def on_train_end(self, trainer, module):
        self.is_ddp = isinstance(trainer.wrapped, DistributedDataParallel)
        self.static_graph = bool(trainer.wrapped.static_graph)


@pytest.mark.timeout(240)
def test_static_graph_ddp_takes_the_same_steps_as_default_ddp():
    default = run_on_ranks(_fit, 2, False)
    static = run_on_ranks(_fit, 2, True)
    start = make_simclr().state_dict()
    for (state, flag, loss), (ref, ref_flag, ref_loss) in zip(static, default):
        assert flag is True and ref_flag is False
        assert loss == pytest.approx(ref_loss, rel=REL_TOL)
        for k, v in ref.items():
            if v.is_floating_point():
                scale = max((v - start[k]).abs().max().item(), 1e-12)
                assert (state[k] - v).abs().max().item() <= REL_TOL * scale + 1e-7, k


def test_static_graph_config_reaches_ddp_and_is_refused_elsewhere():
    config = load_config("configs/simclr/fmnist_cpu.yaml", ["trainer.static_graph=true"])
    assert build_strategy_from_config(config).static_graph is True
    assert build_strategy_from_config(load_config("configs/simclr/fmnist_cpu.yaml")).static_graph is False
    with pytest.raises(ConfigError, match="trainer.static_graph=true is a DDP option"):
        build_strategy_from_config(load_config("configs/simclr/fmnist_cpu.yaml",
                                               ["trainer.static_graph=true", "trainer.strategy=single"]))
