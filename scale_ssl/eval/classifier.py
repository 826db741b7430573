"""``EncoderClassifier``: a pretrained encoder plus a classifier head, trained by our ``Trainer``.

The one module behind both supervised evaluations of a representation:

* **linear probe** (``freeze_encoder=True``): the encoder is frozen (no gradient, kept in eval mode
  so its BatchNorm statistics stay those of pretraining) and only a linear head is trained; the
  protocol of SimCLR (arXiv:2002.05709, section 4) and every method since.
* **fine-tuning** (``freeze_encoder=False``): the whole network trains, the encoder at a lower
  learning rate (``encoder_learning_rate``) than the freshly initialised head.

Because it is an ``SSLModule``, it runs under any strategy exactly like pretraining (DDP averages
the head's gradients; the encoder has none when frozen). Top-1 / top-5 on the validation and test
splits are counted exactly: correct predictions and sample counts are summed over ranks, never
averaged per rank (ranks may hold different numbers of evaluation rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.probes.online_evaluator import build_classifier_head
from scale_ssl.optim import LARS, WarmupCosineSchedule
from scale_ssl.trainer import SSLModule

CLASSIFIER_OPTIMIZERS = ("sgd", "lars")


def infer_feature_dim(encoder: nn.Module, channels: int, image_size: int) -> int:
    """Width of ``encoder``'s pooled output, measured on one blank image (in eval mode, no grad)."""
    modes = {m: m.training for m in encoder.modules()}
    encoder.eval()
    try:
        with torch.no_grad():
            device = next(encoder.parameters()).device
            output = encoder(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for m, training in modes.items():
            m.train(training)
    return int(output.flatten(start_dim=1).shape[1])


class EncoderClassifier(SSLModule):
    """``head(encoder(x))``, with cross-entropy on ``(images, labels)`` batches.

    Args:
        encoder: the pretrained encoder, returning pooled features (N, feature_dim).
        feature_dim / num_classes: head input and output widths.
        freeze_encoder: True for the linear probe, False for fine-tuning.
        hidden_dim / dropout: ``None`` for a linear head, or the MLP head's hidden width.
        optimizer: ``sgd`` (momentum, optional ``nesterov``) or ``lars``.
        learning_rate: the head's peak lr; ``encoder_learning_rate`` the encoder's when fine-tuning
            (default: learning_rate / 10).
        warmup_steps / final_lr: linear warmup, then cosine decay to ``final_lr`` over the run.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        num_classes: int,
        freeze_encoder: bool = True,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        optimizer: str = "sgd",
        learning_rate: float = 0.1,
        encoder_learning_rate: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        final_lr: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=("encoder",))
        if optimizer not in CLASSIFIER_OPTIMIZERS:
            raise ValueError(f"EncoderClassifier: optimizer={optimizer!r}; use one of {CLASSIFIER_OPTIMIZERS}")
        for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay), ("final_lr", final_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"EncoderClassifier: {name} must be a number >= 0, got {value!r}")
        if encoder_learning_rate is not None and (not isinstance(encoder_learning_rate, (int, float)) or encoder_learning_rate < 0):
            raise ValueError(f"EncoderClassifier: encoder_learning_rate must be a number >= 0, got {encoder_learning_rate!r}")
        self.encoder = encoder
        self.head = build_classifier_head(feature_dim, num_classes, hidden_dim, dropout)
        self.freeze_encoder = freeze_encoder
        self.num_classes = num_classes
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        self._counts = torch.zeros(3, dtype=torch.float64)  # correct top-1, correct top-5, samples

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its pretraining BatchNorm statistics
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                features = self.encoder(images)
        else:
            features = self.encoder(images)
        return self.head(features.flatten(start_dim=1).float())

    def training_step(self, batch, batch_idx: int):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels.long())
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/top1", (logits.argmax(dim=1) == labels).float().mean(), sync_dist=True)
        return loss

    # -- exact top-1 / top-5 over all ranks --------------------------------------------------
    def _count(self, batch) -> None:
        images, labels = batch
        logits = self(images)
        top = logits.topk(min(5, self.num_classes), dim=1).indices
        labels = labels.to(top.device).long()
        hits = top == labels[:, None]
        self._counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), labels.shape[0]],
                                     dtype=torch.float64)  # fmt: skip

    def _publish_counts(self, prefix: str) -> None:
        counts = self.collective.all_reduce(self._counts.to(self.device), op="sum").cpu()
        self._counts = torch.zeros(3, dtype=torch.float64)
        if counts[2] > 0:
            self.log(f"{prefix}/top1", float(counts[0] / counts[2]))
            self.log(f"{prefix}/top5", float(counts[1] / counts[2]))
            self.log(f"{prefix}/samples", float(counts[2]))

    def validation_step(self, batch, batch_idx: int, *args):
        self._count(batch)

    def on_validation_epoch_start(self) -> None:
        self._counts = torch.zeros(3, dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        self._publish_counts("val")

    def test_step(self, batch, batch_idx: int, *args):
        self._count(batch)

    def on_test_epoch_start(self) -> None:
        self._counts = torch.zeros(3, dtype=torch.float64)

    def on_test_epoch_end(self) -> None:
        self._publish_counts("test")

    # -- optimizer ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        lr = hp["learning_rate"]
        groups = [{"params": list(self.head.parameters()), "lr": lr, "name": "head"}]
        if not self.freeze_encoder:
            encoder_lr = hp["encoder_learning_rate"] if hp["encoder_learning_rate"] is not None else lr / 10
            groups.append({"params": list(self.encoder.parameters()), "lr": encoder_lr, "name": "encoder"})
        if hp["optimizer"] == "lars":
            optimizer = LARS(groups, lr=lr, momentum=hp["momentum"], weight_decay=hp["weight_decay"], nesterov=hp["nesterov"])
        else:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp["momentum"], nesterov=hp["nesterov"],
                                        weight_decay=hp["weight_decay"])  # fmt: skip
        total = self.trainer.estimated_stepping_batches
        warmup = min(hp["warmup_steps"], total)
        scheduler = WarmupCosineSchedule(optimizer, warmup, total, final_lr=min(hp["final_lr"], min(g["lr"] for g in groups)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
