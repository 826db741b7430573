"""Weighted kNN with the feature bank sharded over ranks: no rank ever holds the whole bank.

The vote of :mod:`scale_ssl.eval.knn` only needs, for each test row, the ``k`` largest
similarities over the bank and their labels. The top-k of a union is the top-k of the union of
the parts' top-k, so with the bank split over W ranks:

1. every rank holds all test rows (they are few: gathered once) and its own bank shard;
2. each rank takes the top-k similarities of every test row against its shard (k candidates,
   padded with similarity -inf when the shard has fewer than k rows);
3. the (rows, k) candidates of all ranks are gathered, (rows, W*k), and the top-k of those is
   exactly the top-k over the whole bank; the weighted vote then runs as in ``knn_predict``.

Communication per test row is W*k (similarity, label) pairs instead of the whole bank to every
rank; for a 1.28M x 2048 ImageNet bank that is the difference between moving 10 GB to every rank
and moving a few hundred MB in total. Compute is split W ways. Every rank ends with the same
predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scale_ssl.eval.knn import _as_float, knn_predict, weighted_vote


def gather_rank_rows(
    features: torch.Tensor, labels: torch.Tensor, rows_per_rank: int, collective
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every rank's ``(features, labels)`` rows, in rank order, where ranks may hold
    different numbers of rows (at most ``rows_per_rank``, e.g. from
    :func:`scale_ssl.data.rank_full_pass.rank_slice`): each rank pads to ``rows_per_rank`` with
    label -1, and the padding is dropped after the gather."""
    if collective is None or collective.world_size == 1:
        return features, labels
    if features.shape[0] > rows_per_rank:
        raise ValueError(
            f"gather_rank_rows: this rank holds {features.shape[0]} rows but rows_per_rank={rows_per_rank}; "
            f"pass the largest row count any rank can have"
        )
    pad = rows_per_rank - features.shape[0]
    features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    labels = torch.cat([labels.long(), labels.new_full((pad,), -1, dtype=torch.long)])
    all_features = collective.all_gather(features.contiguous(), grad=False)
    all_labels = collective.all_gather(labels.contiguous(), grad=False)
    real = all_labels >= 0
    return all_features[real], all_labels[real]


def local_topk_candidates(
    test: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity, label)`` of the ``k`` bank rows most similar to each test row, both (N, k),
    similarity sorted largest first; columns past the bank's size hold similarity -inf (they get
    weight 0 in the vote). ``test`` and ``bank`` must be L2-normalised."""
    n = test.shape[0]
    take = min(k, bank.shape[0])
    similarity = test.new_full((n, k), float("-inf"))
    labels = torch.zeros(n, k, dtype=torch.long, device=test.device)
    if take > 0:
        top_similarity, top_index = (test @ bank.T).topk(take, dim=1)
        similarity[:, :take] = top_similarity
        labels[:, :take] = bank_labels[top_index]
    return similarity, labels


def merge_topk_candidates(
    similarities: list[torch.Tensor], labels: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of the union of several shards' candidates: each list entry (N, k_i), the result
    (N, min(k, sum k_i)), sorted largest first."""
    similarity = torch.cat(similarities, dim=1)
    label = torch.cat(labels, dim=1)
    top_similarity, position = similarity.topk(min(k, similarity.shape[1]), dim=1)
    return top_similarity, label.gather(1, position)


def sharded_knn_predict(
    test_features: torch.Tensor,
    bank_shard_features: torch.Tensor,
    bank_shard_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    collective=None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predictions (N,) for ``test_features`` (N, D; the same rows on every rank) against the bank
    whose rows are split over the ranks of ``collective``: this rank passes only its shard
    ``bank_shard_features`` (M_r, D) and ``bank_shard_labels`` (M_r,). Any shard may be empty, the
    whole bank may not. Equals ``knn_predict`` on the concatenated bank (up to ties in similarity).
    Without a collective (or a world of one) it is ``knn_predict``.
    """
    if collective is None or collective.world_size == 1:
        return knn_predict(test_features, bank_shard_features, bank_shard_labels, num_classes,
                           k=k, temperature=temperature, chunk_size=chunk_size)  # fmt: skip
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"sharded_knn_predict: k must be an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"sharded_knn_predict: temperature must be > 0, got {temperature!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"sharded_knn_predict: chunk_size must be an int >= 1, got {chunk_size!r}")
    if bank_shard_features.dim() != 2 or test_features.dim() != 2 or bank_shard_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"sharded_knn_predict: test_features {tuple(test_features.shape)} and bank_shard_features "
            f"{tuple(bank_shard_features.shape)} must be 2-D with the same feature dimension"
        )
    bank_labels = bank_shard_labels.to(device=test_features.device, dtype=torch.long)
    if bank_labels.numel() and (int(bank_labels.min()) < 0 or int(bank_labels.max()) >= num_classes):
        raise ValueError(f"sharded_knn_predict: bank labels must lie in [0, num_classes={num_classes})")
    # Every rank must take part in the same collectives, so the checks that decide whether to go on
    # are global: rows of the bank over all ranks, test rows equal on all ranks.
    counts = torch.tensor([bank_shard_features.shape[0], test_features.shape[0]], device=test_features.device)
    counts = collective.all_gather(counts.unsqueeze(0), grad=False)
    if int(counts[:, 0].sum()) == 0:
        raise ValueError("sharded_knn_predict: the bank is empty on every rank; it needs at least one labelled row")
    if not bool((counts[:, 1] == counts[0, 1]).all()):
        raise ValueError(
            f"sharded_knn_predict: ranks hold different numbers of test rows {counts[:, 1].tolist()}; "
            f"gather the test features first (gather_rank_rows) so every rank scores the same rows"
        )
    test = F.normalize(_as_float(test_features), dim=1)
    bank = F.normalize(_as_float(bank_shard_features).to(test.device), dim=1)
    world = collective.world_size
    predictions = []
    for start in range(0, test.shape[0], chunk_size):
        similarity, labels = local_topk_candidates(test[start : start + chunk_size], bank, bank_labels, k)
        rows = similarity.shape[0]
        # (world * rows, k) in rank order -> (rows, world * k): every rank's candidates side by side.
        all_similarity = collective.all_gather(similarity.contiguous(), grad=False).view(world, rows, k)
        all_labels = collective.all_gather(labels.contiguous(), grad=False).view(world, rows, k)
        merged_similarity, merged_labels = merge_topk_candidates(list(all_similarity), list(all_labels), k)
        predictions.append(weighted_vote(merged_similarity, merged_labels, num_classes, temperature))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=test.device)
    return torch.cat(predictions)


def sharded_knn_accuracy(
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    bank_shard_features: torch.Tensor,
    bank_shard_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    collective=None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`sharded_knn_predict`; the same on every rank."""
    if test_labels.shape != (test_features.shape[0],) or test_labels.shape[0] == 0:
        raise ValueError(
            f"sharded_knn_accuracy: test_labels must have shape ({test_features.shape[0]},) with at least "
            f"one row, got {tuple(test_labels.shape)}"
        )
    predictions = sharded_knn_predict(test_features, bank_shard_features, bank_shard_labels, num_classes,
                                      k=k, temperature=temperature, collective=collective, chunk_size=chunk_size)  # fmt: skip
    return (predictions == test_labels.to(predictions.device)).float().mean().item()
