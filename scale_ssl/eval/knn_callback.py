"""``KNNEvaluatorCallback``: weighted-kNN top-1 of the encoder every N epochs of pretraining.

On every rank: extract features of this rank's share of the train split (the bank shard, kept
local) and of the test split (gathered, so every rank holds all test rows), then score with the
sharded-bank kNN of :mod:`scale_ssl.eval.sharded_knn`. Every rank computes the same ``knn_top1``,
which is published with ``trainer.log_metrics`` (rank zero writes it to MLflow). At the end of the
fit the accuracy curve and a PCA scatter of the last test embeddings are logged as artifacts.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from scale_ssl.probes.eval_split import EvalSplit, rank_features
from scale_ssl.probes.plots import log_accuracy_curves, log_embedding_scatter
from scale_ssl.eval.sharded_knn import gather_rank_rows, sharded_knn_accuracy
from scale_ssl.trainer.callback import Callback


def knn_accuracy_on_splits(
    encoder,
    bank: EvalSplit,
    test: EvalSplit,
    *,
    rank: int = 0,
    world_size: int = 1,
    collective=None,
    device: torch.device | str = "cpu",
    k: int = 200,
    temperature: float = 0.1,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """kNN top-1 of ``encoder`` with ``bank``'s rows as the labelled bank (sharded over ranks) and
    ``test``'s rows scored. Returns ``(accuracy, test_features, test_labels)``, the same on every
    rank; all ranks must call it together."""
    device = torch.device(device)
    num_classes = len(bank.classes)
    bank_features, bank_labels = rank_features(encoder, bank.batches(rank, world_size), device, collective, autocast)
    test_features, test_labels = rank_features(encoder, test.batches(rank, world_size), device, collective, autocast)
    test_features, test_labels = gather_rank_rows(test_features, test_labels, test.rows_per_rank(world_size), collective)
    accuracy = sharded_knn_accuracy(test_features, test_labels, bank_features, bank_labels, num_classes,
                                    k=k, temperature=temperature, collective=collective)  # fmt: skip
    return accuracy, test_features, test_labels


class KNNEvaluatorCallback(Callback):
    """Log ``knn_top1`` (weighted kNN, cosine, ``k``, ``temperature``) every ``every_n_epochs``
    epochs, and once more at the end of training if the last evaluation was at another step.

    Args:
        train_source / test_source: shard sets (paths, remote locations or ``ShardIndex``) of the
            bank and of the scored split.
        transform: the deterministic evaluation view (``EvalTransform``).
        encoder_attr: the module attribute holding the pretrained encoder (pooled features).
        cache: keep this rank's decoded images in memory between evaluations.
        log_plots: at the end of the fit log ``plots/knn_top1.png`` and ``plots/test_embedding_pca.png``.
    """

    def __init__(
        self,
        train_source: str | os.PathLike | Any,
        test_source: str | os.PathLike | Any,
        transform,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.1,
        batch_size: int = 512,
        encoder_attr: str = "encoder",
        cache: bool = True,
        log_plots: bool = True,
        metric_name: str = "knn_top1",
    ):
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"KNNEvaluatorCallback: every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"KNNEvaluatorCallback: k must be an int >= 1, got {k!r}")
        if not temperature > 0:
            raise ValueError(f"KNNEvaluatorCallback: temperature must be > 0, got {temperature!r}")
        self.bank = EvalSplit(train_source, transform, batch_size, cache)
        self.test = EvalSplit(test_source, transform, batch_size, cache)
        if self.bank.classes != self.test.classes:
            raise ValueError(
                f"KNNEvaluatorCallback: train_source and test_source name different classes "
                f"({self.bank.classes[:5]}... vs {self.test.classes[:5]}...); use two splits of one data set"
            )
        self.every_n_epochs = every_n_epochs
        self.k, self.temperature = k, temperature
        self.encoder_attr = encoder_attr
        self.log_plots = log_plots
        self.metric_name = metric_name
        self.history: list[tuple[int, float]] = []  # (global_step, accuracy)
        self._last_test: tuple[torch.Tensor, torch.Tensor] | None = None

    def evaluate(self, trainer, module) -> float:
        encoder = getattr(module, self.encoder_attr, None)
        if encoder is None:
            raise AttributeError(
                f"KNNEvaluatorCallback: {type(module).__name__} has no attribute {self.encoder_attr!r}; "
                f"pass encoder_attr= naming the module's pretrained encoder"
            )
        strategy = trainer.strategy
        accuracy, test_features, test_labels = knn_accuracy_on_splits(
            encoder, self.bank, self.test, rank=strategy.global_rank, world_size=strategy.world_size,
            collective=strategy.collective, device=strategy.root_device, k=self.k,
            temperature=self.temperature, autocast=trainer.precision.autocast(),
        )  # fmt: skip
        self.history.append((trainer.global_step, accuracy))
        self._last_test = (test_features, test_labels)
        trainer.log_metrics({self.metric_name: accuracy})
        return accuracy

    def on_train_epoch_end(self, trainer, module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        # A run cut by max_steps mid-epoch never reaches on_train_epoch_end: score the final encoder.
        if not self.history or self.history[-1][0] != trainer.global_step:
            self.evaluate(trainer, module)

    def on_fit_end(self, trainer, module) -> None:
        logger = trainer.logger
        if not self.log_plots or logger is None or not trainer.is_global_zero:
            return
        log_accuracy_curves(logger, {self.metric_name: self.history}, f"plots/{self.metric_name}.png")
        if self._last_test is not None:
            features, labels = self._last_test
            log_embedding_scatter(logger, features, labels, self.test.classes, "plots/test_embedding_pca.png",
                                  title=f"test embeddings at step {trainer.global_step} (PCA)")  # fmt: skip

    def state_dict(self) -> dict:
        return {"history": [[step, value] for step, value in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(step), float(value)) for step, value in state.get("history", [])]
