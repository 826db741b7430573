"""A real MLflow tracking server on loopback, for tests that must not mock MLflow.

Use the fixture ``mlflow_server`` (one server per test session; register this module with
``pytest_plugins = ["tests.mlflow_server"]`` in ``conftest.py``), or the context manager
``running_mlflow_server(tmp_dir)`` for a server of your own.

The server runs in its own session (process group) so that stopping it also stops the gunicorn /
uvicorn workers it forks; it is stopped by its PID, never by a process name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; another process could still take
    it before the server binds, which is rare enough on a test machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_executable() -> str:
    """The ``mlflow`` script of the running interpreter's environment (the venv), else PATH's."""
    beside_python = Path(sys.executable).parent / "mlflow"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("mlflow")
    if found is None:
        raise RuntimeError(
            "mlflow_server: no `mlflow` executable found; install mlflow in this environment"
        )
    return found


@contextlib.contextmanager
def running_mlflow_server(tmp_dir: str | os.PathLike) -> Iterator[str]:
    """Start ``mlflow server`` (sqlite store and artifact folder under ``tmp_dir``), wait until
    ``GET /health`` answers, yield its URL ``http://127.0.0.1:PORT``, and stop it on exit."""
    tmp_dir = Path(tmp_dir).absolute()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stdout_path, stderr_path = tmp_dir / "server.stdout", tmp_dir / "server.stderr"
    command = [
        mlflow_executable(), "server",
        "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_dir / "artifacts"),
        "--workers", "1",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = dict(os.environ)
    # Background job runners need extra services and only slow the start-up down.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.pop("MLFLOW_TRACKING_URI", None)

    # Output goes to files, not pipes: a full pipe buffer would block a chatty server.
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, env=env, cwd=tmp_dir, start_new_session=True
        )
    try:
        _wait_until_healthy(process, url, stderr_path)
        yield url
    finally:
        _stop_process_group(process)


def _wait_until_healthy(process: subprocess.Popen, url: str, stderr_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {process.returncode} before answering "
                f"{url}/health; its stderr ends with:\n{_tail(stderr_path)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(
        f"mlflow server did not answer {url}/health within {STARTUP_TIMEOUT_S:.0f} s; "
        f"its stderr ends with:\n{_tail(stderr_path)}"
    )


def _stop_process_group(process: subprocess.Popen) -> None:
    # start_new_session=True made the server the leader of its own group: pgid == pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    # SIGKILL whatever is left of the group: the leader if it ignored SIGTERM, or a worker that
    # outlived it. The group is gone (ProcessLookupError) when everything already exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=SHUTDOWN_TIMEOUT_S)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(could not read {path}: {error})"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """URL of a real MLflow tracking server shared by the whole test session."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as url:
        yield url
