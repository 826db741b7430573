"""Features of a frozen encoder over labelled batches: what every probe of a representation
(kNN, the online classifier, a linear probe) starts from."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def extract_features(
    encoder: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
    collective=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` over ``(images, labels)`` batches and return ``(features, labels)``:
    features (N, D) float32, flattened from the encoder's output and L2-normalised; labels (N,)
    long; both on ``device``.

    The encoder runs in eval mode under ``torch.no_grad()``; afterwards every submodule gets back
    the train/eval mode it had (a frozen BatchNorm inside a training model stays frozen).

    With a ``collective`` whose ``world_size`` > 1 (anything with ``world_size``, ``rank`` and
    ``all_gather(t, grad=False)`` concatenating along dim 0, e.g.
    :class:`scale_ssl.collectives.Collective`), the result holds every rank's rows in rank order,
    identical on all ranks. A gather needs the same number of rows on each rank; the data layer
    guarantees it (every rank does the same number of steps of the same batch size,
    docs/ARCHITECTURE.md contract 5), and a mismatch raises on every rank rather than hanging.
    """
    device = torch.device(device)
    previous_modes = {module: module.training for module in encoder.modules()}
    encoder.eval()
    features, labels = [], []
    try:
        with torch.no_grad():
            for batch_index, batch in enumerate(batches):
                images, batch_labels = _split_batch(batch, batch_index)
                output = encoder(images.to(device))
                if not isinstance(output, torch.Tensor):
                    raise TypeError(
                        f"extract_features: encoder returned {type(output).__name__}, expected a "
                        f"tensor; wrap the encoder so that it returns the feature tensor"
                    )
                features.append(F.normalize(output.flatten(start_dim=1).float(), dim=1))
                labels.append(batch_labels.to(device=device, dtype=torch.long).reshape(-1))
    finally:
        for module, was_training in previous_modes.items():
            module.train(was_training)
    if not features:
        raise ValueError("extract_features: batches yielded no data; pass a non-empty loader")
    features, labels = torch.cat(features), torch.cat(labels)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"extract_features: got {labels.shape[0]} labels for {features.shape[0]} images; "
            f"each batch must hold one label per image"
        )
    if collective is not None and collective.world_size > 1:
        features, labels = _gather_from_all_ranks(features, labels, collective)
    return features, labels


def _split_batch(batch, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"extract_features: batch {batch_index} is not an (images, labels) pair "
            f"(got {type(batch).__name__}); iterate a loader that yields (images, labels)"
        )
    return batch[0], batch[1]


def _gather_from_all_ranks(features: torch.Tensor, labels: torch.Tensor, collective):
    # Gather the row counts first: all_gather of unequal shapes would hang or fail obscurely
    # inside the backend, while equal counts on every rank make every rank raise the same error.
    counts = collective.all_gather(
        torch.tensor([features.shape[0]], device=features.device), grad=False
    )
    if not bool((counts == counts[0]).all()):
        raise RuntimeError(
            f"extract_features: ranks hold different numbers of rows {counts.tolist()}; every rank "
            f"must see the same number of evaluation batches of the same size (use the data "
            f"layer's equal-steps-per-rank sharding)"
        )
    return collective.all_gather(features, grad=False), collective.all_gather(labels, grad=False)
