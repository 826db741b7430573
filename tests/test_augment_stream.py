"""The views in the real pipeline: decoding (OpenCV, reduced JPEG sizes, truncated files),
real JPEG shards streamed through ``ShardedImageStream`` on both paths, and an exact resume of
``Trainer.fit`` with ``augment_on="device"`` (the device's random choices come from the stream's
per-sample seeds, so the resumed run ends with bitwise the weights of the uninterrupted one)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

from scale_ssl.data import EncodedImage, ShardedImageStream, SimCLRViews, write_image_shards
from scale_ssl.data.decode import decode_image, jpeg_size, reduction_for
from scale_ssl.methods import SimCLR
from scale_ssl.trainer import Callback, Trainer
from tests._data_images import corrupt_jpeg, photo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jpeg(image: PIL.Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def test_jpegs_decode_to_pils_pixels_and_size():
    encoded = jpeg(photo().resize((300, 240)))
    reference = np.asarray(PIL.Image.open(io.BytesIO(encoded)).convert("RGB"))
    assert np.array_equal(decode_image(encoded, 3), reference)  # the same libjpeg-turbo decode
    gray = decode_image(encoded, 1)
    luma = np.asarray(PIL.Image.open(io.BytesIO(encoded)).convert("L")).astype(int)
    # OpenCV takes the JPEG's own luma plane; PIL recomputes it from RGB: a level or two apart.
    assert gray.shape == (240, 300) and np.abs(gray - luma).mean() < 0.5
    assert jpeg_size(encoded) == (240, 300)
    assert jpeg_size(jpeg(photo().resize((123, 77)), progressive=True)) == (77, 123)
    png = io.BytesIO()
    photo().resize((50, 40)).save(png, format="PNG")
    assert decode_image(png.getvalue(), 3).shape == (40, 50, 3)  # other formats: PIL


def test_a_truncated_jpeg_raises_instead_of_decoding_grey_rows():
    with pytest.raises(OSError):
        decode_image(corrupt_jpeg(jpeg(photo().resize((200, 160)))), 3)


def test_jpegs_decode_reduced_only_when_every_view_keeps_its_resolution():
    big = jpeg(photo().resize((2000, 1500)))
    # MoCo v2's smallest crop of a 2000 x 1500 image: sqrt(0.2 x 3e6 x 3/4) = 671 px for 224 px
    # views: half resolution (335 px) still suffices, a quarter (168 px) would not.
    moco = SimCLRViews(224, 3, MEAN, STD, crop_scale=(0.2, 1.0))
    assert moco.decode(big).shape == (750, 1000, 3)
    # SimCLR's 0.08 crops need every pixel (424 px at full size, 212 at half).
    simclr = SimCLRViews(224, 3, MEAN, STD)
    assert simclr.decode(big).shape == (1500, 2000, 3)
    assert reduction_for(1500, 2000, simclr._min_crop_side) == 1
    small_views = SimCLRViews(32, 3, MEAN, STD, crop_scale=(0.5, 1.0))
    assert small_views.decode(big).shape == (188, 250, 3)  # 1/8, the most DCT scaling gives


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """Real JPEG crops of a photograph in 3 shards of 8; one of them cut in half."""
    out = tmp_path_factory.mktemp("photo_shards") / "shards"
    source = photo()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        left, top = int(rng.integers(0, 200)), int(rng.integers(0, 250))
        data = jpeg(source.crop((left, top, left + 180, top + 150)))
        samples.append((f"img-{i:03d}", EncodedImage(corrupt_jpeg(data) if i == 5 else data, "jpg"), i % 3))
    write_image_shards(samples, out, shard_size=8, classes=["a", "b", "c"])
    return out


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_jpeg_shards_stream_through_both_paths(photo_shards, augment_on):
    views = SimCLRViews(64, 3, MEAN, STD, augment_on=augment_on)
    stream = ShardedImageStream(photo_shards, 4, views, rank=0, world_size=1, num_workers=1, seed=3,
                                max_corrupt_fraction=0.1)
    batches = list(stream)
    assert len(batches) == 6 and stream.epoch_stats()["corrupt_skipped"] == 1  # the cut JPEG is caught
    (first, second), labels = batches[0]
    if augment_on == "device":
        assert first[0].dtype == torch.uint8 and first[0].shape == (4, 3, 64, 64) and first[1].shape == (4, 18)
        first, second = views.device_augmentation()(((first, second), labels))[0]
    assert first.dtype == torch.float32 and first.shape == (4, 3, 64, 64) and not torch.equal(first, second)


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def _fit_on_device_views(shards, root, stop_at=None, resume=False, steps=5):
    torch.manual_seed(0)
    views = SimCLRViews(32, 3, MEAN, STD, blur=True, augment_on="device")
    stream = ShardedImageStream(shards, 4, views, rank=0, world_size=1, num_workers=1, seed=9,
                                max_corrupt_fraction=0.2)
    module = SimCLR(arch="resnet10", first_conv=False, maxpool1=False, hidden_mlp=32, feat_dim=16,
                    optimizer="sgd", learning_rate=0.1, warmup_steps=1)
    module.batch_augmentation = views.device_augmentation()
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch[0][0].clone())  # what the step received: float views, finished on device

    callbacks = [Record()] + ([StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(strategy="single", max_steps=steps, logger=False, enable_progress_bar=False,
                      default_root_dir=str(root), callbacks=callbacks, seed=0)
    trainer.fit(module, stream, ckpt_path="last" if resume else None)
    return module, seen, trainer.global_step


@pytest.mark.timeout(300)
def test_fit_with_device_augmentation_resumes_exactly(photo_shards, tmp_path):
    straight, straight_views, steps = _fit_on_device_views(photo_shards, tmp_path / "straight")
    assert steps == 5 and straight_views[0].dtype == torch.float32 and straight_views[0].shape == (4, 3, 32, 32)
    assert not any(key.startswith("batch_augmentation") for key in straight.state_dict())  # no checkpoint state
    _, before, _ = _fit_on_device_views(photo_shards, tmp_path / "stopped", stop_at=2)
    resumed, after, _ = _fit_on_device_views(photo_shards, tmp_path / "stopped", resume=True)
    assert len(before) == 2 and len(after) == 3
    for mine, reference in zip(before + after, straight_views):
        assert torch.equal(mine, reference)  # the device's random choices replayed exactly
    for (name, value), (_, reference) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert torch.equal(value, reference), name


@pytest.mark.timeout(300)
def test_scale_ssl_fit_with_augment_on_device_finishes_views_on_the_module(photo_shards, tmp_path):
    from scale_ssl.cli.fit import run_fit
    from scale_ssl.config import load_config

    config = load_config("configs/simclr/fmnist_cpu.yaml", [
        f"data.train_shards={photo_shards}", "data.val_shards=null", "data.channels=3", "data.image_size=32",
        "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]", "data.augment_on=device",
        "data.num_workers=0", "data.max_corrupt_fraction=0.2", "model.in_channels=3", "trainer.strategy=single",
        "trainer.global_batch_size=4", "trainer.max_steps=2", "tracking.enabled=false",
        f"trainer.default_root_dir={tmp_path}",
    ])
    trainer, module = run_fit(config)
    assert trainer.global_step == 2
    assert type(module.batch_augmentation).__name__ == "DeviceViewAugment"
