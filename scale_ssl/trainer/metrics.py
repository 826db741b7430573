"""What ``self.log`` records, kept on the device until the trainer fetches it.

Per step the latest value of each name is kept (``on_step``); per epoch a batch-size-weighted
running sum (``on_epoch``; the batch size is the step's unless ``self.log(batch_size=...)`` says
otherwise), averaged when the epoch ends. With ``sync_dist`` the epoch average is exact over
ranks: the weighted sums and the sample counts are each summed over ranks before dividing, so
ranks holding different numbers of evaluation samples (the trainer's unpadded evaluation split)
count every sample once. Defaults follow Lightning: in training
``on_step=True, on_epoch=False``; in validation and test ``on_step=False, on_epoch=True``.
Nothing here calls ``.item()``: the trainer reduces (``sync_dist``: mean over ranks) and fetches
values only at logging intervals and epoch ends, when every rank is at the same point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogOptions:
    prog_bar: bool = False
    logger: bool = True
    on_step: bool = True
    on_epoch: bool = False
    sync_dist: bool = False


class LoggedMetrics:
    def __init__(self) -> None:
        self.step: dict[str, tuple[torch.Tensor, LogOptions]] = {}
        self.epoch: dict[str, list] = {}  # name -> [weighted sum, total weight, options]

    def add(self, name: str, value: torch.Tensor, options: LogOptions, batch_size: int) -> None:
        value = value.detach()
        if options.on_step:
            self.step[name] = (value, options)
        if options.on_epoch:
            weighted = value.float() * batch_size
            if name in self.epoch:
                entry = self.epoch[name]
                entry[0] = entry[0] + weighted
                entry[1] += batch_size
            else:
                self.epoch[name] = [weighted, batch_size, options]

    def pop_step(self) -> dict[str, tuple[torch.Tensor, LogOptions]]:
        out, self.step = self.step, {}
        return out

    def pop_epoch(self) -> dict[str, tuple[torch.Tensor, float, LogOptions]]:
        """name -> (batch-size-weighted sum, total weight, options) of the epoch so far."""
        out = {name: (total, float(weight), options) for name, (total, weight, options) in self.epoch.items()}
        self.epoch = {}
        return out

    def clear(self) -> None:
        self.step, self.epoch = {}, {}


def reduce_epoch_and_fetch(entries: dict[str, tuple[torch.Tensor, float, LogOptions]], strategy) -> dict[str, float]:
    """Epoch averages as host floats. ``sync_dist`` entries: sum over ranks of the weighted sums
    divided by the sum over ranks of the weights (one all-reduce of both), the exact mean over
    every rank's samples; the others: this rank's own mean."""
    names = sorted(entries)
    out: dict[str, float] = {}
    synced = [n for n in names if entries[n][2].sync_dist]
    if synced and strategy.world_size > 1:
        totals = [entries[n][0].float().reshape(-1).mean() for n in synced]
        weights = [torch.tensor(entries[n][1], dtype=torch.float32, device=totals[0].device) for n in synced]
        summed = strategy.reduce(torch.stack(totals + weights), op="sum").tolist()
        for i, name in enumerate(synced):
            out[name] = summed[i] / max(summed[len(synced) + i], 1e-12)
    for name in names:
        if name not in out:
            total, weight, _ = entries[name]
            out[name] = float(total.float().mean()) / max(weight, 1e-12)
    return out


def reduce_and_fetch(values: dict[str, tuple[torch.Tensor, LogOptions]], strategy) -> dict[str, float]:
    """Mean over ranks for ``sync_dist`` entries (one stacked all-reduce), then host floats."""
    names = sorted(values)
    out: dict[str, float] = {}
    synced = [n for n in names if values[n][1].sync_dist]
    if synced and strategy.world_size > 1:
        stacked = torch.stack([values[n][0].float().reshape(-1).mean() for n in synced])
        for name, value in zip(synced, strategy.reduce(stacked, op="mean").tolist()):
            out[name] = value
    for name in names:
        if name not in out:
            out[name] = float(values[name][0].float().mean())
    return out
