"""Weighted k-nearest-neighbour evaluation of frozen features.

The standard probe of self-supervised representations, from Wu et al., "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination" (CVPR 2018), as used by DINO and solo-learn.
Features are L2-normalised, so the dot product is the cosine similarity. For a test feature
``x`` and its ``k`` most similar bank features ``b_1..b_k`` with labels ``y_1..y_k``:

    score(c) = sum_{i : y_i = c} exp(cos(x, b_i) / temperature)
    prediction = argmax_c score(c)

Unlike a majority vote, a few very close neighbours can outvote many distant ones, and a small
``temperature`` sharpens that. No training happens: the labelled "bank" (usually the train set)
is the classifier.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.probes.features import extract_features  # noqa: F401  (part of this module's API)


def knn_predict(
    test_features: torch.Tensor,
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict a class for each row of ``test_features`` (N, D) by the weighted vote of its
    ``k`` nearest rows of ``bank_features`` (M, D), labelled ``bank_labels`` (M,).

    Returns a ``torch.long`` tensor of shape (N,). ``k`` is clipped to M. Test rows are processed
    ``chunk_size`` at a time, so at most a (chunk_size, M) similarity matrix exists at once
    (10k x 60k floats would be 2.4 GB). Ties in the summed weights go to the lowest class index.
    """
    _check_knn_args(
        test_features, bank_features, bank_labels, num_classes, k, temperature, chunk_size
    )
    if bank_features.device != test_features.device:
        bank_features = bank_features.to(test_features.device)
    bank_labels = bank_labels.to(device=bank_features.device, dtype=torch.long)  # scatter index
    # Normalising again is a no-op for extract_features' output, and makes raw inputs correct.
    test = F.normalize(_as_float(test_features), dim=1)
    bank = F.normalize(_as_float(bank_features), dim=1)
    k = min(k, bank.shape[0])

    predictions = []
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ bank.T  # (chunk, M)
        top_similarity, top_index = similarity.topk(k, dim=1)  # sorted, largest first
        predictions.append(weighted_vote(top_similarity, bank_labels[top_index], num_classes, temperature))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=test.device)
    return torch.cat(predictions)


def weighted_vote(
    similarity: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """argmax_c sum_{i: y_i = c} exp(s_i / T) over each row's candidates, sorted largest first:
    ``similarity`` (N, k) and their ``labels`` (N, k). Computed as exp((s_i - s_max) / T), which is
    exp(s_i / T) times a per-row constant (same argmax) and cannot overflow however small T is;
    candidates with similarity -inf (padding) weigh 0."""
    weights = ((similarity - similarity[:, :1]) / temperature).exp()
    votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device, dtype=weights.dtype)
    votes.scatter_add_(1, labels, weights)
    return votes.argmax(dim=1)


def knn_accuracy(
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on ``test_features`` against
    ``test_labels``."""
    if test_labels.dim() != 1 or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(
            f"knn_accuracy: test_labels must have shape ({test_features.shape[0]},) to match "
            f"test_features {tuple(test_features.shape)}, got {tuple(test_labels.shape)}"
        )
    if test_labels.shape[0] == 0:
        raise ValueError(
            "knn_accuracy: test_features is empty; accuracy needs at least one test row"
        )
    predictions = knn_predict(
        test_features,
        bank_features,
        bank_labels,
        num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return (predictions == test_labels.to(predictions.device)).float().mean().item()


def knn_evaluate(
    encoder: nn.Module,
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    device: str | torch.device = "cpu",
    collective=None,
    chunk_size: int = 1024,
) -> float:
    """kNN top-1 accuracy of ``encoder``'s features: the train batches form the labelled bank,
    the test batches are classified against it. Under a ``collective`` both sets are gathered
    from all ranks, so every rank returns the same global accuracy."""
    bank_features, bank_labels = extract_features(
        encoder, train_batches, device=device, collective=collective
    )
    test_features, test_labels = extract_features(
        encoder, test_batches, device=device, collective=collective
    )
    return knn_accuracy(
        test_features, test_labels, bank_features, bank_labels, num_classes,
        k=k, temperature=temperature, chunk_size=chunk_size,
    )  # fmt: skip


def raw_pixel_features(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-pixel baseline: each image flattened to one vector, L2-normalised, with its label.
    A learned encoder should beat kNN on these."""
    as_float = ((images.float(), labels) for images, labels in batches)
    return extract_features(nn.Flatten(), as_float, device=device)


def _as_float(features: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 (tests compare against exact references); half precision and
    # integers go to float32, where CPU matmul and topk are well supported.
    if features.dtype in (torch.float32, torch.float64):
        return features
    return features.float()


def _check_knn_args(
    test_features, bank_features, bank_labels, num_classes, k, temperature, chunk_size
) -> None:
    if test_features.dim() != 2:
        raise ValueError(
            f"knn_predict: test_features must be 2-D (N, D), got shape {tuple(test_features.shape)}"
        )
    if bank_features.dim() != 2:
        raise ValueError(
            f"knn_predict: bank_features must be 2-D (M, D), got shape {tuple(bank_features.shape)}"
        )
    if test_features.shape[1] != bank_features.shape[1]:
        raise ValueError(
            f"knn_predict: test_features have dimension {test_features.shape[1]} but bank_features "
            f"have {bank_features.shape[1]}; extract both with the same encoder"
        )
    if bank_features.shape[0] == 0:
        raise ValueError(
            "knn_predict: bank_features is empty; the bank needs at least one labelled row"
        )
    if bank_labels.shape != (bank_features.shape[0],):
        raise ValueError(
            f"knn_predict: bank_labels must have shape ({bank_features.shape[0]},) to match "
            f"bank_features {tuple(bank_features.shape)}, got {tuple(bank_labels.shape)}"
        )
    if bank_labels.dtype.is_floating_point or bank_labels.dtype == torch.bool:
        raise ValueError(
            f"knn_predict: bank_labels must be integer class indices, got dtype {bank_labels.dtype}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"knn_predict: num_classes must be an int >= 1, got {num_classes!r}")
    low, high = int(bank_labels.min()), int(bank_labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"knn_predict: bank_labels must lie in [0, num_classes={num_classes}), found values in "
            f"[{low}, {high}]; pass the dataset's number of classes"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"knn_predict: k must be an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"knn_predict: temperature must be > 0, got {temperature!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"knn_predict: chunk_size must be an int >= 1, got {chunk_size!r}")
