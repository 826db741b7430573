"""DeepSpeed checkpoint directories are read with ``weights_only=True`` like every checkpoint file
(``load_from_checkpoint``, ``scale-ssl eval``/``export``): a shard that would run code when
unpickled is refused, and nothing in it runs. Reading real ZeRO checkpoints this way is covered
by ``tests/test_cli.py::test_torchrun_deepspeed_zero2_bf16_with_a_user_json`` (export and
``load_from_checkpoint`` of a bf16 ZeRO-2 directory)."""

from __future__ import annotations

import os

import pytest
import torch

from scale_ssl.cli.main import EXIT_BAD_INPUT, main
from scale_ssl.checkpoint.files import weights_only_loads
from scale_ssl.checkpoint.reader import read_checkpoint

pytest.importorskip("deepspeed")


class RunsCodeWhenUnpickled:
    """What a tampered shard could hold: unpickling it calls ``os.mkdir(marker)``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def tampered_checkpoint(root, marker) -> str:
    directory = root / "last.ckpt"
    (directory / "state").mkdir(parents=True)
    (directory / "latest").write_text("state")
    payload = {"module": {"w": torch.zeros(1)}, "client": RunsCodeWhenUnpickled(str(marker))}
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save(payload, directory / "state" / name)
    return str(directory)


def test_a_shard_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    directory = tampered_checkpoint(tmp_path, marker)
    with pytest.raises(ValueError, match="refused rather than unpickled"):
        read_checkpoint(directory)
    code = main(["export", "--ckpt", directory, "--out", str(tmp_path / "e.pt")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "refused rather than unpickled" in err.splitlines()[-1]
    assert not marker.exists()
    # and the file really would have run code without the guard (the test's own control)
    torch.load(os.path.join(directory, "state", "mp_rank_00_model_states.pt"), weights_only=False)
    assert marker.exists()


def test_weights_only_loads_forces_explicit_false_and_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "p.pt"
    torch.save(RunsCodeWhenUnpickled(str(tmp_path / "m")), path)
    with weights_only_loads():
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(path, weights_only=False)  # what DeepSpeed's own readers pass
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert not (tmp_path / "m").exists()
