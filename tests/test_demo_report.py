"""What `make demo` shows a user: the summary every fit ends with, the linear probe on frozen
features, and `scale-ssl eval report` (encoder vs raw pixels vs random init, logged to MLflow)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from scale_ssl.cli.main import main
from scale_ssl.eval.feature_probe import probe_features, standardise
from tests.test_cli import CONFIG, tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the probe on fixed features


def _blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    """Gaussian blobs around class centres that depend only on (classes, dim): train and test
    drawn with different seeds share them."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(classes * 1000 + dim)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_probe_learns_separable_classes_and_scores_only_the_test_rows():
    train, test = _blobs(80, 4, 16, 0.5, seed=1), _blobs(40, 4, 16, 0.5, seed=2)
    scores = probe_features(train, test, num_classes=4, epochs=3, batch_size=64)
    assert scores["linear_top1"] > 0.97 and scores["linear_top5"] == 1.0
    # The same features with labels that carry no information: close to chance (1/4), not memorised.
    shuffled = (test[0], test[1][torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(0))])
    assert probe_features(train, shuffled, num_classes=4, epochs=3, batch_size=64)["linear_top1"] < 0.45


def test_probe_is_repeatable_and_blind_to_the_features_scale():
    train, test = _blobs(100, 5, 32, 3.0, seed=3), _blobs(40, 5, 32, 3.0, seed=4)
    first = probe_features(train, test, num_classes=5, epochs=2, batch_size=50)
    torch.manual_seed(1234)  # the caller's random state must not change the probe
    assert probe_features(train, test, num_classes=5, epochs=2, batch_size=50) == first
    # Standardisation: each dimension scaled (by 1e-3 .. 1e3) and shifted gives the same probe, up to
    # rounding; one lr then means the same for raw pixels and for any encoder's features.
    scale = 10 ** torch.linspace(-3, 3, train[0].shape[1])
    scaled = probe_features((train[0] * scale + 7, train[1]), (test[0] * scale + 7, test[1]), 5, epochs=2, batch_size=50)
    assert abs(scaled["linear_top1"] - first["linear_top1"]) <= 1 / len(test[1])


def test_standardise_uses_train_statistics_only():
    train, test = torch.tensor([[0.0, 5.0], [2.0, 5.0]]), torch.tensor([[4.0, 6.0]])
    x, tx = standardise(train, test)
    assert torch.allclose(x, torch.tensor([[-0.7071, 0.0], [0.7071, 0.0]]), atol=1e-4)
    assert torch.allclose(tx, torch.tensor([[2.1213, 1e6]]), rtol=1e-4)  # constant dim: std floored at 1e-6


def test_probe_refuses_mismatched_inputs_by_name():
    train, test = _blobs(40, 2, 8, 1.0, seed=5), _blobs(10, 2, 6, 1.0, seed=6)
    with pytest.raises(ValueError, match="train features have 8 dimensions, test 6"):
        probe_features(train, test, 2, batch_size=16)
    with pytest.raises(ValueError, match="fewer than one batch of 256"):
        probe_features(train, _blobs(10, 2, 8, 1.0, seed=6), 2)


