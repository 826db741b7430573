"""Tiny modules for the reliability tests: what is tested is the loop's behaviour under faults."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from scale_ssl.trainer import SSLModule


def regression_batches(n_batches: int = 8, batch: int = 8, seed: int = 0, rank: int = 0) -> list:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    w = torch.arange(5, dtype=torch.float32).reshape(5, 1)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 5, generator=g)
        out.append((x, x @ w))
    return out


class FaultyRegressor(SSLModule):
    """y = Wx + b with an MSE loss, and a fault injected at chosen batches on a chosen rank:
    ``"nan"`` (the loss becomes NaN), ``"stall"`` (sleeps far past the collective timeout),
    ``"exit"`` (the process dies)."""

    def __init__(self, fault: str | None = None, fault_rank: int = 1, fault_batches: tuple = ()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fault, self.fault_rank, self.fault_batches = fault, fault_rank, tuple(fault_batches)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.trainer.global_rank == self.fault_rank and batch_idx in self.fault_batches:
            if self.fault == "nan":
                loss = loss * float("nan")
            elif self.fault == "stall":
                time.sleep(600)
            elif self.fault == "exit":
                os._exit(3)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
