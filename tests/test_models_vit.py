"""ViT encoders: torchvision's model loads what ``scale-ssl export`` writes (and computes the same
features), the position embedding serves other crop sizes, stochastic depth drops residual
branches per sample in training only (and never in an EMA target), mean pooling, the ViT under
every method class that takes one, and clear errors where a method or option cannot take one."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from scale_ssl.cli.main import main
from scale_ssl.methods import AMDIM, BYOL, CPCV2, MoCoV2, SimCLR, SimSiam, SwAV
from scale_ssl.methods.ema import frozen_copy
from scale_ssl.models import build_encoder, build_vit_encoder, torchvision_vit
from scale_ssl.checkpoint.files import save_checkpoint_file
from scale_ssl.trainer import Trainer
from scale_ssl.trainer.seed import seed_everything

MINI = {"image_size": 16}


def _export(tmp_path, model, method: str):
    ckpt = tmp_path / f"{method}.ckpt"
    save_checkpoint_file({"module_class": type(model).__name__, "state_dict": model.state_dict(),
                          "hyper_parameters": model.hparams, "global_step": 3}, str(ckpt))  # fmt: skip
    out = tmp_path / "export" / "encoder.pt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--method", method]) == 0
    return torch.load(out, weights_only=True), json.loads((tmp_path / "export" / "encoder.json").read_text())


def test_export_of_vit_b_32_loads_into_torchvision_and_gives_the_same_features(tmp_path):
    # torchvision's own ViT-B/32, at 64 px so the forward stays cheap (4 patches + the class token).
    seed_everything(0)
    model = SimCLR(arch="vit_b_32", encoder_options={"image_size": 64}, hidden_mlp=32, feat_dim=16)
    with torch.no_grad():  # non-zero class token and biases, so a key that failed to load would show
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state, description = _export(tmp_path, model, "simclr")
    assert not any(k.startswith("heads") for k in state)
    reference = torchvision.models.vit_b_32(weights=None, image_size=64)
    # the unmodified torchvision model (with its classifier) loads it with only the head missing
    assert set(reference.load_state_dict(state, strict=False).missing_keys) == {"heads.head.weight", "heads.head.bias"}
    reference.heads = nn.Identity()
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    reference.eval(), model.encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model.encoder(x), rtol=0, atol=1e-6)
    assert (description["arch"], description["image_size"], description["patch_size"], description["feature_dim"]) == (
        "vit_b_32", 64, 32, 768)
    assert description["load_with"].startswith("model = torchvision.models.vit_b_32(weights=None, image_size=64)")


def test_export_of_a_grayscale_mini_vit_from_byol_loads_into_the_torchvision_helper(tmp_path):
    seed_everything(1)
    model = BYOL(base_encoder="vit_mini_4", in_channels=1, encoder_out_dim=None, encoder_options={"image_size": 28},
                 projector_hidden_dim=32, projector_out_dim=16)
    state, description = _export(tmp_path, model, "byol")
    reference = torchvision_vit("vit_mini_4", in_channels=1, image_size=28)
    assert isinstance(reference, torchvision.models.VisionTransformer)
    reference.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 28, 28)
    reference.eval(), model.encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model.encoder(x), rtol=0, atol=1e-6)
    assert "scale_ssl.models.torchvision_vit('vit_mini_4', in_channels=1, image_size=28)" in description["load_with"]


def test_position_embedding_is_resized_for_other_crop_sizes():
    seed_everything(2)
    encoder, dim = build_vit_encoder("vit_mini_4", in_channels=1, image_size=28)
    encoder.eval()
    assert encoder.position_embedding(7, 7) is encoder.encoder.pos_embedding  # the stored grid: untouched
    small = encoder.position_embedding(3, 3)
    assert small.shape == (1, 1 + 9, dim)
    assert torch.equal(small[:, 0], encoder.encoder.pos_embedding[:, 0])  # the class token's is never resized
    # a constant embedding stays constant whatever the grid (bicubic interpolation of a flat field)
    with torch.no_grad():
        encoder.encoder.pos_embedding.fill_(0.5)
    torch.testing.assert_close(encoder.position_embedding(4, 5), torch.full((1, 21, dim), 0.5))
    assert encoder(torch.randn(2, 1, 12, 16)).shape == (2, dim)
    with pytest.raises(ValueError, match="does not split into 4x4 patches; use crop sizes divisible by 4"):
        encoder(torch.randn(2, 1, 14, 14))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, H, W\)"):
        encoder(torch.randn(2, 3, 28, 28))


def test_stochastic_depth_drops_branches_in_training_only_and_never_in_an_ema_target():
    seed_everything(3)
    encoder, _ = build_vit_encoder("vit_mini_4", in_channels=1, image_size=16, drop_path_rate=0.5)
    rates = [block.drop_path.p for block in encoder.encoder.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # linear from 0 to the rate, as DeiT/DINO
    x = torch.randn(8, 1, 16, 16)
    encoder.train()
    first, second = encoder(x), encoder(x)
    assert not torch.allclose(first, second)  # a different set of branches dropped per call
    encoder.eval()
    assert torch.equal(encoder(x), encoder(x))
    # the same weights without drop path give the eval output in training mode too
    target = frozen_copy(encoder).train()
    assert all(block.drop_path.p == 0.0 for block in target.encoder.layers)
    assert all(block.drop_path.p > 0 for block in list(encoder.encoder.layers)[1:])  # the online one keeps it
    torch.testing.assert_close(target(x), encoder(x))


def test_mean_pooling_averages_the_patch_tokens():
    seed_everything(4)
    encoder, _ = build_vit_encoder("vit_mini_4", in_channels=1, image_size=16, pool="mean")
    encoder.eval()
    x = torch.randn(2, 1, 16, 16)
    tokens = encoder.forward_tokens(x)
    torch.testing.assert_close(encoder(x), tokens[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="pool='max'; use one of"):
        build_vit_encoder("vit_mini_4", pool="max")


def _batches(crop_sizes, steps=2, b=4):
    g = torch.Generator().manual_seed(5)
    return [(tuple(torch.randn(b, 1, s, s, generator=g) for s in crop_sizes), torch.zeros(b, dtype=torch.long))
            for _ in range(steps)]


VIT_METHODS = {
    "simclr": (lambda: SimCLR(arch="vit_mini_4", in_channels=1, encoder_options=MINI, hidden_mlp=32, feat_dim=16,
                              optimizer="adamw", warmup_steps=0), (16, 16)),
    "byol": (lambda: BYOL(base_encoder="vit_mini_4", in_channels=1, encoder_out_dim=None, encoder_options=MINI,
                          projector_hidden_dim=32, projector_out_dim=16, optimizer="adamw", warmup_steps=0), (16, 16)),
    "simsiam": (lambda: SimSiam(arch="vit_mini_4", in_channels=1, encoder_options=MINI, hidden_mlp=32, feat_dim=16,
                                predictor_hidden_dim=8, optimizer="adamw", warmup_steps=0), (16, 16)),
    # MoCo with a ViT: momentum encoder + queue, no shuffling BN (nothing to shuffle)
    "moco": (lambda: MoCoV2(base_encoder="vit_mini_4", in_channels=1, encoder_options=MINI, emb_dim=16, num_negatives=8,
                            shuffle_bn=False, use_mlp=True, optimizer="adamw", learning_rate=1e-3), (16, 16)),
    # SwAV's multi-crop: 16 px global crops and 8 px local crops through one position embedding
    "swav": (lambda: SwAV(arch="vit_mini_4", in_channels=1, encoder_options=MINI, hidden_mlp=32, feat_dim=16,
                          num_prototypes=10, num_crops=(2, 2), freeze_prototypes_epochs=0, warmup_steps=0), (16, 16, 8, 8)),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(VIT_METHODS))
def test_vit_trains_under_every_method_class_that_takes_one(name):
    seed_everything(6)
    make, sizes = VIT_METHODS[name]
    model = make()
    assert isinstance(model.encoder, torchvision.models.VisionTransformer)
    start = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    trainer = Trainer(strategy="single", max_steps=2, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(model, _batches(sizes))
    losses = [row["train/loss"] for row in trainer.history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert "conv_proj.weight" in moved and "encoder.layers.encoder_layer_5.mlp.3.weight" in moved


def test_methods_that_cannot_take_a_vit_say_why():
    with pytest.raises(ValueError, match="AMDIM contrasts a convolutional encoder's feature maps at several spatial"):
        AMDIM(encoder="vit_s_16")
    with pytest.raises(ValueError, match="CPC v2 encodes every small patch of its grid on its own"):
        CPCV2(encoder_name="vit_mini_4")
    with pytest.raises(ValueError, match="has no BatchNorm .*set model.shuffle_bn=false"):
        MoCoV2(base_encoder="vit_mini_4", in_channels=1, encoder_options=MINI)
    # with a BatchNorm in the key path (sync_bn requested, or a ResNet) MoCo keeps its shuffle
    MoCoV2(base_encoder="resnet10", in_channels=1, emb_dim=8, num_negatives=8)


def test_bad_encoder_arguments_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="SimCLR: first_conv=False is a ResNet stem option.*leave model.first_conv unset"):
        SimCLR(arch="vit_mini_4", first_conv=False)
    with pytest.raises(ValueError, match="unknown ViT arch 'vit_xl_16': write vit_<size>_<patch>"):
        build_encoder("vit_xl_16")
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of the patch size 4; set model.encoder_options"):
        build_encoder("vit_mini_4", options={"image_size": 30})
    with pytest.raises(ValueError, match=r"model.encoder_options has \['drop_path'\].*valid: \['image_size'"):
        build_encoder("vit_mini_4", options={"drop_path": 0.1})
    with pytest.raises(ValueError, match=r"model.encoder_options has \['image_size'\], which arch='resnet10' does not take"):
        build_encoder("resnet10", options={"image_size": 28})
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        build_encoder("vit_mini_4", options={"drop_path_rate": 1.5})