def test_quality_benchmark_uses_the_package_probe():
    """The benchmark's table and the demo's report are one protocol: the benchmark calls this probe."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "quality_fmnist.py")
    spec = importlib.util.spec_from_file_location("quality_fmnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.probe_features is probe_features


# ---------------------------------------------------------------- fit summary and report, real runs


@pytest.fixture(scope="module")
def demo_fit(fmnist_shards, tmp_path_factory):
    """A real 4-step fit through the CLI, tracked in the default sqlite store of its root dir."""
    root = tmp_path_factory.mktemp("demo_fit")
    overrides = [*tiny_overrides(fmnist_shards, root), "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                 "trainer.num_threads=1", "tracking.experiment_name=demo_test", "eval.knn_k=20"]
    return root, overrides


@pytest.mark.timeout(300)
def test_every_fit_ends_with_a_summary_a_user_can_act_on(demo_fit, capsys):
    root, overrides = demo_fit
    assert main(["fit", "--config", CONFIG, *overrides]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("scale_ssl fit: done"):]
    assert summary.startswith("scale_ssl fit: done, 4 steps in "), summary

    checkpoint_path = root / "checkpoints" / "last.ckpt"
    assert f"last checkpoint : {checkpoint_path.absolute()}" in summary
    run_id = torch.load(checkpoint_path, weights_only=True)["mlflow_run_id"]
    store = f"sqlite:///{root.absolute() / 'mlflow.db'}"
    assert f"MLflow run      : {run_id} at {store}" in summary
    assert f"open it with    : mlflow ui --backend-store-uri {store}" in summary

    client = MlflowClient(store)
    last_loss = client.get_metric_history(run_id, "train/loss")[-1]
    assert last_loss.step == 4
    assert f"final loss      : {last_loss.value:.4f}" in summary
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "images_per_s")}
    shown = re.search(r"images/s        : ([\d.]+) \(median", summary).group(1)
    assert sorted(rates) == [2, 4] and shown == f"{rates[4]:.1f}"  # the first window (start-up) left out


@pytest.mark.timeout(300)
def test_fit_summary_without_tracking_or_checkpoint_says_so(fmnist_shards, tmp_path, capsys):
    overrides = [*tiny_overrides(fmnist_shards, tmp_path), "trainer.max_steps=2", "trainer.num_threads=1",
                 "tracking.enabled=false"]
    assert main(["fit", "--config", CONFIG, *overrides]) == 0
    summary = capsys.readouterr().out.split("scale_ssl fit: done")[1]
    assert "MLflow run      : none (tracking.enabled=false)" in summary
    assert str((tmp_path / "checkpoints" / "last.ckpt").absolute()) in summary


@pytest.mark.timeout(400)
def test_report_scores_encoder_and_baselines_and_logs_table_and_figures(demo_fit, capsys):
    root, overrides = demo_fit
    checkpoint_path = root / "checkpoints" / "last.ckpt"
    if not checkpoint_path.exists():  # run alone: make the fit the summary test makes
        assert main(["fit", "--config", CONFIG, *overrides]) == 0
    capsys.readouterr()
    assert main(["eval", "report", "--ckpt", str(checkpoint_path), "eval.knn_k=20"]) == 0
    out = capsys.readouterr().out
    for row in ("simclr encoder (step 4)", "raw pixels", "random-init encoder (same arch)",
                "margin over raw pixels", "margin over random-init encoder (same arch)"):
        assert f"| {row} |" in out, out
    assert "both baselines on both measures" in out

    run_id = torch.load(checkpoint_path, weights_only=True)["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{root.absolute() / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("ssl_encoder", "raw_pixels", "random_init_encoder"):
        for measure in ("knn_top1", "linear_top1", "linear_top5"):
            assert 0.0 < metrics[f"eval/{measure}/{name}"] <= 1.0
    # The table printed is the table logged: margins are the differences of the logged figures.
    margin = metrics["eval/linear_top1/ssl_encoder"] - metrics["eval/linear_top1/raw_pixels"]
    assert metrics["eval/margin_linear_top1/raw_pixels"] == pytest.approx(margin)
    assert f"| margin over raw pixels | {100 * (metrics['eval/knn_top1/ssl_encoder'] - metrics['eval/knn_top1/raw_pixels']):+.2f} | {100 * margin:+.2f} |" in out
    assert client.get_metric_history(run_id, "eval/knn_top1/ssl_encoder")[0].step == 4

    artifacts = {a.path for a in client.list_artifacts(run_id, "report")}
    assert artifacts >= {"report/report.md", "report/scores.json", "report/training_curves.png",
                         "report/scores_step_4.png", "report/test_embedding_pca.png"}, artifacts
    local = client.download_artifacts(run_id, "report", str(root / "downloaded"))
    for picture in ("training_curves.png", "scores_step_4.png", "test_embedding_pca.png"):
        with open(os.path.join(local, picture), "rb") as handle:
            data = handle.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, picture
    with open(os.path.join(local, "scores.json")) as handle:
        scores = json.load(handle)["scores"]
    assert scores["ssl_encoder"]["knn_top1"] == pytest.approx(metrics["eval/knn_top1/ssl_encoder"])
