"""Finding the pieces of an MLflow store a logger writes to: the experiment (created once, also
when several jobs race to create it), a run to continue, and where a local store keeps artifacts."""

from __future__ import annotations

from pathlib import Path


def existing_run(client, tracking_uri: str, run_id: str):
    """The run ``run_id`` of the store, refused with the way out when missing or deleted."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ValueError(
            f"MLflowLogger: run_id={run_id!r} was not found in the tracking store "
            f"{tracking_uri!r} ({error.message}); check the id and tracking_uri, or pass "
            f"run_id=None to start a new run"
        ) from error
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflowLogger: run_id={run_id!r} is deleted; restore it with "
            f"MlflowClient({tracking_uri!r}).restore_run({run_id!r}) or pass run_id=None"
        )
    return run


def experiment_id(client, experiment_name: str, location: str | None) -> str:
    """The id of ``experiment_name``, created (with ``location`` for its artifacts) if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            return client.create_experiment(
                experiment_name, artifact_location=location
            )
        except MlflowException as error:
            # Another job may have created it between our lookup and create.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(experiment_name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflowLogger: experiment_name={experiment_name!r} is a deleted experiment; "
            f"restore it (MlflowClient().restore_experiment({experiment.experiment_id!r})) or "
            f"choose another experiment_name"
        )
    return experiment.experiment_id


def artifact_location(tracking_uri: str, root: Path) -> str | None:
    # Only a local sqlite store needs one: a tracking server has its own artifact root, and a
    # shared database's runs must not point at one machine's disk.
    if sqlite_file(tracking_uri) is None:
        return None
    return (root / "mlartifacts").as_uri()


def sqlite_file(tracking_uri: str) -> str | None:
    """The database path of a ``sqlite:///path`` URI, else ``None``."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else path
