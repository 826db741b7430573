"""Damaged shards cost only what the damage touched: the tar reader resynchronises on the next
valid header, the stream counts every lost sample in one figure, index-shards reports the damage,
and past ``data.max_corrupt_fraction`` a real ``scale-ssl fit`` ends with one error line, exit 2,
and the last good checkpoint untouched."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from scale_ssl.data import FASHION_MNIST_ROOT, ShardedImageStream, ShardIndex, load_fashion_mnist, write_image_shards
from scale_ssl.data.tar_members import TarDamage, iter_tar_entries
from tests._dist_workers_data import pixels_as_tensor

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "simclr" / "fmnist_cpu.yaml"
SHARD_SIZE = 500
DAMAGE = 2048


# -- the tar reader ----------------------------------------------------------------------------
def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, list[int], list[int]]:
    """A GNU tar of ``members``; with each member's header offset and data end."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        infos = tar.getmembers()
    return raw, [i.offset for i in infos], [i.offset_data + i.size for i in infos]


def _members(count: int = 40) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1)
    return [(f"sample{i:03d}.{'jpg' if i % 2 == 0 else 'cls'}", rng.bytes(int(rng.integers(1, 3000)))) for i in range(count)]


def _read(raw: bytes, **options):
    entries, damage = [], []
    for item in iter_tar_entries(io.BytesIO(raw), **options):
        if isinstance(item, TarDamage):
            damage.append(item)
        else:
            entries.append((item.name, item.read(), item.offset))
    return entries, damage


def test_a_flipped_bit_in_a_header_loses_that_member_only_and_is_reported():
    members = _members()
    raw, offsets, _ = _tar(members)
    damaged = bytearray(raw)
    damaged[offsets[7] + 3] ^= 0x10
    entries, damage = _read(bytes(damaged))
    assert [name for name, _, _ in entries] == [name for i, (name, _) in enumerate(members) if i != 7]
    assert [data for _, data, _ in entries] == [data for i, (_, data) in enumerate(members) if i != 7]
    assert damage == [TarDamage(offsets[7], offsets[8], "bad header checksum at byte %d" % offsets[7])]


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_over_2kb_cost_exactly_the_members_they_touch(seed):
    members = _members()
    raw, offsets, ends = _tar(members)
    rng = np.random.default_rng(seed)
    start = int(rng.integers(offsets[3], offsets[-4]))
    damaged = bytearray(raw)
    damaged[start:start + DAMAGE] = rng.bytes(DAMAGE)
    entries, damage = _read(bytes(damaged))
    read = {name: data for name, data, _ in entries}
    for i, (name, data) in enumerate(members):
        header_hit = offsets[i] + 512 > start and offsets[i] < start + DAMAGE
        data_hit = ends[i] > start and offsets[i] + 512 < start + DAMAGE
        if header_hit:
            assert name not in read, f"{name}'s header was overwritten, yet it was read"
        else:
            assert name in read, f"{name} was lost though the damage missed its header"
            assert (read[name] == data) != data_hit or len(data) == 0
    assert len(damage) <= 1 and all(d.resumed_at in offsets for d in damage)


def test_a_zeroed_stretch_inside_the_archive_is_damage_not_its_end():
    members = _members(12)
    raw, offsets, _ = _tar(members)
    damaged = bytearray(raw)
    damaged[offsets[5]:offsets[7]] = bytes(offsets[7] - offsets[5])
    entries, damage = _read(bytes(damaged))
    assert [name for name, _, _ in entries] == [name for i, (name, _) in enumerate(members) if i not in (5, 6)]
    assert damage[0].offset == offsets[5] and damage[0].resumed_at == offsets[7]
    with pytest.raises(tarfile.ReadError, match="ends inside the data"):  # truncation is not damage
        _read(raw[: offsets[9] + 600])


def test_reading_from_one_record_to_another_yields_exactly_those_members():
    members = _members(20)
    raw, offsets, _ = _tar(members)
    stream = io.BytesIO(raw)
    stream.seek(offsets[6])
    entries = iter_tar_entries(stream, offset=offsets[6], stop_offset=offsets[13])
    assert [(e.name, e.offset) for e in entries] == [(members[i][0], offsets[i]) for i in range(6, 13)]
    assert entries.reached_stop


