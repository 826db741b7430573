"""Weighted kNN evaluation: hand-checked toy sets, chunking, clipping, feature extraction, and a
real two-process gloo run that must equal one process on the concatenated data."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scale_ssl.eval import (
    extract_features,
    knn_accuracy,
    knn_evaluate,
    knn_predict,
    raw_pixel_features,
)


def unit(angle_degrees: float) -> list[float]:
    radians = math.radians(angle_degrees)
    return [math.cos(radians), math.sin(radians)]


def reference_knn(test, bank, bank_labels, num_classes, k, temperature):
    """The formula written out row by row, in float64, to check the vectorised version."""
    test = torch.nn.functional.normalize(test.double(), dim=1)
    bank = torch.nn.functional.normalize(bank.double(), dim=1)
    predictions = []
    for row in test:
        similarity = bank @ row
        order = similarity.argsort(descending=True)[:k]
        scores = [0.0] * num_classes
        for index in order.tolist():
            scores[int(bank_labels[index])] += math.exp(similarity[index].item() / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return torch.tensor(predictions)


def test_weighted_vote_differs_from_majority_vote():
    # Query at 0 degrees. One class-0 neighbour at cos = 1.0, two class-1 neighbours at
    # cos = 0.8 (angles +-36.87 degrees).
    #   T = 0.1: class 0 scores e^10 = 22026, class 1 scores 2 e^8 = 5962  -> class 0
    #   T = 10:  class 0 scores e^0.1 = 1.105, class 1 scores 2 e^0.08 = 2.167 -> class 1
    # (a large temperature flattens the weights towards a plain majority vote).
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(query, bank, labels, num_classes=2, k=3, temperature=0.1).tolist() == [0]
    assert knn_predict(query, bank, labels, num_classes=2, k=3, temperature=10.0).tolist() == [1]
    # With k = 1 only the nearest neighbour votes.
    assert knn_predict(query, bank, labels, num_classes=2, k=1, temperature=10.0).tolist() == [0]


def test_three_separated_clusters_are_classified_exactly():
    # Clusters around 0, 120 and 240 degrees; bank points within 10 degrees of the centre.
    bank = torch.tensor(
        [unit(centre + offset) for centre in (0, 120, 240) for offset in (-10, 0, 10)]
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    queries = torch.tensor([unit(5), unit(115), unit(250), unit(-8)])
    expected = [0, 1, 2, 0]
    # k = 3: the three nearest points of each query are its own cluster's.
    assert knn_predict(queries, bank, labels, num_classes=3, k=3).tolist() == expected
    # k = 9 (every bank point votes): the own cluster's weights still dominate.
    assert knn_predict(queries, bank, labels, num_classes=3, k=9).tolist() == expected
    assert knn_accuracy(queries, torch.tensor(expected), bank, labels, num_classes=3, k=3) == 1.0
    assert (
        knn_accuracy(queries, torch.tensor([0, 1, 1, 1]), bank, labels, num_classes=3, k=3) == 0.5
    )


def test_scale_of_features_does_not_matter():
    bank = torch.tensor([unit(0), unit(90)]) * torch.tensor([[100.0], [0.01]])
    queries = torch.tensor([unit(80)]) * 1e-3  # closer in angle to the tiny class-1 vector
    assert knn_predict(queries, bank, torch.tensor([0, 1]), num_classes=2, k=2).tolist() == [1]


def test_matches_reference_and_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (300,), generator=generator)
    test = torch.randn(77, 16, generator=generator, dtype=torch.float64)
    whole = knn_predict(test, bank, labels, num_classes=5, k=20, temperature=0.07, chunk_size=1024)
    chunked = knn_predict(test, bank, labels, num_classes=5, k=20, temperature=0.07, chunk_size=10)
    assert whole.dtype == torch.long and whole.shape == (77,)
    assert torch.equal(whole, chunked)
    assert torch.equal(whole, reference_knn(test, bank, labels, 5, k=20, temperature=0.07))


def test_tiny_temperature_does_not_overflow():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    # exp(1 / 1e-4) overflows float32; the prediction must still be the nearest neighbour's.
    assert knn_predict(
        torch.tensor([[0.9, 0.5]]), bank, labels, num_classes=2, k=3, temperature=1e-4
    ).tolist() == [1]


def test_k_larger_than_the_bank_is_clipped():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    clipped = knn_predict(queries, bank, labels, num_classes=2, k=200)
    assert torch.equal(clipped, knn_predict(queries, bank, labels, num_classes=2, k=3))
    assert torch.equal(clipped, knn_predict(queries, bank, labels.int(), num_classes=2, k=200))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test_features": torch.ones(2, 3)}, "dimension 3"),
        ({"test_features": torch.ones(4)}, "test_features must be 2-D"),
        ({"bank_labels": torch.tensor([0, 1])}, r"bank_labels must have shape \(3,\)"),
        ({"bank_labels": torch.tensor([0.0, 1.0, 1.0])}, "integer"),
        ({"bank_labels": torch.tensor([0, 1, 2])}, r"num_classes=2"),
        ({"k": 0}, "k must be an int >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_clear_errors(change, message):
    arguments = {
        "test_features": torch.ones(2, 2),
        "bank_features": torch.ones(3, 2),
        "bank_labels": torch.tensor([0, 1, 1]),
        "num_classes": 2,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        knn_predict(**arguments)


class ModeRecordingEncoder(nn.Module):
    """Conv encoder with BatchNorm whose output is (B, C, 1, 1), recording the mode it ran in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.frozen_norm = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.modes_seen: list[bool] = []

    def forward(self, images):
        self.modes_seen.append(self.training)
        return self.pool(self.frozen_norm(self.norm(self.conv(images))))


