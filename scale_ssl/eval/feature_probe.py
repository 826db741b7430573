"""Linear probe on precomputed frozen features: the affordable form of the linear evaluation.

The linear evaluation protocol (SimCLR, arXiv:2002.05709, section 4) trains a linear classifier on
a frozen encoder. Without augmentation the encoder's output for each image never changes, so it is
computed once (``extract_features``) and the head trains on those rows: on a CPU that turns a probe
costing one encoder pass per sample per epoch into a few seconds of matrix products. The same head
then scores any fixed representation - a pretrained encoder, a random-init one, raw pixels - which
is what a baseline comparison needs.

Protocol (the quality benchmark's and the demo report's):

* standardise every feature dimension with the train split's mean and standard deviation
  (``x' = (x - mean_train) / max(std_train, 1e-6)``), so one learning rate means the same for every
  representation, whatever its scale;
* a linear head ``W x' + b`` with cross-entropy, SGD with momentum 0.9, learning rate ``lr``
  (default 0.5) under a cosine decay to 0, batch 256, ``epochs`` passes (default 10) over the train
  rows reshuffled each epoch by a seeded generator; no weight decay, no augmentation;
* top-1 / top-5 on the test rows.

The head is one ``nn.Linear`` on rows already in this process's memory, so it trains in a plain
loop (``torch.optim.SGD`` + :class:`WarmupCosineSchedule`, stepped per batch): through the
``Trainer`` the per-step bookkeeping (metric reduction, hooks) cost ~50 ms of CPU against
microseconds of arithmetic, minutes per probe on 2 cores. A fixed seed draws the head's initial
weights and the batch order, so two probes of the same features give the same figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.optim import WarmupCosineSchedule

PROBE_EPOCHS = 10
PROBE_BATCH_SIZE = 256
PROBE_LEARNING_RATE = 0.5


class _FeatureEpochs:
    """Shuffled ``(features, labels)`` batches of fixed rows; full batches only, reshuffled at
    every ``iter`` (one epoch) from its own seeded generator."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.features.shape[0] // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.features.shape[0], generator=self.generator)
        for i in range(len(self)):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.features[rows], self.labels[rows]


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits standardised with the train split's per-dimension mean and std (std floored at
    1e-6: a constant dimension, e.g. a border pixel, becomes 0 instead of dividing by zero)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def probe_features(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    epochs: int = PROBE_EPOCHS,
    batch_size: int = PROBE_BATCH_SIZE,
    learning_rate: float = PROBE_LEARNING_RATE,
    seed: int = 0,
) -> dict[str, float]:
    """Train the linear head on ``train = (features (N, D), labels (N,))`` and score it on
    ``test``; returns ``{"linear_top1", "linear_top5"}`` in [0, 1]."""
    (x, y), (tx, ty) = train, test
    for name, (f, l) in (("train", train), ("test", test)):
        if f.dim() != 2 or l.dim() != 1 or f.shape[0] != l.shape[0]:
            raise ValueError(f"probe_features: {name} must be (features (N, D), labels (N,)), got shapes "
                             f"{tuple(f.shape)} and {tuple(l.shape)}")  # fmt: skip
    if x.shape[1] != tx.shape[1]:
        raise ValueError(f"probe_features: train features have {x.shape[1]} dimensions, test {tx.shape[1]}; "
                         "extract both with the same encoder")  # fmt: skip
    if x.shape[0] < batch_size:
        raise ValueError(f"probe_features: {x.shape[0]} train rows are fewer than one batch of {batch_size}; "
                         "pass a smaller batch_size")  # fmt: skip
    if epochs < 1:
        raise ValueError(f"probe_features: epochs must be >= 1, got {epochs}")
    x, tx = standardise(x.float(), tx.float())
    y, ty = y.long(), ty.long()
    epochs_of_batches = _FeatureEpochs(x, y, batch_size, seed)
    # The head's initial weights come from the global generator: fix it so every representation
    # (and every rerun) starts from the same draw; keep the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9)
    schedule = WarmupCosineSchedule(optimizer, 0, epochs * len(epochs_of_batches), final_lr=0.0)
    # One thread: a (256 x D) @ (D x 10) product is microseconds of work, and splitting it over
    # threads costs more in synchronisation than it saves (measured 50x the CPU time with 2
    # threads on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            for features, labels in epochs_of_batches:
                loss = F.cross_entropy(head(features), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        with torch.no_grad():
            top = head(tx).topk(min(5, num_classes), dim=1).indices
    finally:
        torch.set_num_threads(threads)
    hits = top == ty[:, None]
    return {"linear_top1": hits[:, 0].float().mean().item(), "linear_top5": hits.any(dim=1).float().mean().item()}