# -- the stream on the case: 2 Fashion-MNIST shards of 500, 2 KB overwritten mid-shard ---
@pytest.fixture(scope="module")
def fmnist_pair(tmp_path_factory):
    images, labels = load_fashion_mnist("test", FASHION_MNIST_ROOT)
    out = tmp_path_factory.mktemp("damage") / "clean"
    samples = [(f"img-{i:04d}", PIL.Image.fromarray(images[i]), int(labels[i])) for i in range(2 * SHARD_SIZE)]
    index = write_image_shards(samples, out, shard_size=SHARD_SIZE, classes=[str(c) for c in range(10)])
    return out, index


def damage_copy(clean: Path, target: Path, seed: int = 5) -> tuple[int, set[str]]:
    """Copy the shards and overwrite 2 KB in the middle of shard 0 with random bytes; returns the
    damaged byte range's start and the samples whose bytes (headers or data) it touches."""
    shutil.copytree(clean, target)
    shard = target / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    start = len(raw) // 2
    raw[start:start + DAMAGE] = np.random.default_rng(seed).bytes(DAMAGE)
    shard.write_bytes(bytes(raw))
    info = ShardIndex.load(clean).shards[0]
    bounds = [*info.offsets, info.bytes]
    touched = {f"img-{i:04d}" for i in range(SHARD_SIZE) if bounds[i] < start + DAMAGE and bounds[i + 1] > start}
    return start, touched


def stream_all_ranks(source, world=2, workers=2, **options):
    """Every rank's epoch 0: the keys seen (with repeats: padded slots), the summed stats, the
    step counts."""
    seen, totals, steps = Counter(), Counter(), set()
    for rank in range(world):
        options = {"max_corrupt_fraction": 0.05, **options}
        stream = ShardedImageStream(source, 10, pixels_as_tensor, rank=rank, world_size=world, num_workers=workers,
                                    return_keys=True, seed=3, **options)
        batches = [keys for _, _, keys in stream]
        steps.add(len(batches))
        seen.update(k for keys in batches for k in keys)
        totals.update({k: v for k, v in stream.epoch_stats().items() if k in ("samples_lost", "samples_missing")})
    totals["samples_dropped"] = stream.samples_dropped_per_epoch
    return seen, totals, steps


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("offsets", ["seek to sample offsets", "count from the shard's start"])
def test_2kb_overwritten_mid_shard_loses_only_the_samples_in_the_damaged_blocks(fmnist_pair, tmp_path, offsets):
    clean, _ = fmnist_pair
    damaged = tmp_path / "damaged"
    start, touched = damage_copy(clean, damaged)
    assert 1 <= len(touched) <= 4
    if offsets != "seek to sample offsets":
        index = json.loads((damaged / "shards.json").read_text())
        for shard in index["shards"]:
            del shard["offsets"]
        (damaged / "shards.json").write_text(json.dumps(index))
    # 1000 samples, 2 ranks x 2 workers x batch 10: readers own 250 samples each, so the damaged
    # middle of shard 0 is where two readers' parts meet: neither may take the other's samples.
    seen, totals, steps = stream_all_ranks(damaged, shuffle_buffer=0)
    lost = totals["samples_lost"]
    assert len(steps) == 1 and totals["samples_dropped"] == 0
    # Batch slots of lost samples are filled with copies of others in the batch: count unique keys.
    everything = {f"img-{i:04d}" for i in range(2 * SHARD_SIZE)}
    assert set(seen) == everything - touched, f"lost {sorted(everything - set(seen))}, damage touched {sorted(touched)}"
    assert lost == len(touched)
    assert sum(seen.values()) == 2 * SHARD_SIZE  # every slot of every batch filled
    assert sum(count - 1 for count in seen.values()) == len(touched)


@pytest.mark.timeout(300)
def test_index_shards_reports_the_damage_and_indexes_what_is_readable(fmnist_pair, tmp_path, capsys):
    from scale_ssl.cli.main import main

    clean, _ = fmnist_pair
    damaged = tmp_path / "damaged"
    start, touched = damage_copy(clean, damaged)
    (damaged / "shards.json").unlink()
    capsys.readouterr()
    assert main(["index-shards", str(damaged)]) == 0
    out = capsys.readouterr()
    problems = [line for line in out.err.splitlines() if "problem:" in line]
    assert any("shard-000000.tar: damaged tar at byte" in line and "resynchronised at byte" in line
               for line in problems), out.err
    assert not any("shard-000001.tar" in line for line in problems)
    index = ShardIndex.load(damaged)
    # Samples the damage removed whole are not counted (a sample cut in two, or whose image bytes
    # were overwritten, still is, and the stream will find it unusable).
    assert SHARD_SIZE - len(touched) <= index.shards[0].num_samples < SHARD_SIZE
    assert index.shards[1].num_samples == SHARD_SIZE
    seen, totals, _ = stream_all_ranks(damaged, world=1, workers=1, shuffle_buffer=0)
    assert set(seen) <= {f"img-{i:04d}" for i in range(2 * SHARD_SIZE)} - touched
    # Nothing is missing any more (the index counts what is there); only the cut ones are lost.
    assert totals["samples_missing"] == 0 and totals["samples_lost"] <= len(touched)
    assert len(set(seen)) + totals["samples_lost"] + totals["samples_dropped"] == index.num_samples


