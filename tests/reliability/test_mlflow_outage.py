"""The MLflow server goes down mid-fit and comes back: training never stops, one warning is given,
metrics logged meanwhile are buffered and delivered, and at the end the run holds every step."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer import Callback, Trainer
from tests.mlflow_server import _stop_process_group, _wait_until_healthy, free_port, mlflow_executable
from tests.reliability._modules import FaultyRegressor, regression_batches


class RestartableMlflowServer:
    """``mlflow server`` on a fixed port and sqlite store, so it can be stopped and started again
    as the same server (what a restarted tracking host looks like to a client)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        command = [mlflow_executable(), "server", "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
                   "--artifacts-destination", str(self.directory / "artifacts"), "--workers", "1",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)
        stderr_path = self.directory / "server.stderr"
        with open(self.directory / "server.stdout", "ab") as out, open(stderr_path, "ab") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=self.directory,
                                            start_new_session=True)
        _wait_until_healthy(self.process, self.url, stderr_path)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _stop_process_group(self.process)


class OutageDuringFit(Callback):
    def __init__(self, server: RestartableMlflowServer, down_after: int, up_after: int):
        self.server, self.down_after, self.up_after = server, down_after, up_after

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.down_after:
            self.server.stop()
        elif batch_idx == self.up_after:
            self.server.start()


@pytest.mark.timeout(180)
def test_server_down_mid_fit_loses_no_metric_and_warns_once(tmp_path):
    server = RestartableMlflowServer(tmp_path)
    server.start()
    try:
        logger = MLflowLogger(tracking_uri=server.url, experiment_name="outage", retry_interval_s=0.5,
                              request_timeout_s=2.0, default_root_dir=tmp_path)
        trainer = Trainer(max_steps=12, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                          enable_checkpointing=False, callbacks=[OutageDuringFit(server, down_after=2, up_after=7)],
                          default_root_dir=str(tmp_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(FaultyRegressor(), regression_batches(12))
        outage_warnings = [w for w in caught if "is unreachable" in str(w.message)]
        assert len(outage_warnings) == 1, [str(w.message) for w in caught]
        assert logger.outages == 1 and logger.dropped_metrics == 0

        client = MlflowClient(server.url)
        run = client.get_run(logger.run_id)
        assert run.info.status == "FINISHED"
        logged = {m.step: m.value for m in client.get_metric_history(logger.run_id, "train/loss")}
        expected = {row["step"]: row["train/loss"] for row in trainer.history if "train/loss" in row}
        assert sorted(logged) == list(range(1, 13)) and logged == pytest.approx(expected)
    finally:
        server.stop()


def test_buffer_is_bounded_and_counts_what_it_drops(tmp_path):
    logger = MLflowLogger(tracking_uri=f"http://127.0.0.1:{free_port()}", max_buffered_metrics=5,
                          retry_interval_s=3600, request_timeout_s=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            logger.log_metrics({"loss": float(step)}, step=step)  # no server at all: never raises
        logger.finalize("FINISHED")
    assert len([w for w in caught if "is unreachable" in str(w.message)]) == 1
    assert [m.step for m in logger._pending] == [3, 4, 5, 6, 7] and logger.dropped_metrics == 3
    assert any("could not be delivered" in str(w.message) for w in caught)
