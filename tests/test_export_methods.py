"""``scale-ssl export`` for every method with a ResNet encoder: SimCLR, SwAV and SimSiam (``arch``),
MoCo v2 and BYOL (``base_encoder``: pl_bolts' name), AMDIM (``encoder=<resnet>``: the trunk under
its feature-map heads) and CPC v2 (``encoder_name=<resnet>``: the ResNet applied to each patch).
The exported file loads with ``strict=True`` into torchvision's ResNet and computes the same
features as the method's own encoder; a non-ResNet encoder is one clear error."""

from __future__ import annotations

import json

import pytest
import torch

from scale_ssl.cli.main import EXIT_BAD_INPUT, main
from scale_ssl.eval.export import torchvision_resnet
from scale_ssl.methods import AMDIM, BYOL, CPCV2, MoCoV2, SimCLR, SimSiam, SwAV
from scale_ssl.checkpoint.files import CHECKPOINT_FORMAT_VERSION, save_checkpoint_file
from scale_ssl.trainer.seed import seed_everything

STEM = dict(in_channels=1, first_conv=True, maxpool1=False)
# name -> (build the method, the ResNet inside it, an input for that ResNet)
CASES = {
    "simclr": (lambda: SimCLR(arch="resnet10", hidden_mlp=16, feat_dim=8, **STEM), lambda m: m.encoder, (2, 1, 28, 28)),
    "swav": (lambda: SwAV(arch="resnet10", hidden_mlp=16, feat_dim=8, num_prototypes=5, **STEM),
             lambda m: m.encoder, (2, 1, 28, 28)),
    "simsiam": (lambda: SimSiam(arch="resnet10", hidden_mlp=16, feat_dim=8, predictor_hidden_dim=4, **STEM),
                lambda m: m.encoder, (2, 1, 28, 28)),
    "moco": (lambda: MoCoV2(base_encoder="resnet10", emb_dim=8, num_negatives=16, **STEM), lambda m: m.encoder,
             (2, 1, 28, 28)),
    "byol": (lambda: BYOL(base_encoder="resnet10", encoder_out_dim=512, projector_hidden_dim=16, projector_out_dim=8, **STEM),
             lambda m: m.encoder, (2, 1, 28, 28)),
    "amdim": (lambda: AMDIM(encoder="resnet10", image_channels=1, image_height=28, embedding_fx_dim=16),
              lambda m: m.encoder.trunk, (2, 1, 28, 28)),
    "cpc_v2": (lambda: CPCV2(encoder_name="resnet10", image_channels=1, image_height=28, online_ft=False, target_dim=8),
               lambda m: m.encoder.patch_encoder, (6, 1, 8, 8)),
}


def write_checkpoint(module, path) -> None:
    save_checkpoint_file({"format_version": CHECKPOINT_FORMAT_VERSION, "module_class": type(module).__name__,
                          "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3},
                         str(path))


@pytest.mark.parametrize("method", sorted(CASES))
def test_export_writes_a_torchvision_resnet_with_the_methods_features(method, tmp_path):
    build, resnet_of, input_shape = CASES[method]
    seed_everything(0)
    module = build()
    with torch.no_grad():  # weights and BN statistics unlike any fresh initialisation
        for name, tensor in module.state_dict().items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
                if name.endswith("running_var"):
                    tensor.abs_()
    ckpt, out = tmp_path / "m.ckpt", tmp_path / "encoder.pt"
    write_checkpoint(module, ckpt)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--method", method]) == 0
    description = json.loads((tmp_path / "encoder.json").read_text())
    resnet = torchvision_resnet(description["arch"], description["in_channels"], description["first_conv"],
                                description["maxpool1"])
    resnet.load_state_dict(torch.load(out, weights_only=True), strict=True)
    # In float64: our encoder computes one-pixel convolutions as matrix products
    # (models/one_pixel_conv.py), torchvision as convolutions; the same function, summed in another
    # order, so in fp32 they part by rounding (~2e-6 here) and in float64 by ~1e-15.
    x = torch.randn(*input_shape, dtype=torch.float64)
    ours = resnet_of(module).eval().double()
    resnet.eval().double()
    torch.testing.assert_close(resnet(x), ours(x).flatten(start_dim=1), rtol=1e-10, atol=1e-12)
    assert description["method"] == type(module).__name__


def test_a_method_whose_encoder_is_not_a_resnet_says_so(tmp_path, capsys):
    seed_everything(0)
    module = AMDIM(image_channels=1, image_height=28, encoder_feature_dim=8, embedding_fx_dim=16, conv_block_depth=1)
    write_checkpoint(module, tmp_path / "m.ckpt")
    code = main(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "e.pt")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1
    assert "AMDIM was trained with encoder='amdim_encoder', which is not a ResNet" in err
    assert not (tmp_path / "e.pt").exists()