@pytest.mark.timeout(120)
def test_a_shard_that_grew_after_indexing_is_a_stale_index_error_and_one_cut_short_loses_its_tail(fmnist_pair, tmp_path):
    from scale_ssl.data import ShardIndexMismatchError

    clean, index = fmnist_pair
    grown, cut = tmp_path / "grown", tmp_path / "cut"
    shutil.copytree(clean, grown)
    with open(grown / "shard-000001.tar", "ab") as shard:
        shard.write(bytes(10240))  # e.g. re-written with more samples: the offsets no longer hold
    with pytest.raises(ShardIndexMismatchError, match=r"shard-000001\.tar is \d+ bytes but its index lists \d+.*index-shards"):
        stream_all_ranks(grown, world=1, workers=0)
    shutil.copytree(clean, cut)
    shard = cut / "shard-000001.tar"
    keep = index.shards[1].offsets[400]
    shard.write_bytes(shard.read_bytes()[:keep + 100])  # cut inside sample 400
    seen, totals, _ = stream_all_ranks(cut, world=2, workers=1, max_corrupt_fraction=0.5)
    # The sample before the cut is whole, but nothing after it says so (a tar has no sample
    # boundaries): it may be lost with the cut ones.
    assert {f"img-{i:04d}" for i in range(899)} <= set(seen) <= {f"img-{i:04d}" for i in range(900)}
    assert totals["samples_lost"] == totals["samples_missing"] == 1000 - len(set(seen))


# -- a real CLI run past the bound ----------------------------------------------------------------
def _fit_args(shards: Path, root: Path, **extra) -> list[str]:
    settings = {
        "trainer.strategy": "single", "trainer.max_steps": 2, "trainer.global_batch_size": 32,
        "trainer.precision": "32", "trainer.enable_progress_bar": "false", "trainer.log_every_n_steps": 1,
        "trainer.default_root_dir": str(root), "trainer.num_threads": 1, "data.train_shards": str(shards),
        "data.val_shards": "null", "data.num_workers": 1, "data.shuffle_buffer": 0, "model.arch": "resnet10",
        "model.hidden_mlp": 64, "model.feat_dim": 32, "tracking.enabled": "false",
    }
    settings.update(extra)
    return ["fit", "--config", str(CONFIG), *(f"{k}={v}" for k, v in settings.items())]


@pytest.mark.timeout(600)
def test_past_max_corrupt_fraction_a_real_fit_ends_with_one_error_line_and_the_checkpoint_untouched(
        fmnist_pair, tmp_path):
    clean, _ = fmnist_pair
    shards = tmp_path / "shards"
    shutil.copytree(clean, shards)
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SCALE_SSL_TRACEBACK", None)
    first = subprocess.run([sys.executable, "-m", "scale_ssl.cli.main", *_fit_args(shards, root)],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = root / "checkpoints" / "last.ckpt"
    good = checkpoint.read_bytes()

    shutil.rmtree(shards)
    damage_copy(clean, shards)
    resumed = subprocess.run(
        [sys.executable, "-m", "scale_ssl.cli.main",
         *_fit_args(shards, root, **{"trainer.max_steps": 40, "trainer.ckpt_path": "last",
                                     "trainer.checkpoint_every_n_steps": 0, "data.max_corrupt_fraction": 0.001})],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    lines = resumed.stderr.strip().splitlines()
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("scale-ssl: error: "), resumed.stderr[-3000:]
    assert "shard-000000.tar" in lines[0] and "data.max_corrupt_fraction" in lines[0]
    assert "Traceback" not in resumed.stderr
    assert checkpoint.read_bytes() == good
