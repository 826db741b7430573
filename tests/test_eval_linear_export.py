"""Supervised evaluation and export of a real pretraining checkpoint: ``scale-ssl eval linear`` on
real Fashion-MNIST shards beats chance and logs to a real MLflow server next to (and linked to) the
pretraining run; fine-tuning trains the encoder at the lower lr while the linear probe leaves it
untouched; ``scale-ssl export`` round-trips into torchvision's ResNet with identical outputs; a
checkpoint of another method or a truncated file is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from torch import nn

from scale_ssl import Trainer
from scale_ssl.cli.classifier_eval import PRETRAINING_RUN_TAG
from scale_ssl.cli.main import EXIT_BAD_INPUT, main
from scale_ssl.eval.classifier import EncoderClassifier
from scale_ssl.eval.export import export_encoder, torchvision_resnet
from scale_ssl.methods import SimCLR
from scale_ssl.checkpoint.files import save_checkpoint_file
from tests.test_cli import CONFIG, REPO, tiny_overrides


@pytest.fixture(scope="module")
def pretrained(fmnist_shards, mlflow_server, tmp_path_factory):
    """A 2-step SimCLR run made by ``scale-ssl fit``, tracked on the real MLflow server."""
    root = tmp_path_factory.mktemp("pretrain")
    argv = ["fit", "--config", CONFIG, *tiny_overrides(fmnist_shards, root), "trainer.max_steps=2", "trainer.num_threads=1",
            f"tracking.tracking_uri={mlflow_server}", "tracking.experiment_name=eval_linear_test"]  # fmt: skip
    assert main(argv) == 0
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.timeout(300)
def test_eval_linear_beats_chance_and_is_logged_beside_the_pretraining_run(pretrained, mlflow_server, capsys):
    argv = ["eval", "linear", "--ckpt", str(pretrained), "--max_steps", "12", "--batch_size", "64",
            "--learning_rate", "1.0", "--crop_min_scale", "0.5", "trainer.num_threads=1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    top1 = float(out.split("top-1 = ")[1].split(" %")[0]) / 100
    assert top1 > 0.2, out  # 10 classes: chance is 0.1

    pretrain_run = torch.load(pretrained, weights_only=True)["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("eval_linear_test")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{PRETRAINING_RUN_TAG}` = '{pretrain_run}'")
    assert len(runs) == 1, "the linear-eval run must be in the pretraining run's experiment, tagged with its id"
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == pretrain_run
    assert run.data.metrics["test/top1"] == pytest.approx(top1, abs=1e-4)
    assert 0 < run.data.metrics["test/top5"] <= 1 and run.data.metrics["test/samples"] == 600
    assert run.data.params["eval_linear.learning_rate"] == "1.0"
    assert client.get_run(pretrain_run).data.metrics["eval/linear_top1"] == pytest.approx(top1, abs=1e-4)


def _toy_batches(steps=3, size=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("freeze", [True, False])
def test_linear_probe_freezes_the_encoder_and_finetune_trains_it_at_the_lower_lr(freeze):
    torch.manual_seed(0)
    encoder = SimCLR(arch="resnet10", in_channels=1, maxpool1=False).encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    classifier = EncoderClassifier(encoder, 512, 10, freeze_encoder=freeze, learning_rate=0.3, nesterov=True,
                                   hidden_dim=None if freeze else 32)  # fmt: skip
    trainer = Trainer(strategy="single", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(classifier, _toy_batches())
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    if freeze:
        assert changed == []  # weights and BatchNorm running statistics untouched
        assert set(groups) == {"head"}
    else:
        assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)
        assert groups["encoder"]["initial_lr"] == pytest.approx(groups["head"]["initial_lr"] / 10)
        assert groups["head"]["nesterov"]


def test_export_round_trips_into_torchvision_resnet18(tmp_path, capsys):
    torch.manual_seed(0)
    model = SimCLR(arch="resnet18", in_channels=1, first_conv=False, maxpool1=False, hidden_mlp=32, feat_dim=16)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a missed buffer would show
        for module in model.encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "simclr.ckpt"
    save_checkpoint_file({"module_class": "SimCLR", "state_dict": model.state_dict(), "hyper_parameters": model.hparams,
                          "global_step": 7}, str(ckpt))  # fmt: skip
    out = tmp_path / "export" / "encoder.pt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--method", "simclr"]) == 0
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith(("fc.", "encoder.", "projection")) for k in state)

    # torchvision's own resnet18 with the stem changes build_resnet_encoder documents.
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference.fc = nn.Identity()
    reference.load_state_dict(state, strict=True)
    x = torch.randn(4, 1, 28, 28)
    model.encoder.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(reference(x), model.encoder(x))
    # The helper builds the same model; an unmodified fc loads with only fc.* missing.
    torchvision_resnet("resnet18", in_channels=1, first_conv=False, maxpool1=False).load_state_dict(state)
    with_fc = torchvision.models.resnet18(weights=None)
    with_fc.conv1, with_fc.maxpool = reference.conv1, nn.Identity()
    assert set(with_fc.load_state_dict(state, strict=False).missing_keys) == {"fc.weight", "fc.bias"}
    description = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert description["arch"] == "resnet18" and description["feature_dim"] == 512 and description["global_step"] == 7


def _error_line(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1 and err.startswith("scale-ssl: error: "), err
    return err


def test_checkpoint_of_another_method_or_truncated_file_is_one_clear_error(pretrained, tmp_path, capsys):
    err = _error_line(["export", "--ckpt", str(pretrained), "--out", str(tmp_path / "e.pt"), "--method", "moco"], capsys)
    assert "holds a SimCLR module, not moco" in err
    moco_config = f"{REPO}/configs/moco/fmnist_cpu.yaml"
    err = _error_line(["eval", "linear", "--ckpt", str(pretrained), "--config", moco_config, "--max_steps", "1"], capsys)
    assert "holds a SimCLR module, not MoCoV2" in err

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(pretrained.read_bytes()[:5000])
    for argv in (["export", "--ckpt", str(truncated), "--out", str(tmp_path / "e.pt")],
                 ["eval", "linear", "--ckpt", str(truncated), "--max_steps", "1"]):  # fmt: skip
        assert "truncated" in _error_line(argv, capsys)
    assert not (tmp_path / "e.pt").exists()
    with pytest.raises(ValueError, match="truncated"):
        export_encoder(truncated, tmp_path / "e.pt")
