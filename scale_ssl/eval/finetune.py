"""Fine-tuning: the whole pretrained network trains on labels, the encoder at a lower learning
rate than the new head (SimCLR, arXiv:2002.05709, appendix B.5; the seeds' fine-tuning runs use
``--learning_rate 0.3 --num_epochs 100`` with an optional Nesterov momentum and a 1024-hidden MLP
head). Same module, trainer and test counting as the linear probe, with ``freeze_encoder=False``.
"""

from __future__ import annotations

from torch import nn

from scale_ssl.eval.classifier import EncoderClassifier
from scale_ssl.eval.linear_probe import fit_and_test


def finetune(
    encoder: nn.Module,
    feature_dim: int,
    num_classes: int,
    train_data,
    test_data,
    trainer,
    *,
    learning_rate: float = 0.3,
    encoder_learning_rate: float | None = None,
    hidden_dim: int | None = None,
    dropout: float = 0.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[dict[str, float], EncoderClassifier]:
    """Fine-tune ``encoder`` + head (encoder lr ``encoder_learning_rate``, default lr / 10) and test
    it; returns ``(figures, classifier)``."""
    classifier = EncoderClassifier(
        encoder, feature_dim, num_classes, freeze_encoder=False, hidden_dim=hidden_dim, dropout=dropout,
        optimizer=optimizer, learning_rate=learning_rate, encoder_learning_rate=encoder_learning_rate,
        momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
    )  # fmt: skip
    return fit_and_test(classifier, trainer, train_data, test_data), classifier
