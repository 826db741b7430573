"""A user's own webdataset shards (``tests/_own_shards.py``: written by webdataset's TarWriter,
uneven, jpg/png/webp, labelled by ``cls``, by a json field, or not at all): indexed with one
command, streamed on 2 real ranks x 2 workers with every sample at most once, equal steps and
fewer than world x batch samples dropped per epoch; and the exact plan's arithmetic on its own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from scale_ssl.data import EpochShardPlan, ShardedImageStream, ShardIndex
from scale_ssl.data.sample_fields import MissingLabelsError
from scale_ssl.probes.eval_split import EvalSplit
from scale_ssl.cli.main import main as cli_main
from tests._dist_workers_data import pixels_as_tensor, train_epochs_on_rank
from tests._own_shards import CLASS_NAMES, USER_SHARD_SIZES, key_of, write_user_shards
from tests.distributed import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
BATCH = 4

more_workers_than_cores = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def index_shards(*args, cwd) -> subprocess.CompletedProcess:
    """``scale-ssl index-shards`` as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "scale_ssl.cli.main", "index-shards", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    keys = {labels: write_user_shards(root / str(labels), labels=labels) for labels in ("cls", "json", None)}
    return root, keys["cls"]


def test_one_command_indexes_shards_written_by_webdataset(own, tmp_path, capsys):
    root, keys = own
    done = index_shards(root / "cls", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "128 samples in 7 shards" in done.stdout and "labels: cls (10 classes)" in done.stdout
    index = ShardIndex.load(root / "cls")
    assert [s.num_samples for s in index.shards] == USER_SHARD_SIZES
    assert index.label_key == "cls" and index.classes == [str(c) for c in range(10)]
    assert index.image_key in ("jpg", "png", "webp")
    # Offsets are where each sample's first tar record starts: TarWriter's default float mtime
    # puts a PAX header there, so the record starts with an 'x' header whose next header names it.
    shard = index.shards[1]
    raw = (root / "cls" / shard.name).read_bytes()
    for i, offset in enumerate(shard.offsets):
        assert raw[offset + 156:offset + 157] == b"x"
        assert raw[offset + 512 * 2: offset + 512 * 2 + 100].split(b"\0")[0].decode().startswith(key_of(1, i) + ".")
    # Indexing again needs --overwrite; the error is one line.
    capsys.readouterr()
    assert cli_main(["index-shards", str(root / "cls")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"scale-ssl: error: {root / 'cls' / 'shards.json'} exists; pass --overwrite to replace it"]


def test_brace_lists_globs_and_an_index_written_elsewhere_stream_the_same_samples(own, tmp_path):
    root, keys = own
    directory = root / "cls"
    if not (directory / "shards.json").exists():
        assert cli_main(["index-shards", str(directory)]) == 0
    elsewhere = tmp_path / "indexes" / "mine.json"
    assert cli_main(["index-shards", f"{directory}/data-{{00..06}}.tar", "--out", str(elsewhere)]) == 0
    written = json.loads(elsewhere.read_text())
    assert written["base"] == str(directory) and written["num_samples"] == 128

    def keys_of(source, **options):
        stream = ShardedImageStream(source, BATCH, pixels_as_tensor, rank=0, world_size=1, return_keys=True,
                                    shuffle_buffer=0, shuffle_shards=False, **options)
        return [k for _, _, batch in stream for k in batch]

    reference = keys_of(directory)
    assert sorted(reference) == sorted(keys)  # 128 = 32 batches of 4: nothing dropped
    assert keys_of(elsewhere) == reference
    assert keys_of(f"{directory}/data-{{00..06}}.tar") == reference
    assert keys_of(f"{directory}/data-0*.tar") == reference
    # A pattern naming some of the shards streams those only (its index entries are taken).
    part = keys_of(f"{directory}/data-{{01,04}}.tar")
    assert sorted(part) == sorted(k for k in keys if k.startswith(("s001", "s004")))


def test_a_set_without_an_index_is_indexed_on_the_fly_with_one_notice(own, tmp_path, capsys, monkeypatch):
    root, keys = own
    fresh = tmp_path / "fresh"
    write_user_shards(fresh, labels="cls")
    stream = ShardedImageStream(fresh, BATCH, pixels_as_tensor, rank=0, world_size=1, return_keys=True)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(f"scale-ssl: note: {fresh} has no index")
    assert f"`scale-ssl index-shards {fresh}`" in notice[0] and "128 samples" in notice[0]
    assert sorted(k for _, _, batch in stream for k in batch) == sorted(keys)
    assert not (fresh / "shards.json").exists()  # nothing is written into the user's directory
    # Other ranks stay quiet; a set too large to read at start-up is an error saying what to run.
    ShardedImageStream(fresh, BATCH, pixels_as_tensor, rank=1, world_size=2)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("scale_ssl.data.shard_source.SCAN_MAX_SHARDS", 3)
    with pytest.raises(FileNotFoundError, match=r"too large to index on the fly \(7 shards.*scale-ssl index-shards"):
        ShardedImageStream(fresh, BATCH, pixels_as_tensor, rank=0, world_size=1)


def test_labels_from_cls_from_a_json_field_or_none(own, tmp_path):
    root, _ = own
    for labels in ("json", "None"):
        if not (root / labels / "shards.json").exists():
            extra = ["--label-key", "json:label"] if labels == "json" else []
            assert cli_main(["index-shards", str(root / labels), *extra]) == 0
    names = ShardIndex.load(root / "json")
    assert names.label_key == "json:label" and names.classes == sorted(CLASS_NAMES)

    def labelled_keys(source, **options):
        stream = ShardedImageStream(source, BATCH, pixels_as_tensor, rank=0, world_size=1, return_keys=True, **options)
        return {k: int(label) for _, labels, batch in stream for k, label in zip(batch, labels)}

    by_json = labelled_keys(root / "json")
    assert len(by_json) == 128
    assert all(label == sorted(CLASS_NAMES).index(CLASS_NAMES[int(k[-4:]) % 3]) for k, label in by_json.items())
    assert all(label == int(k[-4:]) % 10 for k, label in labelled_keys(root / "cls").items())

    # Unlabelled: streams for pretraining with label -1; what needs labels says so by name.
    unlabelled = ShardIndex.load(root / "None")
    assert unlabelled.label_key is None and unlabelled.classes == []
    assert set(labelled_keys(root / "None").values()) == {-1}
    assert set(labelled_keys(root / "cls", label_key=None).values()) == {-1}
    with pytest.raises(MissingLabelsError, match=r"evaluation on a labelled split .* needs labelled shards, but .*None has no labels"):
        EvalSplit(root / "None", pixels_as_tensor)
    with pytest.raises(MissingLabelsError, match="label_key='cls' but the index of .* found no labels"):
        ShardedImageStream(root / "None", BATCH, pixels_as_tensor, label_key="cls")


def test_image_keys_choose_the_members_that_hold_the_image(own):
    root, _ = own
    stream = ShardedImageStream(root / "cls", BATCH, pixels_as_tensor, rank=0, world_size=1, return_keys=True,
                                image_keys=["webp"], max_corrupt_fraction=1.0, shuffle_buffer=0)
    used = Counter(k for _, _, batch in stream for k in batch)
    # Only every third sample has a webp member: the others are unusable and counted as such.
    assert set(used) == {key_of(s, i) for s, size in enumerate(USER_SHARD_SIZES) for i in range(size) if i % 3 == 2}
    stats = stream.epoch_stats()
    assert stats["corrupt_skipped"] == stats["samples_lost"] == 128 - len(used)


@more_workers_than_cores
@pytest.mark.timeout(300)
def test_two_real_ranks_with_two_workers_each_see_every_sample_at_most_once(own, tmp_path):
    """Unlabelled shards (the pretraining case), 2 gloo ranks x 2 DataLoader workers, 2 epochs
    (the shard order differs, so shards are cut in other places), an all_reduce per step."""
    root, keys = own
    directory = root / "None"
    if not (directory / "shards.json").exists():
        assert cli_main(["index-shards", str(directory)]) == 0
    world, workers = 2, 2
    ranks = run_on_ranks(train_epochs_on_rank, world, str(directory), BATCH, workers, 2)
    for epoch in (0, 1):
        results = [ranks[0][epoch], ranks[1][epoch]]
        assert results[0]["all_steps"] == [results[0]["len"]] * world == [128 // (world * BATCH)] * world
        assert all(r["steps"] == r["len"] for r in results) and results[0]["labels_seen"] == [-1]
        seen = Counter(k for r in results for k in r["keys"])
        assert max(seen.values()) == 1 and set(seen) == keys  # 128 = 16 steps x 4 x 2: nothing dropped
        assert results[0]["dropped"] == 0
    assert ranks[0][0]["keys"] != ranks[0][1]["keys"]


@pytest.mark.parametrize("seed", range(6))
def test_exact_plan_covers_the_epoch_at_sample_granularity_whatever_the_shards(seed):
    """The plan alone, over random shard sets (tiny, huge, empty shards, fewer shards than
    readers): equal steps, every reader's share a disjoint run of the epoch's sample sequence,
    fewer than world x batch samples left out."""
    rng = random.Random(seed)
    for _ in range(40):
        sizes = [rng.choice([0, 1, 3, rng.randint(1, 60), rng.randint(100, 400)]) for _ in range(rng.randint(1, 9))]
        world, workers, batch = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 16)
        if sum(sizes) < world * batch:
            continue
        plan = EpochShardPlan(sizes, epoch=rng.randint(0, 9), seed=seed, world_size=world, num_workers=workers,
                              batch_size=batch)
        assert plan.steps_per_epoch == sum(sizes) // (world * batch)
        assert 0 <= plan.samples_dropped < world * batch
        taken = Counter()
        for rank in range(world):
            quotas = plan.batch_quotas(rank)
            assert sum(quotas) == plan.steps_per_epoch and max(quotas) - min(quotas) <= 1
            for worker in range(workers):
                segments = plan.reader_segments(rank, worker)
                assert sum(s.stop - s.start for s in segments) == quotas[worker] * batch
                for shard, start, stop in segments:
                    assert 0 <= start < stop <= sizes[shard]
                    taken.update((shard, member) for member in range(start, stop))
        assert max(taken.values(), default=1) == 1
        assert sum(taken.values()) == plan.steps_per_epoch * world * batch


@more_workers_than_cores
@pytest.mark.timeout(300)
def test_mid_epoch_resume_is_exact_when_readers_open_shards_at_sample_offsets(own):
    """The resume contract with parts of shards read by byte offsets: a stream that skips the
    first n batches yields bitwise the rest of the uninterrupted epoch, and no sample twice."""
    root, _ = own
    directory = root / "cls"
    if not (directory / "shards.json").exists():
        assert cli_main(["index-shards", str(directory)]) == 0
    assert all(shard.offsets for shard in ShardIndex.load(directory).shards)
    options = dict(rank=1, world_size=2, num_workers=2, seed=9, shuffle_buffer=20, return_keys=True)

    def epoch(skip=0):
        stream = ShardedImageStream(directory, BATCH, pixels_as_tensor, **options)
        stream.set_epoch(3)
        if skip:
            stream.skip_batches(skip)
        return [(images, keys) for images, _, keys in stream], stream

    full, _ = epoch()
    for skip in (3, 9):
        rest, stream = epoch(skip)
        assert [keys for _, keys in rest] == [keys for _, keys in full[skip:]]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, full[skip:]))
        before = {k for _, keys in full[:skip] for k in keys}
        assert not before & {k for _, keys in rest for k in keys}
        assert stream.epoch_stats()["resume_samples_reread"] <= skip * BATCH
