"""Linear evaluation: a linear classifier on the frozen encoder, the standard measure of an SSL
representation (SimCLR, arXiv:2002.05709, section 4; "linear evaluation protocol").

The encoder is frozen (no gradient; BatchNorm keeps its pretraining statistics) and a linear head
trains with SGD or LARS under a cosine schedule on the standard crop + flip augmentation; top-1 and
top-5 are then counted on the test split. It runs through our ``Trainer``, so under ``ddp`` it is
distributed exactly like pretraining (the global batch split over ranks, the test split read once
over all ranks). ``scale-ssl eval linear`` assembles all this from a checkpoint and its config.
"""

from __future__ import annotations

from torch import nn

from scale_ssl.eval.classifier import EncoderClassifier


def fit_and_test(classifier: EncoderClassifier, trainer, train_data, test_data) -> dict[str, float]:
    """``trainer.fit`` on ``train_data`` then ``trainer.test`` on ``test_data`` (this rank's
    batches); returns the test figures (``test/top1``, ``test/top5``, ``test/samples``), the same
    on every rank."""
    trainer.fit(classifier, train_data)
    results = trainer.test(classifier, test_data)
    return dict(results[0]) if results else {}


def linear_probe(
    encoder: nn.Module,
    feature_dim: int,
    num_classes: int,
    train_data,
    test_data,
    trainer,
    *,
    optimizer: str = "sgd",
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[dict[str, float], EncoderClassifier]:
    """Train a linear head on the frozen ``encoder`` and test it; returns ``(figures, classifier)``."""
    classifier = EncoderClassifier(
        encoder, feature_dim, num_classes, freeze_encoder=True, optimizer=optimizer,
        learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
    )  # fmt: skip
    return fit_and_test(classifier, trainer, train_data, test_data), classifier
