"""MLflowLogger against a real MLflow server on loopback (and a real local sqlite store).

Nothing of MLflow is mocked: what the logger wrote is read back through ``MlflowClient``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from scale_ssl.tracking import MLflowLogger, NullLogger, flatten_dict
from scale_ssl.tracking.mlflow_logger import CHANGED_PARAM_TAG_PREFIX, TRUNCATED_PARAMS_TAG

# The real server fixture `mlflow_server`; registering by module name means a conftest that also
# lists it does not start a second server.

CONFIG = {
    "trainer": {"max_steps": 3, "precision": "bf16-mixed", "strategy": {"name": "ddp", "nodes": 2}},
    "optimizer": {"name": "lars", "lr": 0.3},
    "crop_scale": [0.08, 1.0],
    "seed": 7,
}
EXPECTED_PARAMS = {
    "trainer.max_steps": "3",
    "trainer.precision": "bf16-mixed",
    "trainer.strategy.name": "ddp",
    "trainer.strategy.nodes": "2",
    "optimizer.name": "lars",
    "optimizer.lr": "0.3",
    "crop_scale": "[0.08, 1.0]",
    "seed": "7",
}
LOSSES = {0: 2.0, 1: 1.5, 2: 1.25}


def runs_in(client: MlflowClient, experiment_name: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, folder)}


def test_logs_params_metrics_artifacts_and_resumes_the_same_run(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    logger = MLflowLogger(
        tracking_uri=mlflow_server,
        experiment_name="roundtrip",
        run_name="first",
        tags={"team": "ssl"},
    )
    logger.log_hyperparams(CONFIG)
    for step, loss in LOSSES.items():
        logger.log_metrics({"train/loss": torch.tensor(loss), "lr": 0.1 * step}, step=step)
    logger.log_text("resolved config goes here", "config/notes.txt")
    logger.log_dict(CONFIG, "config/config.yaml")
    local_file = tmp_path / "extra.txt"
    local_file.write_text("an artifact from disk")
    logger.log_artifact(local_file, artifact_path="files")
    logger.log_metric_curves(keys=("train/loss",), artifact_file="plots/loss_curve.png")
    logger.finalize()
    logger.finalize()  # idempotent
    run_id = logger.run_id

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert run.data.tags["team"] == "ssl"
    assert run.data.params == EXPECTED_PARAMS
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(LOSSES.items())
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [0, 1, 2]
    assert artifact_paths(client, run_id) == {"config", "files", "plots"}
    assert artifact_paths(client, run_id, "config") == {"config/notes.txt", "config/config.yaml"}
    assert artifact_paths(client, run_id, "files") == {"files/extra.txt"}
    assert artifact_paths(client, run_id, "plots") == {"plots/loss_curve.png"}
    png = Path(client.download_artifacts(run_id, "plots/loss_curve.png", str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG")
    config_copy = Path(client.download_artifacts(run_id, "config/config.yaml", str(tmp_path)))
    assert "max_steps: 3" in config_copy.read_text()

    # Resume: same params again are accepted, metrics append to the same run, no new run appears.
    resumed = MLflowLogger(tracking_uri=mlflow_server, run_id=run_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re-logging identical params must not even warn
        resumed.log_hyperparams(CONFIG)
    resumed.log_metrics({"train/loss": 1.0}, step=3)
    resumed.log_metric_curves()
    resumed.finalize()
    assert resumed.run_id == run_id
    assert len(runs_in(client, "roundtrip")) == 1
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [*LOSSES.items(), (3, 1.0)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_changed_param_on_resume_warns_once_and_is_kept_as_tag(mlflow_server):
    client = MlflowClient(mlflow_server)
    first = MLflowLogger(tracking_uri=mlflow_server, experiment_name="changed_params")
    first.log_hyperparams({"optimizer": {"lr": 0.3}, "seed": 1})
    first.finalize("KILLED")

    resumed = MLflowLogger(tracking_uri=mlflow_server, run_id=first.run_id)
    with pytest.warns(UserWarning, match=r"optimizer\.lr"):
        resumed.log_hyperparams({"optimizer": {"lr": 0.6}, "seed": 1, "new_key": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.log_hyperparams({"optimizer": {"lr": 0.6}})  # already warned about
    assert client.get_run(first.run_id).info.status == "RUNNING"  # resumed runs are reopened
    resumed.finalize()

    run = client.get_run(first.run_id)
    assert run.data.params == {"optimizer.lr": "0.3", "seed": "1", "new_key": "x"}
    assert run.data.tags[CHANGED_PARAM_TAG_PREFIX + "optimizer.lr"] == "0.6"


def test_long_values_are_truncated_and_many_params_are_batched(mlflow_server):
    client = MlflowClient(mlflow_server)
    logger = MLflowLogger(tracking_uri=mlflow_server, experiment_name="big_config")
    many = {f"layer{i:03d}": {"width": i} for i in range(250)}  # more than one 100-param batch
    logger.log_hyperparams({"notes": "x" * (MAX_PARAM_VAL_LENGTH + 10), **many})
    logger.finalize()

    run = client.get_run(logger.run_id)
    assert len(run.data.params) == 251
    assert run.data.params["layer249.width"] == "249"
    assert run.data.params["notes"] == "x" * MAX_PARAM_VAL_LENGTH
    assert run.data.tags[TRUNCATED_PARAMS_TAG] == "notes"


def test_only_rank_zero_creates_a_run(mlflow_server):
    client = MlflowClient(mlflow_server)
    name = "rank_check"
    MLflowLogger(tracking_uri=mlflow_server, experiment_name=name).log_metrics({"a": 1.0}, step=0)
    before = len(runs_in(client, name))

    other_rank = MLflowLogger(tracking_uri=mlflow_server, experiment_name=name, rank=1)
    other_rank.log_hyperparams(CONFIG)
    other_rank.log_metrics({"train/loss": 1.0}, step=0)
    other_rank.log_text("x", "x.txt")
    other_rank.log_dict({"a": 1}, "a.json")
    other_rank.log_metric_curves()
    other_rank.finalize()
    assert other_rank.run_id is None
    assert len(runs_in(client, name)) == before == 1


def test_construction_and_other_ranks_never_connect():
    # Nothing listens on port 1: any connection attempt would fail.
    unreachable = "http://127.0.0.1:1"
    MLflowLogger(tracking_uri=unreachable)
    other_rank = MLflowLogger(tracking_uri=unreachable, rank=3, run_id="abc")
    other_rank.log_hyperparams({"a": 1})
    other_rank.log_metrics({"loss": torch.tensor(1.0)}, step=1)
    other_rank.finalize("FAILED")
    assert other_rank.run_id == "abc"
    assert other_rank.ui_command() == unreachable


def test_default_local_sqlite_store_without_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow wrote to the cwd would show up here
    root = tmp_path / "runs"
    with MLflowLogger(experiment_name="local", default_root_dir=root) as logger:
        logger.log_hyperparams({"trainer": {"max_steps": 2}})
        logger.log_metrics({"train/loss": 0.5}, step=0)
        logger.log_metric_curves()
    assert (root / "mlflow.db").is_file()
    assert (root / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    assert logger.tracking_uri == f"sqlite:///{root / 'mlflow.db'}"
    assert logger.ui_command() == f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}"

    client = MlflowClient(logger.tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((root / "mlartifacts").as_uri())
    assert run.data.params == {"trainer.max_steps": "2"}
    assert list((root / "mlartifacts").rglob("loss_curve.png"))

    # A failing `with` block marks the run FAILED.
    with pytest.raises(RuntimeError, match="boom"):
        with MLflowLogger(experiment_name="local", default_root_dir=root) as failing:
            failing.log_metrics({"train/loss": 1.0}, step=0)
            raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"


def test_clear_errors():
    with pytest.raises(ValueError, match="rank"):
        MLflowLogger(rank=-1)
    with pytest.raises(ValueError, match="status"):
        MLflowLogger(rank=1).finalize("DONE")
    with pytest.raises(ValueError, match="artifact_file"):
        MLflowLogger(rank=1).log_dict({"a": 1}, "config.toml")


def test_metric_values_and_run_id_are_checked(mlflow_server):
    logger = MLflowLogger(tracking_uri=mlflow_server, experiment_name="checks")
    with pytest.raises(ValueError, match="'train/loss'.*shape"):
        logger.log_metrics({"train/loss": torch.ones(3)}, step=0)
    with pytest.raises(TypeError, match="step"):
        logger.log_metrics({"train/loss": 1.0}, step=1.5)
    with pytest.raises(ValueError, match="run_id='missing'"):
        MLflowLogger(tracking_uri=logger.tracking_uri, run_id="missing").log_metrics(
            {"a": 1.0}, step=0
        )


def test_null_logger_accepts_every_call():
    logger = NullLogger()
    logger.log_hyperparams(CONFIG)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_text("x", "x.txt")
    logger.log_dict({}, "x.json")
    logger.log_artifact("does-not-matter")
    logger.log_metric_curves()
    logger.finalize()
    assert logger.run_id is None and logger.ui_command() is None


def test_flatten_dict():
    flat = flatten_dict(CONFIG)
    assert flat["trainer.strategy.nodes"] == 2 and flat["crop_scale"] == [0.08, 1.0]
    assert {key: str(value) for key, value in flat.items()} == EXPECTED_PARAMS
    assert flatten_dict({"a": {}}) == {"a": {}}
    with pytest.raises(ValueError, match="'a.b'"):
        flatten_dict({"a.b": 1, "a": {"b": 2}})
    with pytest.raises(TypeError, match="mapping"):
        flatten_dict([1, 2])