def image_batches(count: int, batch_size: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 3, 8, 8, generator=generator),
            torch.randint(0, 3, (batch_size,), generator=generator),
        )
        for _ in range(count)
    ]


def test_extract_features_normalises_flattens_and_restores_modes():
    encoder = ModeRecordingEncoder()
    encoder.train()
    encoder.frozen_norm.eval()  # a submodule deliberately kept in eval mode
    running_mean_before = encoder.norm.running_mean.clone()
    batches = image_batches(3)

    features, labels = extract_features(encoder, batches)

    assert features.shape == (12, 4) and labels.shape == (12,) and labels.dtype == torch.long
    assert torch.allclose(features.norm(dim=1), torch.ones(12))
    assert not features.requires_grad
    assert encoder.modes_seen == [False, False, False]  # ran in eval mode
    assert torch.equal(encoder.norm.running_mean, running_mean_before)  # no BN statistics update
    assert encoder.training and encoder.norm.training and not encoder.frozen_norm.training
    assert torch.equal(labels, torch.cat([batch_labels for _, batch_labels in batches]))


def test_extract_features_restores_mode_after_an_error_and_checks_batches():
    encoder = ModeRecordingEncoder().train()
    with pytest.raises(ValueError, match=r"\(images, labels\) pair"):
        extract_features(encoder, [torch.randn(2, 3, 8, 8)])
    assert encoder.training
    with pytest.raises(ValueError, match="no data"):
        extract_features(encoder, [])
    with pytest.raises(TypeError, match="wrap the encoder"):
        extract_features(TupleOutput(), [(torch.ones(2, 3), torch.zeros(2))])


class TupleOutput(nn.Module):
    """An encoder returning (features,) instead of a tensor, as some backbones do."""

    def forward(self, images):
        return (images,)


def test_raw_pixel_features_and_knn_evaluate():
    # Two classes of 8x8 images: bright top half vs bright bottom half, plus noise.
    generator = torch.Generator().manual_seed(1)

    def batches(count):
        out = []
        for _ in range(count):
            labels = torch.randint(0, 2, (6,), generator=generator)
            images = torch.rand(6, 1, 8, 8, generator=generator) * 0.3
            for i, label in enumerate(labels.tolist()):
                rows = slice(0, 4) if label == 0 else slice(4, 8)
                images[i, :, rows] += 1.0
            out.append(((images * 180).to(torch.uint8), labels))  # <= 1.3 * 180 < 256
        return out

    train, test = batches(5), batches(3)
    features, labels = raw_pixel_features(train)
    assert features.shape == (30, 64) and torch.allclose(features.norm(dim=1), torch.ones(30))
    test_features, test_labels = raw_pixel_features(test)
    assert knn_accuracy(test_features, test_labels, features, labels, num_classes=2, k=5) == 1.0

    def as_float(data):
        return [(images.float(), labels) for images, labels in data]

    accuracy = knn_evaluate(nn.Flatten(), as_float(train), as_float(test), num_classes=2, k=5)
    assert accuracy == 1.0


# ---------------------------------------------------------------- two real gloo processes


def _gloo_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from scale_ssl.collectives import TorchDistributedCollective

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        collective = TorchDistributedCollective()
        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
        train = image_batches(4, seed=10)[rank * 2 : rank * 2 + 2]  # this rank's half of the data
        test = image_batches(2, seed=20)[rank : rank + 1]
        accuracy = knn_evaluate(encoder, train, test, num_classes=3, k=5, collective=collective)
        features, labels = extract_features(encoder, train, collective=collective)
        try:
            uneven = train if rank == 0 else train[:1]
            extract_features(encoder, uneven, collective=collective)
            uneven_error = ""
        except RuntimeError as error:
            uneven_error = str(error)
        torch.save(
            {
                "accuracy": accuracy,
                "features": features,
                "labels": labels,
                "uneven_error": uneven_error,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_gathers_across_two_gloo_ranks_like_one_process_on_all_data(tmp_path):
    world_size = 2
    mp.spawn(
        _gloo_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
    train, test = image_batches(4, seed=10), image_batches(2, seed=20)
    expected_features, expected_labels = extract_features(encoder, train)
    expected_accuracy = knn_evaluate(encoder, train, test, num_classes=3, k=5)

    for result in results:
        assert torch.allclose(result["features"], expected_features, atol=1e-6)
        assert torch.equal(result["labels"], expected_labels)
        assert result["accuracy"] == pytest.approx(expected_accuracy)
        assert "different numbers of rows [8, 4]" in result["uneven_error"]
