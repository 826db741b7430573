"""Experiment tracking in MLflow for a distributed trainer.

Rules this logger keeps, and why:

* **Only rank 0 talks to MLflow.** Every other rank gets an object whose methods return at once,
  so N processes never open N connections or create N runs; the trainer need not guard calls.
* **Nothing happens at construction.** The client, the experiment and the run are created on the
  first call that needs them, so building a trainer (or a logger on a rank that never logs) is
  cheap and works without a reachable server.
* **Resume continues the same run.** ``MLflowLogger(run_id=...)`` appends to an existing run
  instead of opening a new one (docs/ARCHITECTURE.md, contract 6). Re-logging the hyperparameters of the
  resumed run is harmless; a changed value is kept as a tag, because MLflow refuses to overwrite
  a param and a tracking quirk must not kill a week-long job.
* **Local runs stay in one folder.** Without a tracking URI the store is
  ``sqlite:///<default_root_dir>/mlflow.db`` and artifacts go to ``<default_root_dir>/mlartifacts``
  (MLflow would otherwise write them to ``./mlruns`` in whatever directory the job started from).

* **A tracking outage never stops training.** When the server is down or answers 5xx, metrics
  are kept in a bounded buffer (``max_buffered_metrics``; the oldest are dropped past it, and
  counted) and resent, oldest first, at most every ``retry_interval_s`` and at ``finalize``; one
  warning per outage, one line when it is over. Metric requests make a single short attempt
  (``request_timeout_s``, no MLflow-side retries): the buffer is the retry, so a dead server
  costs a step at most that long. Params, tags and artifacts that fail during an outage are
  skipped under the same single warning. A 4xx answer (a bad value, not an outage) drops that
  batch with its own warning rather than retrying it forever.

All MLflow access goes through :class:`mlflow.tracking.MlflowClient` (not the fluent
``mlflow.start_run`` API), so no process-global "active run" is touched.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from scale_ssl.tracking.curve_plot import curve_figure
from scale_ssl.tracking.flatten import flatten_dict
from scale_ssl.tracking.mlflow_store import artifact_location, existing_run, experiment_id, sqlite_file
from scale_ssl.tracking.run_params import CHANGED_PARAM_TAG_PREFIX, TRUNCATED_PARAMS_TAG, ParamLedger  # noqa: F401  (re-exported)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_DICT_ARTIFACT_EXTENSIONS = (".json", ".yaml", ".yml")


class MLflowLogger:
    """Log params, metrics and artifacts of one training run to MLflow.

    Args:
        tracking_uri: where runs are stored, e.g. ``http://mlflow.internal:5000`` or
            ``sqlite:///runs/mlflow.db``. Falls back to ``$MLFLOW_TRACKING_URI``, then to
            ``sqlite:///<abs default_root_dir>/mlflow.db``.
        experiment_name: experiment to create the run in (created if missing). Ignored when
            ``run_id`` is given: a resumed run stays in its own experiment.
        run_name: display name of a new run (MLflow picks one if ``None``).
        run_id: an existing run to continue (resume) instead of creating a new one.
        tags: run tags; values are stringified.
        default_root_dir: folder of the local default store and of its artifacts.
        rank: the process's global rank; every rank but 0 makes no MLflow call at all.
        max_buffered_metrics: metric values kept while the server is unreachable.
        retry_interval_s: during an outage, how often sending is tried again.
        request_timeout_s: how long one metric request may take before it counts as failed.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "scale_ssl",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        default_root_dir: str | os.PathLike = "runs",
        rank: int = 0,
        max_buffered_metrics: int = 100_000,
        retry_interval_s: float = 10.0,
        request_timeout_s: float = 10.0,
    ):
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(
                f"MLflowLogger: rank must be an int >= 0 (the global rank), got {rank!r}"
            )
        if not isinstance(experiment_name, str) or not experiment_name.strip():
            raise ValueError(
                f"MLflowLogger: experiment_name must be a non-empty string, got {experiment_name!r}"
            )
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise ValueError(
                f"MLflowLogger: run_id must be the id string of an existing run, got {run_id!r}; "
                f"pass run_id=None to start a new run"
            )
        self.rank = rank
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags = {str(key): str(value) for key, value in (tags or {}).items()}
        self.default_root_dir = Path(default_root_dir).absolute()
        self.tracking_uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.default_root_dir / 'mlflow.db'}"
        )
        self._resume_run_id = run_id
        self._client = None
        self._run_id: str | None = None
        self._finalized = False
        self._params = ParamLedger()
        # Every metric value logged by this process, for plots: key -> [(step, value), ...].
        self._history: dict[str, list[tuple[int, float]]] = {}
        if not isinstance(max_buffered_metrics, int) or max_buffered_metrics < 1:
            raise ValueError(f"MLflowLogger: max_buffered_metrics must be an int >= 1, got {max_buffered_metrics!r}")
        self.max_buffered_metrics = max_buffered_metrics
        self.retry_interval_s = float(retry_interval_s)
        self.request_timeout_s = float(request_timeout_s)
        # Metrics not yet accepted by the server, oldest first; outage bookkeeping.
        self._pending: list = []
        self._outage_since: float | None = None
        self._last_attempt = 0.0
        self.dropped_metrics = 0
        self.outages = 0

    # ------------------------------------------------------------------ run lifecycle

    @property
    def run_id(self) -> str | None:
        """Id of the run being logged to; creates (or reopens) it on first access.

        On ranks other than 0 no run exists: returns the ``run_id`` passed in, else ``None``.
        """
        if self.rank != 0:
            return self._resume_run_id
        with self._tolerating_outage("the run id"):
            return self._ensure_run()
        return self._run_id or self._resume_run_id

    def continue_run(self, run_id: str) -> None:
        """Append to ``run_id`` instead of creating a run (the trainer calls this on resume with the
        id stored in the checkpoint). Must come before anything is logged."""
        if self._run_id is not None and self._run_id != run_id:
            raise RuntimeError(
                f"MLflowLogger: already logging to run {self._run_id!r}; cannot switch to {run_id!r} mid-run"
            )
        self._resume_run_id = run_id

    def finalize(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED).

        Idempotent: later calls do nothing, and a logger that never started a run does not
        create one just to end it.
        """
        if status not in RUN_STATUSES:
            raise ValueError(
                f"MLflowLogger.finalize: status must be one of {RUN_STATUSES}, got {status!r}"
            )
        if self.rank != 0 or self._finalized:
            return
        if self._pending:
            self._flush_metrics(force=True)
            if self._pending:
                warnings.warn(
                    f"MLflowLogger: {len(self._pending)} metric values could not be delivered to "
                    f"{redact_credentials(self.tracking_uri)!r} (server still unreachable at the end of the run)",
                    stacklevel=2,
                )
        if self._run_id is None:
            return
        with self._tolerating_outage("ending the run"):
            self._client.set_terminated(self._run_id, status=status)
            self._finalized = True

    def __enter__(self) -> MLflowLogger:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finalize("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finalize("KILLED")
        else:
            self.finalize("FAILED")

    def ui_command(self) -> str:
        """How a user looks at the runs: ``mlflow ui --backend-store-uri <store>`` for a store on
        this machine (sqlite, file, a database URL); for a tracking server, which serves the UI
        itself, the server's URL."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri
        return f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"

    # ------------------------------------------------------------------ params and metrics

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as run params: ``{"trainer": {"max_steps": 10}}`` is logged as
        ``trainer.max_steps = "10"``.

        Values are stringified and cut to MLflow's length limit (the cut keys are listed in the
        ``scale_ssl.truncated_params`` tag). Params are sent with ``log_batch`` in chunks of
        MLflow's per-request limit. A key already logged with the same value is skipped; with a
        different value (a resumed run with a changed config) it is warned about once and
        recorded as the tag ``scale_ssl.changed_param.<key>``, since MLflow params are
        write-once.
        """
        if self.rank != 0:
            return
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        # Credentials in URIs (http://user:token@host) never reach params: anyone who can read
        # the run could read them.
        flat = {key: redact_credentials(str(value)) for key, value in flatten_dict(params).items()}
        truncated = {key for key, value in flat.items() if len(value) > MAX_PARAM_VAL_LENGTH}
        for key in truncated:
            flat[key] = flat[key][:MAX_PARAM_VAL_LENGTH]
        with self._tolerating_outage("params"):
            self._log_params(flat, truncated)

    def _log_params(self, flat: dict[str, str], truncated: set[str]) -> None:
        run_id = self._ensure_run()
        params, tags, new = self._params.to_send(flat, truncated, lambda: self._client.get_run(run_id).data.params, run_id)
        self._log_batch(params=params, tags=tags)
        self._params.record(new)

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Log scalar metrics at ``step``. Tensors must hold one element (converted with
        ``.item()``); every value is also kept in memory for :meth:`log_metric_curves`."""
        if self.rank != 0:
            return
        from mlflow.entities import Metric

        if isinstance(step, bool):
            raise TypeError(f"MLflowLogger.log_metrics: step must be an int, got {step!r}")
        try:
            step = operator.index(step)  # accepts numpy / 0-d integer tensors, refuses floats
        except TypeError:
            raise TypeError(
                f"MLflowLogger.log_metrics: step must be an int, got {step!r}"
            ) from None
        timestamp_ms = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            number = _to_float(key, value)
            entries.append(Metric(key=key, value=number, timestamp=timestamp_ms, step=step))
        for entry in entries:
            self._history.setdefault(entry.key, []).append((step, entry.value))
        self._pending.extend(entries)
        overflow = len(self._pending) - self.max_buffered_metrics
        if overflow > 0:  # bounded: an endless outage must not grow memory without limit
            del self._pending[:overflow]
            self.dropped_metrics += overflow
        self._flush_metrics()

    def _flush_metrics(self, force: bool = False) -> None:
        """Send buffered metrics, oldest first, in MLflow-sized chunks; a chunk leaves the buffer
        only once the server accepted it. During an outage, try at most every retry_interval_s."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = time.monotonic()
        if self._outage_since is not None and not force and now - self._last_attempt < self.retry_interval_s:
            return
        self._last_attempt = now
        try:
            with _single_short_attempt(self.request_timeout_s):
                run_id = self._ensure_run()
                while self._pending:
                    chunk = self._pending[:MAX_METRICS_PER_BATCH]
                    try:
                        self._client.log_batch(run_id, metrics=chunk)
                    except Exception as error:
                        if _is_outage(error):
                            raise
                        warnings.warn(
                            f"MLflowLogger: the server refused {len(chunk)} metric values "
                            f"({_first_line(error)}); they are dropped",
                            stacklevel=3,
                        )
                    del self._pending[: len(chunk)]
        except Exception as error:
            if not _is_outage(error):
                raise
            self._enter_outage(error)
            return
        self._leave_outage()

    def _enter_outage(self, error: BaseException) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        self.outages += 1
        warnings.warn(
            f"MLflowLogger: tracking server {redact_credentials(self.tracking_uri)!r} is unreachable ({_first_line(error)}); "
            f"training continues, metrics are buffered (up to {self.max_buffered_metrics}) and resent every "
            f"{self.retry_interval_s:g} s; this is the only warning for this outage",
            stacklevel=4,
        )

    def _leave_outage(self) -> None:
        if self._outage_since is None:
            return
        seconds = time.monotonic() - self._outage_since
        self._outage_since = None
        dropped = f"; {self.dropped_metrics} values were dropped (buffer full)" if self.dropped_metrics else ""
        print(f"MLflowLogger: tracking server {redact_credentials(self.tracking_uri)!r} is back after {seconds:.0f} s; "
              f"buffered metrics delivered{dropped}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _tolerating_outage(self, what: str):
        """Run an MLflow call; if the server is unreachable, note the outage (one warning) and go on."""
        try:
            yield
        except Exception as error:
            if not _is_outage(error):
                raise
            self._enter_outage(error)

    # ------------------------------------------------------------------ artifacts

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (a run-relative path, e.g.
        ``"config/resolved.txt"``)."""
        if self.rank != 0:
            return
        with self._tolerating_outage(f"artifact {artifact_file}"):
            self._client.log_text(self._ensure_run(), text, artifact_file)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Store ``dictionary`` as YAML (``.yaml``/``.yml``) or JSON (``.json``), chosen by the
        extension of ``artifact_file``. Nested mappings such as OmegaConf configs are converted to
        plain dicts first; values YAML/JSON cannot represent are stringified."""
        if not str(artifact_file).lower().endswith(_DICT_ARTIFACT_EXTENSIONS):
            raise ValueError(
                f"MLflowLogger.log_dict: artifact_file={artifact_file!r} must end in one of "
                f"{_DICT_ARTIFACT_EXTENSIONS} (the extension picks the format)"
            )
        if self.rank != 0:
            return
        with self._tolerating_outage(f"artifact {artifact_file}"):
            self._client.log_dict(self._ensure_run(), _to_plain_data(dictionary), artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path`` (the run's artifact
        root if ``None``)."""
        if self.rank != 0:
            return
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(
                f"MLflowLogger.log_artifact: local_path={str(local_path)!r} does not exist"
            )
        with self._tolerating_outage(f"artifact {local_path}"):
            run_id = self._ensure_run()
            if path.is_dir():
                self._client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(run_id, str(path), artifact_path)

    def log_metric_curves(
        self,
        keys: Sequence[str] = ("train/loss",),
        artifact_file: str = "plots/loss_curve.png",
    ) -> None:
        """Plot value against step for each metric in ``keys`` (one line each) with matplotlib's
        Agg backend and upload the image as ``artifact_file``.

        Uses the values this process logged; for a resumed run the history already in MLflow is
        merged in, so the curve covers the whole run. Keys never logged are skipped with a
        warning (a missing plot must not stop training).
        """
        if self.rank != 0:
            return
        if isinstance(keys, str):
            keys = (keys,)
        with self._tolerating_outage("the metric plot"):
            self._plot_curves(keys, artifact_file)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of metric ``key`` in this run, sorted by step: what MLflow holds
        for a continued run (``run_id`` given), merged with this process's own values. Empty on
        other ranks and while the server is unreachable."""
        if self.rank != 0:
            return []
        with self._tolerating_outage("the metric history"):
            self._ensure_run()
            return self._metric_series(key)
        return []

    def _plot_curves(self, keys: Sequence[str], artifact_file: str) -> None:
        self._ensure_run()
        series = {key: self._metric_series(key) for key in keys}
        missing = [key for key, points in series.items() if not points]
        if missing:
            warnings.warn(
                f"MLflowLogger.log_metric_curves: no values logged for {missing}; not plotted",
                stacklevel=2,
            )
        series = {key: points for key, points in series.items() if points}
        if not series:
            return

        figure = curve_figure(series)
        self._client.log_figure(self._run_id, figure, artifact_file)

    # ------------------------------------------------------------------ internals

    def _connect(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            sqlite_path = sqlite_file(self.tracking_uri)
            if sqlite_path is not None:
                # sqlite creates the file but not its folder.
                Path(sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _ensure_run(self) -> str:
        if self._run_id is not None:
            return self._run_id
        client = self._connect()
        if self._resume_run_id is None:
            experiment = experiment_id(client, self.experiment_name, artifact_location(self.tracking_uri, self.default_root_dir))
            run = client.create_run(experiment, run_name=self.run_name, tags=self.tags)
            self._run_id = run.info.run_id
            return self._run_id

        run = existing_run(client, self.tracking_uri, self._resume_run_id)
        self._run_id = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(self._run_id, status="RUNNING")
        if self.tags:
            from mlflow.entities import RunTag

            self._log_batch(tags=[RunTag(key, value) for key, value in self.tags.items()])
        return self._run_id

    def _log_batch(
        self, metrics: Sequence = (), params: Sequence = (), tags: Sequence = ()
    ) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        run_id = self._ensure_run()
        for chunk in _chunks(list(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, params=chunk)
        for chunk in _chunks(list(tags), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, tags=chunk)
        for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=chunk)

    def _metric_series(self, key: str) -> list[tuple[int, float]]:
        by_step: dict[int, float] = {}
        if self._resume_run_id is not None:
            for metric in self._client.get_metric_history(self._run_id, key):
                by_step[metric.step] = metric.value
        # This process's values win where a resumed run re-logged steps it had logged before.
        for step, value in self._history.get(key, []):
            by_step[step] = value
        return sorted(by_step.items())

    def __repr__(self) -> str:
        return (
            f"MLflowLogger(tracking_uri={redact_credentials(self.tracking_uri)!r}, "
            f"experiment_name={self.experiment_name!r}, "
            f"run_id={self._run_id or self._resume_run_id!r}, rank={self.rank})"
        )


class NullLogger:
    """The logger used for ``logger=False``: the interface of :class:`MLflowLogger`, doing
    nothing."""

    run_id = None

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_metric_curves(
        self, keys: Sequence[str] = ("train/loss",), artifact_file: str = "plots/loss_curve.png"
    ) -> None:
        pass

    def finalize(self, status: str = "FINISHED") -> None:
        pass

    def ui_command(self) -> str | None:
        """``None``: nothing was tracked."""
        return None

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        pass


def _is_outage(error: BaseException) -> bool:
    """Unreachable or failing server (connection errors, timeouts, 5xx), as opposed to a request
    the server refused (4xx), which retrying would not fix."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500
    try:
        import requests

        if isinstance(error, requests.exceptions.RequestException):
            return True
    except ImportError:
        pass
    return isinstance(error, (ConnectionError, TimeoutError))


@contextlib.contextmanager
def _single_short_attempt(timeout_s: float):
    """One HTTP attempt with a short timeout for the calls inside (MLflow reads these settings
    per request); the logger's buffer does the retrying."""
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s)))}
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(error: BaseException) -> str:
    text = redact_credentials(str(error).strip())
    return text.splitlines()[0][:200] if text else type(error).__name__


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"log_metrics: metric {key!r} is a tensor of shape {tuple(value.shape)}; log a "
                f"scalar (reduce it first, e.g. .mean())"
            )
        return float(value.detach().item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"log_metrics: metric {key!r} must be a number or a one-element tensor, got "
            f"{type(value).__name__}"
        ) from None


def _to_plain_data(value: Any) -> Any:
    """Mappings to dicts, sequences to lists, scalars kept, anything else stringified."""
    if isinstance(value, Mapping):
        return {str(key): _to_plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain_data(item) for item in value]
    if isinstance(value, str):
        return redact_credentials(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact_credentials(str(value))


_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_credentials(text: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://***@host/...`` (for params, artifacts, logs)."""
    return _URI_CREDENTIALS.sub(r"\g<scheme>***@", text)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
