"""A short fit tracked by a real MLflow server on 127.0.0.1: params, metrics, config artifact and
loss plot read back through the client; a resumed fit continues the same run."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from scale_ssl.cli.main import main
from tests.test_cli import CONFIG, tiny_overrides


@pytest.mark.timeout(300)
def test_fit_logs_to_a_real_server_and_resume_continues_the_run(mlflow_server, fmnist_shards, tmp_path):
    common = [
        *tiny_overrides(fmnist_shards, tmp_path),
        "trainer.log_every_n_steps=2",
        "trainer.num_threads=1",
        f"tracking.tracking_uri={mlflow_server}",
        "tracking.experiment_name=fit_test",
        "tracking.run_name=short_fit",
    ]
    assert main(["fit", "--config", CONFIG, *common, "trainer.max_steps=4"]) == 0

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    run_id = ckpt["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "short_fit"
    params = run.data.params
    assert params["trainer.max_steps"] == "4"
    assert params["model.arch"] == "resnet10"
    assert params["derived.world_size"] == "1"
    assert params["derived.per_device_batch_size"] == "32"
    assert params["derived.negatives_per_anchor"] == "62"
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4]
    assert all(0 < m.value < 10 for m in losses)
    assert {m.key for m in client.get_metric_history(run_id, "images_per_s")} == {"images_per_s"}
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "config")} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert "config/resolved_config.yaml" in artifacts
    assert "plots/loss_curve.png" in artifacts

    # Resume from the checkpoint: the same run continues, no step is logged twice.
    assert main(["fit", "--config", CONFIG, *common, "trainer.max_steps=6", "trainer.ckpt_path=last"]) == 0
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["mlflow_run_id"] == run_id and resumed["global_step"] == 6
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [2, 4, 6]
    assert client.get_run(run_id).info.status == "FINISHED"
    experiment = client.get_experiment_by_name("fit_test")
    assert len(client.search_runs([experiment.experiment_id])) == 1
