"""Credentials in a tracking URI (``http://user:token@host``) never reach MLflow params,
artifacts, warnings or the logger's repr, checked against a real server."""

from __future__ import annotations

import warnings

from mlflow.tracking import MlflowClient

from scale_ssl.tracking import MLflowLogger
from tests.mlflow_server import free_port


def test_tracking_credentials_are_not_logged(mlflow_server, tmp_path):
    secret_uri = mlflow_server.replace("http://", "http://alice:s3cr3t-token@")
    config = {"tracking": {"tracking_uri": secret_uri}, "data": {"train_shards": "s3://key:hidden@bucket/train"}}
    logger = MLflowLogger(tracking_uri=secret_uri, experiment_name="secrets", default_root_dir=tmp_path)
    logger.log_hyperparams(config)
    logger.log_dict(config, "config/resolved_config.yaml")
    logger.finalize("FINISHED")

    client = MlflowClient(mlflow_server)
    params = client.get_run(logger.run_id).data.params
    assert params["tracking.tracking_uri"].startswith("http://***@127.0.0.1:")
    artifact = client.download_artifacts(logger.run_id, "config/resolved_config.yaml", str(tmp_path))
    stored = open(artifact).read() + " ".join(params.values()) + repr(logger)
    assert "s3cr3t" not in stored and "hidden" not in stored and "***@" in stored

    down = MLflowLogger(tracking_uri=f"http://bob:pa55word@127.0.0.1:{free_port()}", request_timeout_s=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        down.log_metrics({"loss": 1.0}, step=1)
    assert caught and all("pa55word" not in str(w.message) for w in caught)
