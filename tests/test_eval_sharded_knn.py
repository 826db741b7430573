"""kNN with the bank sharded over ranks: merging per-shard top-k equals the unsharded vote, the
rank-sharded reader covers a real split exactly once, and 2 gloo ranks equal 1 process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scale_ssl.data import FMNIST_MEAN, FMNIST_STD, EvalTransform
from scale_ssl.data.rank_full_pass import rank_slice
from scale_ssl.eval import knn_predict
from scale_ssl.probes.eval_split import EvalSplit
from scale_ssl.eval.knn_callback import knn_accuracy_on_splits
from scale_ssl.eval.sharded_knn import (
    local_topk_candidates,
    merge_topk_candidates,
    sharded_knn_predict,
    weighted_vote,
)
from tests.distributed import run_on_ranks


def _random_problem(seed=0, bank_rows=300, test_rows=77, dim=16, classes=5):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(bank_rows, dim, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(test_rows, dim, generator=g), dim=1)
    return test, bank, torch.randint(0, classes, (bank_rows,), generator=g)


@pytest.mark.parametrize("k", [1, 20, 90])
def test_merging_shard_topk_candidates_equals_the_unsharded_vote(k):
    test, bank, labels = _random_problem()
    # Uneven shards, one of them empty and one smaller than k (padded with -inf candidates).
    bounds = [(0, 150), (150, 150), (150, 190), (190, 300)]
    sims, labs = zip(*(local_topk_candidates(test, bank[a:b], labels[a:b], k) for a, b in bounds))
    merged_sim, merged_lab = merge_topk_candidates(list(sims), list(labs), k)
    sharded = weighted_vote(merged_sim, merged_lab, num_classes=5, temperature=0.07)
    expected = knn_predict(test, bank, labels, num_classes=5, k=k, temperature=0.07)
    assert torch.equal(sharded, expected)
    # The merged candidates are exactly the global top-k similarities.
    assert torch.allclose(merged_sim, (test @ bank.T).topk(k, dim=1).values)


def test_more_neighbours_than_bank_rows_matches_clipping():
    test, bank, labels = _random_problem(bank_rows=7)
    sims, labs = zip(*(local_topk_candidates(test, bank[a:b], labels[a:b], 50) for a, b in [(0, 3), (3, 7)]))
    merged = weighted_vote(*merge_topk_candidates(list(sims), list(labs), 50), num_classes=5, temperature=0.1)
    assert torch.equal(merged, knn_predict(test, bank, labels, num_classes=5, k=50))


def test_one_rank_is_plain_knn():
    test, bank, labels = _random_problem()
    assert torch.equal(sharded_knn_predict(test, bank, labels, 5, k=20), knn_predict(test, bank, labels, 5, k=20))


def test_rank_slices_cover_every_sample_once():
    for n, world in [(600, 2), (600, 7), (5, 4), (0, 3)]:
        slices = [rank_slice(n, r, world) for r in range(world)]
        covered = [i for start, stop, _ in slices for i in range(start, stop)]
        assert covered == list(range(n))
        assert all(stop - start <= slices[0][2] for start, stop, _ in slices)
    with pytest.raises(ValueError, match="rank must be in"):
        rank_slice(10, 2, 2)


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())


def _knn_on_ranks(rank, world_size, shards):
    import torch.distributed as dist

    from scale_ssl.collectives import TorchDistributedCollective

    dist.init_process_group("gloo")
    collective = TorchDistributedCollective()
    transform = EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)
    bank, test = EvalSplit(f"{shards}/train", transform, 128), EvalSplit(f"{shards}/test", transform, 128)
    own_bank_rows = sum(len(labels) for _, labels in bank.batches(rank, world_size))
    accuracy, features, labels = knn_accuracy_on_splits(
        _encoder(), bank, test, rank=rank, world_size=world_size, collective=collective, k=20, temperature=0.1
    )
    return {"accuracy": accuracy, "features": features, "labels": labels, "own_bank_rows": own_bank_rows}


@pytest.mark.timeout(180)
def test_two_gloo_ranks_equal_one_process_on_real_shards(fmnist_shards):
    transform = EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)
    bank, test = EvalSplit(fmnist_shards / "train", transform, 128), EvalSplit(fmnist_shards / "test", transform, 128)
    expected_accuracy, expected_features, expected_labels = knn_accuracy_on_splits(_encoder(), bank, test, k=20)
    assert expected_features.shape[0] == test.num_samples  # the whole split, no remainder dropped
    assert 0.2 < expected_accuracy < 1.0  # a real, non-trivial score (chance is 0.1)

    results = run_on_ranks(_knn_on_ranks, 2, str(fmnist_shards))
    assert [r["own_bank_rows"] for r in results] == [300, 300]  # each rank holds half the bank
    for result in results:
        assert result["accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)
        assert torch.equal(result["labels"], expected_labels)  # rank order == index order
        assert torch.allclose(result["features"], expected_features, atol=1e-6)
